//! The rules of `_valid_event` (stream_kpis/core/events.py) over the known fields of an input:
//! the event of an input that passes every check, or None when some check might fail (then the
//! Python parser decides, and names the reason).

use std::borrow::Cow;

use crate::json::{self, Fields, Value};
use crate::time::rfc3339_ms;

pub const PURCHASE: usize = 0;
pub const REDEMPTION: usize = 1;
pub const ENROLLMENT: usize = 2;
pub const SURVEY: usize = 3;
pub const TYPES: [&str; 4] = ["purchase", "redemption", "enrollment", "survey"];

const MAX_TS: i64 = 4_102_444_800_000; // 2100-01-01T00:00:00Z, as events.py
const MAX_ID_LEN: usize = 256;

/// A valid event: the fields of `stream_kpis.core.events.Event`.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed<'a> {
    pub kind: usize,
    pub event_id: Cow<'a, str>,
    pub member_id: Option<Cow<'a, str>>,
    pub ts: i64,
    pub amount: Option<f64>,
    pub points: i64,
    pub margin: Option<f64>,
    pub value: Option<f64>,
    pub channel: Option<Cow<'a, str>>,
    pub tier: Option<Cow<'a, str>>,
    pub nps: Option<i64>,
    pub csat: Option<i64>,
    pub comment: Option<Cow<'a, str>>,
    pub store_id: Option<Cow<'a, str>>,
}

pub fn type_index(name: &str) -> Option<usize> {
    TYPES.iter().position(|kind| *kind == name)
}

fn identifier<'a>(value: &Option<Value<'a>>) -> Option<Option<Cow<'a, str>>> {
    match value {
        None => Some(None),
        Some(Value::Str(text)) if !text.is_empty() && text.chars().count() <= MAX_ID_LEN => {
            Some(Some(text.clone()))
        }
        _ => None,
    }
}

fn text<'a>(value: &Option<Value<'a>>) -> Option<Option<Cow<'a, str>>> {
    match value {
        None => Some(None),
        Some(Value::Str(text)) => Some(Some(text.clone())),
        _ => None,
    }
}

/// A finite JSON number as a float (an integer converts as Python's `float(int)` does).
fn finite(value: &Value) -> Option<f64> {
    match *value {
        Value::Float(number) if number.is_finite() => Some(number),
        Value::Int(number) => Some(number as f64),
        _ => None,
    }
}

fn optional_finite(value: &Option<Value>) -> Option<Option<f64>> {
    match value {
        None => Some(None),
        Some(value) => finite(value).map(Some),
    }
}

/// The most points one event can carry (`events.MAX_POINTS`): more is a dead letter.
pub const MAX_POINTS: i64 = (1 << 53) - 1;

fn int_in(value: &Option<Value>, low: i64, high: i64) -> Option<Option<i64>> {
    match value {
        None => Some(None),
        Some(Value::Int(number)) if (low..=high).contains(number) => Some(Some(*number)),
        _ => None,
    }
}

/// The event of one JSON input of at most `max_bytes`, of type `kind` (None: its `type` field
/// names it), or None: what `JsonEvents.parse` and the core's JSON Lines path read.
pub fn json_event(raw: &[u8], kind: Option<usize>, max_bytes: usize) -> Option<Parsed<'_>> {
    if raw.len() > max_bytes {
        return None;
    }
    valid_event(&json::read_object(raw)?, kind)
}

/// The event of `fields`, of type `kind` (None: the `type` field names it), or None.
pub fn valid_event<'a>(fields: &Fields<'a>, kind: Option<usize>) -> Option<Parsed<'a>> {
    let kind = match kind {
        Some(kind) => kind,
        None => match &fields[json::TYPE] {
            Some(Value::Str(name)) => type_index(name)?,
            _ => return None,
        },
    };
    let event_id = identifier(&fields[json::EVENT_ID])??;
    let ts = match &fields[json::TS] {
        Some(Value::Int(ts)) => *ts,
        Some(Value::Str(text)) => rfc3339_ms(text)?,
        _ => return None,
    };
    if !(0..MAX_TS).contains(&ts) {
        return None;
    }
    let member_id = identifier(&fields[json::MEMBER_ID])?;
    let channel = text(&fields[json::CHANNEL])?;
    let tier = text(&fields[json::TIER])?;
    let store_id = text(&fields[json::STORE_ID])?;
    let comment = text(&fields[json::COMMENT])?;
    text(&fields[json::CURRENCY])?;
    text(&fields[json::REWARD_ID])?;
    let mut event = Parsed { kind, event_id, member_id, ts, ..Default::default() };
    match kind {
        PURCHASE => {
            let amount = finite(fields[json::AMOUNT].as_ref()?)?;
            if amount < 0.0 {
                return None;
            }
            event.amount = Some(amount);
            event.points = int_in(&fields[json::POINTS], 0, MAX_POINTS)?.unwrap_or(0);
            event.margin = optional_finite(&fields[json::MARGIN])?;
            (event.channel, event.tier, event.store_id) = (channel, tier, store_id);
        }
        REDEMPTION => {
            event.member_id.as_ref()?;
            event.points = int_in(&fields[json::POINTS], 1, MAX_POINTS)??;
            event.value = optional_finite(&fields[json::VALUE])?;
            if event.value.is_some_and(|value| value < 0.0) {
                return None;
            }
            event.channel = channel;
        }
        ENROLLMENT => {
            event.member_id.as_ref()?;
            (event.channel, event.tier) = (channel, tier);
        }
        SURVEY => {
            event.nps = int_in(&fields[json::NPS], 0, 10)?;
            event.csat = int_in(&fields[json::CSAT], 1, 5)?;
            if event.nps.is_none() && event.csat.is_none() {
                return None;
            }
            (event.comment, event.channel) = (comment, channel);
        }
        _ => return None,
    }
    Some(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::read_object;

    fn parse(raw: &str) -> Option<Parsed<'_>> {
        valid_event(&read_object(raw.as_bytes())?, None)
    }

    #[test]
    fn purchase() {
        let event = parse(r#"{"type":"purchase","event_id":"p1","ts":5,"amount":2,"tier":"gold",
                              "comment":"not kept"}"#).unwrap();
        assert_eq!(event.amount, Some(2.0));
        assert_eq!(event.points, 0);
        assert_eq!(event.tier.as_deref(), Some("gold"));
        assert_eq!(event.comment, None);
    }

    #[test]
    fn invalid_is_none() {
        for raw in [
            r#"{"type":"purchase","event_id":"p1","ts":5,"amount":-1}"#,
            r#"{"type":"purchase","event_id":"","ts":5,"amount":1}"#,
            r#"{"type":"purchase","event_id":"p1","ts":5.0,"amount":1}"#,
            r#"{"type":"purchase","event_id":"p1","ts":5,"amount":1,"currency":3}"#,
            r#"{"type":"redemption","event_id":"r1","ts":5,"points":3}"#,
            r#"{"type":"redemption","event_id":"r1","member_id":"m","ts":5,"points":0}"#,
            r#"{"type":"survey","event_id":"s1","ts":5}"#,
            r#"{"type":"survey","event_id":"s1","ts":5,"nps":11}"#,
            r#"{"type":"refund","event_id":"s1","ts":5}"#,
        ] {
            assert!(parse(raw).is_none(), "{raw}");
        }
    }
}
