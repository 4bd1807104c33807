//! `stream_kpis._native`: raw input to validated events, natively (issue 12).
//!
//! Two readers, each answering only for input it is sure of: a JSON object (`JsonEvents`, what
//! `EventParser.parse` reads) and a CSV row mapped through a `[[replay.sources]]` plan
//! (`CsvEvents`, what replay's CSV path reads). Each returns the `Event` the Python core would
//! make, with every slot `Event.__init__` sets, or None: then the Python code reads the input as
//! before, and decides (a dead letter and its reason, or an event from a form this side does
//! not read). The Python core stays the reference; tests/property/test_native.py compares them.

use std::borrow::Cow;

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyFloat, PyList, PyString, PyType};

mod engine;
mod event;
mod json;
mod time;

use event::{json_event, type_index, valid_event, Parsed, TYPES};
use json::{field_index, Fields, Value};
use time::{rfc3339_ms, FixedWidth};

/// The attributes of `Event`, in the order `Builder::build` sets them.
const ATTRIBUTES: [&str; 14] = [
    "type", "event_id", "member_id", "ts", "amount", "points", "margin", "value", "channel",
    "tier", "nps", "csat", "comment", "store_id",
];

/// Makes `Event` objects: the class, its type names (the core's own string objects, so that
/// `event.type == PURCHASE` compares identical objects) and the descriptors of its slots.
struct Builder {
    class: Py<PyType>,
    types: Vec<Py<PyString>>,
    slots: Vec<Py<PyAny>>,
}

/// The event type names given (the core's own string objects), checked against `TYPES`.
pub(crate) fn event_types(types: Vec<Bound<'_, PyString>>) -> PyResult<Vec<Py<PyString>>> {
    if types.len() != TYPES.len() || types.iter().zip(TYPES).any(|(kind, name)| kind.to_str().ok() != Some(name)) {
        return Err(PyValueError::new_err(format!("event types must be {TYPES:?}")));
    }
    Ok(types.into_iter().map(Bound::unbind).collect())
}

/// The member descriptor of each named slot of `class`: getting or setting through it directly
/// skips the attribute lookup (most of the cost of building or reading an event).
pub(crate) fn slot_descriptors(class: &Bound<'_, PyType>, names: &[&str]) -> PyResult<Vec<Py<PyAny>>> {
    let mut slots = Vec::new();
    for name in names {
        let slot = class.getattr("__dict__")?.get_item(name)?;
        let kind = slot.get_type();
        let (get, set) = unsafe { ((*kind.as_type_ptr()).tp_descr_get, (*kind.as_type_ptr()).tp_descr_set) };
        if kind.name()? != "member_descriptor" || get.is_none() || set.is_none() {
            return Err(PyValueError::new_err(format!("Event.{name} must be a slot")));
        }
        slots.push(slot.unbind());
    }
    Ok(slots)
}

impl Builder {
    fn new(class: Bound<'_, PyType>, types: Vec<Bound<'_, PyString>>) -> PyResult<Builder> {
        let slots = slot_descriptors(&class, &ATTRIBUTES)?;
        Ok(Builder { class: class.unbind(), types: event_types(types)?, slots })
    }

    fn build(&self, py: Python<'_>, event: &Parsed) -> PyResult<PyObject> {
        let class = self.class.bind(py);
        // what object.__new__(Event) does: the class's own allocator, no __init__
        let object = unsafe {
            let raw = class.as_type_ptr();
            let alloc = (*raw).tp_alloc.unwrap_or(ffi::PyType_GenericAlloc);
            Bound::from_owned_ptr_or_err(py, alloc(raw, 0))?
        };
        let text = |value: &Option<Cow<str>>| -> PyObject {
            match value {
                Some(text) => PyString::new(py, text).into_any().unbind(),
                None => py.None(),
            }
        };
        let float = |value: Option<f64>| -> PyObject {
            match value {
                Some(number) => PyFloat::new(py, number).into_any().unbind(),
                None => py.None(),
            }
        };
        let int = |value: Option<i64>| -> PyObject {
            match value {
                Some(number) => number.into_pyobject(py).unwrap().into_any().unbind(),
                None => py.None(),
            }
        };
        let values: [PyObject; 14] = [
            self.types[event.kind].clone_ref(py).into_any(),
            PyString::new(py, &event.event_id).into_any().unbind(),
            text(&event.member_id),
            int(Some(event.ts)),
            float(event.amount),
            int(Some(event.points)),
            float(event.margin),
            float(event.value),
            text(&event.channel),
            text(&event.tier),
            int(event.nps),
            int(event.csat),
            text(&event.comment),
            text(&event.store_id),
        ];
        for (slot, value) in self.slots.iter().zip(values) {
            let slot = slot.bind(py);
            // what `object.attr = value` ends in: the slot descriptor's __set__
            let status = unsafe {
                let set = (*slot.get_type().as_type_ptr()).tp_descr_set.unwrap_unchecked();
                set(slot.as_ptr(), object.as_ptr(), value.as_ptr())
            };
            if status != 0 {
                return Err(PyErr::fetch(py));
            }
        }
        Ok(object.unbind())
    }

    /// The index of a given event type: Ok(None) for None, Err(()) for a name not in TYPES.
    fn kind(&self, event_type: Option<&Bound<'_, PyString>>) -> Result<Option<usize>, ()> {
        match event_type {
            None => Ok(None),
            Some(name) => name.to_str().ok().and_then(type_index).map(Some).ok_or(()),
        }
    }
}

/// JSON events: `parse(raw, event_type=None, now_ms=None)` as `EventParser.parse` for a valid
/// event, else None.
#[pyclass(module = "stream_kpis._native", frozen)]
struct JsonEvents {
    builder: Builder,
    max_event_bytes: usize,
    max_skew_ms: i64,
}

#[pymethods]
impl JsonEvents {
    #[new]
    fn new(event_class: Bound<'_, PyType>, types: Vec<Bound<'_, PyString>>, max_event_bytes: usize,
           max_skew_ms: i64) -> PyResult<Self> {
        Ok(JsonEvents { builder: Builder::new(event_class, types)?, max_event_bytes, max_skew_ms })
    }

    #[pyo3(signature = (raw, event_type=None, now_ms=None))]
    fn parse(&self, py: Python<'_>, raw: &[u8], event_type: Option<&Bound<'_, PyString>>,
             now_ms: Option<&Bound<'_, PyAny>>) -> PyResult<Option<PyObject>> {
        // a clock that is not a 64-bit int: not ours to judge
        let now_ms = match now_ms.map(|now| now.extract::<i64>()) {
            None => None,
            Some(Ok(now)) => Some(now),
            Some(Err(_)) => return Ok(None),
        };
        let Ok(kind) = self.builder.kind(event_type) else { return Ok(None) };
        match json_event(raw, kind, self.max_event_bytes) {
            Some(event) if now_ms.map_or(true, |now| event.ts <= now.saturating_add(self.max_skew_ms)) => {
                Ok(Some(self.builder.build(py, &event)?))
            }
            _ => Ok(None),
        }
    }
}

/// How a CSV cell becomes a field value (replay.py's converters).
enum Conversion {
    Text,
    Number,
    Integer,
    Timestamp,
}

/// How the `ts` column is written (a source's `ts_format`).
enum TsFormat {
    Auto,
    EpochMs,
    EpochS,
    Rfc3339,
    Pattern(FixedWidth),
}

/// Mapped CSV rows: `event(cells)` as replay's CSV path maps and validates a row of a source
/// (its plan of (our field, cell index), its ts_format and event type) for a valid event, else
/// None.
#[pyclass(module = "stream_kpis._native", frozen)]
struct CsvEvents {
    builder: Builder,
    plan: Vec<(usize, usize, Conversion)>,
    ts_format: TsFormat,
    width: usize,
    kind: Option<usize>,
}

#[pymethods]
impl CsvEvents {
    /// None (not an error) when the ts_format is a pattern this side does not read, or the
    /// event type is not one it knows: the caller then maps the source in Python.
    #[staticmethod]
    #[pyo3(signature = (event_class, types, plan, ts_format, width, event_type=None))]
    fn for_source(event_class: Bound<'_, PyType>, types: Vec<Bound<'_, PyString>>,
                  plan: Vec<(String, usize)>, ts_format: &str, width: usize,
                  event_type: Option<&Bound<'_, PyString>>) -> PyResult<Option<Self>> {
        let builder = Builder::new(event_class, types)?;
        let Ok(kind) = builder.kind(event_type) else { return Ok(None) };
        let ts_format = match ts_format {
            "auto" => TsFormat::Auto,
            "epoch_ms" => TsFormat::EpochMs,
            "epoch_s" => TsFormat::EpochS,
            "rfc3339" => TsFormat::Rfc3339,
            pattern => match FixedWidth::new(pattern) {
                Some(fixed) => TsFormat::Pattern(fixed),
                None => return Ok(None),
            },
        };
        let mut steps = Vec::new();
        for (name, cell) in plan {
            let field = field_index(&name)
                .ok_or_else(|| PyValueError::new_err(format!("unknown field {name:?}")))?;
            let conversion = match name.as_str() {
                "ts" => Conversion::Timestamp,
                "amount" | "margin" | "value" => Conversion::Number,
                "points" | "nps" | "csat" => Conversion::Integer,
                _ => Conversion::Text,
            };
            steps.push((field, cell, conversion));
        }
        Ok(Some(CsvEvents { builder, plan: steps, ts_format, width, kind }))
    }

    fn event(&self, py: Python<'_>, cells: &Bound<'_, PyList>) -> PyResult<Option<PyObject>> {
        let count = cells.len();
        if count > self.width {
            return Ok(None);
        }
        // the cells of the plan, held while the fields borrow their text
        let mut items = Vec::with_capacity(self.plan.len());
        for (_, cell, _) in &self.plan {
            items.push(if *cell < count { Some(cells.get_item(*cell)?) } else { None });
        }
        let mut fields: Fields = Default::default();
        for ((field, _, conversion), item) in self.plan.iter().zip(&items) {
            let Some(item) = item else { continue }; // a missing cell is a missing value
            let Ok(text) = item.downcast::<PyString>() else { return Ok(None) };
            // a str that is not UTF-8 (a lone surrogate a codec let through): Python's to read
            let Ok(text) = text.to_str() else { return Ok(None) };
            let text = strip(text);
            if text.is_empty() {
                continue;
            }
            let value = match conversion {
                Conversion::Text => Some(Value::Str(Cow::Borrowed(text))),
                Conversion::Number => decimal(text).map(Value::Float),
                Conversion::Integer => integer(text).map(Value::Int),
                Conversion::Timestamp => self.timestamp(text).map(Value::Int),
            };
            let Some(value) = value else { return Ok(None) };
            fields[*field] = Some(value);
        }
        match valid_event(&fields, self.kind) {
            Some(event) => Ok(Some(self.builder.build(py, &event)?)),
            None => Ok(None),
        }
    }
}

impl CsvEvents {
    /// Epoch ms of a `ts` cell, as its converter and then validation read it.
    fn timestamp(&self, text: &str) -> Option<i64> {
        match &self.ts_format {
            // int(text) when text.lstrip("-").isdigit(), else the text, read as RFC 3339
            TsFormat::Auto => {
                if !text.is_ascii() || text.starts_with('-') {
                    None
                } else if text.bytes().all(|byte| byte.is_ascii_digit()) {
                    integer(text)
                } else {
                    rfc3339_ms(text)
                }
            }
            TsFormat::EpochMs => integer(text),
            // int(round(float(text) * 1000)): round half to even, as Python's round
            TsFormat::EpochS => {
                let ms = (decimal(text)? * 1000.0).round_ties_even();
                (ms.abs() < 9.0e15).then_some(ms as i64)
            }
            TsFormat::Rfc3339 => rfc3339_ms(text),
            TsFormat::Pattern(fixed) => fixed.parse(text),
        }
    }
}

/// `str.strip()`: Python's white space is the characters `str.isspace()` is true of (bidi class
/// WS, B or S, or category Zs; Unicode 14 as in Python 3.11); tests/property/test_native.py
/// checks every code point against Python.
fn strip(text: &str) -> &str {
    let is_space = |c: char| {
        matches!(c, '\t'..='\r' | '\u{1c}'..='\u{20}' | '\u{85}' | '\u{a0}' | '\u{1680}'
                    | '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}'
                    | '\u{3000}')
    };
    text.trim_matches(is_space)
}

/// `int(text)` for an optional sign and ASCII digits that fit 64 bits; else None.
fn integer(text: &str) -> Option<i64> {
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `float(text)` for `[+-]digits[.digits][e[+-]digits]` (no inf, nan or underscores), correctly
/// rounded as Python's; else None.
fn decimal(text: &str) -> Option<f64> {
    let body = text.strip_prefix(['+', '-']).unwrap_or(text);
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(at) => (&body[..at], Some(&body[at + 1..])),
        None => (body, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
    if whole.len() + fraction.len() == 0 || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    if let Some(exponent) = exponent {
        let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
        if digits.is_empty() || !all_digits(digits) {
            return None;
        }
    }
    text.parse().ok()
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<JsonEvents>()?;
    module.add_class::<CsvEvents>()?;
    module.add_class::<engine::Core>()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_as_python_reads_them() {
        assert_eq!(integer("+12"), Some(12));
        assert_eq!(integer("1_2"), None);
        assert_eq!(decimal("5."), Some(5.0));
        assert_eq!(decimal(".5e1"), Some(5.0));
        assert_eq!(decimal("inf"), None);
        assert_eq!(decimal("."), None);
        assert_eq!(decimal("1e"), None);
    }

    #[test]
    fn strip_as_python() {
        assert_eq!(strip("\u{b} a \u{1f}"), "a");
        assert_eq!(strip("\u{a0}a\u{3000}"), "a");
        assert_eq!(strip("\u{200b}a"), "\u{200b}a");
        assert_eq!(strip("é"), "é");
    }
}
