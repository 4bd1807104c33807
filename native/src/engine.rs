//! `Core`: the streaming core of `stream_kpis/core/processor.py`, natively, for replay (issue 12).
//!
//! It applies validated `Event`s to member states and aggregates by the same rules as the Python
//! `Processor`, which stays the reference: `stream_kpis/core/native_core.py` wraps this class
//! with the `Processor` interface replay uses, exports the aggregates as the Python
//! `Aggregates` for evaluation, and runs what is cheaper or safer in Python (lexicon matching of
//! comments, the CLV statistics, formatting signals).
//!
//! Every number keeps its Python type: a sum holds an int until a float is added, as `int +
//! float` does, so the exported aggregates evaluate to the same bytes.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

use pyo3::exceptions::PyValueError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyFloat, PyList, PyString, PyTuple, PyType};

use crate::event::{json_event, type_index, Parsed, TYPES};
use crate::{event_types, slot_descriptors};

// ---- a fast hash for small keys (bucket numbers, ids) --------------------------------------

#[derive(Default, Clone, Copy)]
pub struct Fx(u64);

impl Fx {
    #[inline]
    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.mix(u64::from_le_bytes(chunk.try_into().unwrap()));
        }
        let mut tail = 0u64;
        for (i, byte) in chunks.remainder().iter().enumerate() {
            tail |= (*byte as u64) << (8 * i);
        }
        self.mix(tail ^ ((bytes.len() as u64) << 56));
    }
    fn write_u8(&mut self, i: u8) {
        self.mix(i as u64);
    }
    fn write_u32(&mut self, i: u32) {
        self.mix(i as u64);
    }
    fn write_u64(&mut self, i: u64) {
        self.mix(i);
    }
    fn write_i64(&mut self, i: i64) {
        self.mix(i as u64);
    }
    fn write_usize(&mut self, i: usize) {
        self.mix(i as u64);
    }
    fn finish(&self) -> u64 {
        // the multiply leaves the low bits weak for keys that are small integers
        self.0 ^ (self.0 >> 29)
    }
}

type Map<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;
type Set<K> = HashSet<K, BuildHasherDefault<Fx>>;

// ---- numbers with Python's int/float distinction ------------------------------------------

/// A Python number of an aggregate: an int until a float is added to it.
#[derive(Clone, Copy, Debug)]
pub enum Num {
    I(i128),
    F(f64),
}

impl Num {
    #[inline]
    fn plus(self, other: Num) -> Num {
        match (self, other) {
            (Num::I(a), Num::I(b)) => Num::I(a + b),
            (Num::I(a), Num::F(b)) => Num::F(int_to_float(a) + b),
            (Num::F(a), Num::I(b)) => Num::F(a + int_to_float(b)),
            (Num::F(a), Num::F(b)) => Num::F(a + b),
        }
    }

    /// `self - other`, as Python subtracts (IEEE subtraction for floats).
    #[inline]
    fn minus(self, other: Num) -> Num {
        match (self, other) {
            (Num::I(a), Num::I(b)) => Num::I(a - b),
            (Num::I(a), Num::F(b)) => Num::F(int_to_float(a) - b),
            (Num::F(a), Num::I(b)) => Num::F(a - int_to_float(b)),
            (Num::F(a), Num::F(b)) => Num::F(a - b),
        }
    }

    /// `sign * self` for a sign of 1 or -1 (an int times a float is a float).
    #[inline]
    fn times(self, sign: i64) -> Num {
        match self {
            Num::I(a) => Num::I(sign as i128 * a),
            Num::F(a) => Num::F(sign as f64 * a),
        }
    }

    /// Python's `==` of two numbers (an int equals the float of the same value).
    fn same(self, other: Num) -> bool {
        match (self, other) {
            (Num::I(a), Num::I(b)) => a == b,
            (Num::F(a), Num::F(b)) => a == b,
            (Num::I(a), Num::F(b)) | (Num::F(b), Num::I(a)) => b.fract() == 0.0 && b.is_finite() && (b as i128) == a && (a as f64) == b,
        }
    }

    #[inline]
    fn is_zero(self) -> bool {
        match self {
            Num::I(a) => a == 0,
            Num::F(a) => a == 0.0,
        }
    }

    fn to_object(self, py: Python<'_>) -> PyObject {
        match self {
            Num::I(a) => a.into_pyobject(py).unwrap().into_any().unbind(),
            Num::F(a) => PyFloat::new(py, a).into_any().unbind(),
        }
    }
}

/// `float(int)`: rounded to the nearest double, as Python does (`as` rounds to nearest too).
#[inline]
fn int_to_float(a: i128) -> f64 {
    a as f64
}

/// `kpis._add`: add to a histogram entry; an entry that comes to zero is no entry.
#[inline]
fn add_num(hist: &mut Map<i64, Num>, key: i64, amount: Num) {
    match hist.entry(key) {
        Entry::Vacant(slot) => {
            if !amount.is_zero() {
                slot.insert(amount);
            }
        }
        Entry::Occupied(mut slot) => {
            let value = slot.get().plus(amount);
            if value.is_zero() {
                slot.remove();
            } else {
                *slot.get_mut() = value;
            }
        }
    }
}

/// `hist[key] = hist.get(key, 0) + amount`: the event sums, which keep a zero.
#[inline]
fn sum_num(hist: &mut Map<i64, Num>, key: i64, amount: Num) {
    let value = hist.entry(key).or_insert(Num::I(0));
    *value = value.plus(amount);
}

#[inline]
fn add_count<K: std::hash::Hash + Eq>(hist: &mut Map<K, i64>, key: K, amount: i64) {
    match hist.entry(key) {
        Entry::Vacant(slot) => {
            if amount != 0 {
                slot.insert(amount);
            }
        }
        Entry::Occupied(mut slot) => {
            let value = *slot.get() + amount;
            if value == 0 {
                slot.remove();
            } else {
                *slot.get_mut() = value;
            }
        }
    }
}

/// Python's floor division (`//`) of an int by a positive int.
#[inline]
fn floor_div(a: i64, b: i64) -> i64 {
    a.div_euclid(b)
}

/// `kpis.month_of`: the UTC calendar month of an epoch-ms instant, as year * 12 + month - 1.
pub fn month_of(ms: i64) -> i64 {
    // days to a civil date (H. Hinnant's algorithm)
    let z = floor_div(ms, 86_400_000) + 719_468;
    let era = floor_div(z, 146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    year * 12 + month - 1
}

// ---- events -----------------------------------------------------------------------------

const PURCHASE: u8 = 0;
const REDEMPTION: u8 = 1;
const ENROLLMENT: u8 = 2;
const SURVEY: u8 = 3;
const TYPE_LETTERS: [u8; 4] = [b'p', b'r', b'e', b's'];

/// The `Event` slots the core reads, by index into `Reader::slots`.
const FIELDS: [&str; 13] = [
    "type", "event_id", "member_id", "ts", "amount", "points", "margin", "channel", "tier", "nps",
    "csat", "comment", "store_id",
];

/// One event's fields, borrowed from the `Event` object for the time it is applied.
struct Ev<'py> {
    kind: u8,
    event_id: Cow<'py, [u8]>,
    member_id: Option<Cow<'py, [u8]>>,
    ts: i64,
    amount: Option<Num>,
    points: i128,
    margin: Option<Num>,
    channel: Option<Cow<'py, [u8]>>,
    tier: Option<Cow<'py, [u8]>>,
    store_id: Option<Cow<'py, [u8]>>,
    nps: Option<i64>,
    csat: Option<i64>,
    comment: Option<Comment<'py>>,
}

/// A survey's comment: the `Event`'s str, or the text the JSON reader read.
enum Comment<'a> {
    Object(Bound<'a, PyAny>),
    Text(Cow<'a, str>),
}

impl<'a> Ev<'a> {
    /// The event of what the JSON reader parsed (as `Reader::read` reads the `Event` that the
    /// input stage would build of it).
    fn of_parsed(event: Parsed<'a>) -> Ev<'a> {
        let bytes = |text: Cow<'a, str>| match text {
            Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
            Cow::Owned(text) => Cow::Owned(text.into_bytes()),
        };
        let kind = event.kind as u8;
        Ev {
            kind,
            event_id: bytes(event.event_id),
            member_id: event.member_id.map(bytes),
            ts: event.ts,
            amount: event.amount.map(Num::F),
            points: if kind == PURCHASE || kind == REDEMPTION { event.points as i128 } else { 0 },
            margin: event.margin.map(Num::F),
            channel: event.channel.filter(|_| kind == ENROLLMENT || kind == PURCHASE).map(bytes),
            tier: event.tier.filter(|_| kind == PURCHASE || kind == ENROLLMENT).map(bytes),
            store_id: event.store_id.filter(|_| kind == PURCHASE).map(bytes),
            nps: event.nps,
            csat: event.csat,
            comment: event.comment.filter(|_| kind == SURVEY).map(Comment::Text),
        }
    }
}

/// The text of a str as UTF-8 bytes; a str with lone surrogates (which a CSV source's decoding
/// can give) as "surrogatepass" bytes, which sort in code-point order as Python's strings do.
///
/// The bytes borrow the str's own UTF-8 buffer for as long as the GIL is held, which outlives
/// the `Bound` given: sound because every str read here is an `Event` slot's value, and the
/// `Event` (held by the caller's list) keeps it alive and unchanged while its fields are used.
fn text_bytes<'py>(text: &Bound<'py, PyAny>) -> PyResult<Cow<'py, [u8]>> {
    unsafe {
        if ffi::PyUnicode_Check(text.as_ptr()) == 0 {
            return Err(PyValueError::new_err("expected a str"));
        }
        let mut size: ffi::Py_ssize_t = 0;
        let data = ffi::PyUnicode_AsUTF8AndSize(text.as_ptr(), &mut size);
        if !data.is_null() {
            // valid as long as the str lives, which outlives this borrow
            return Ok(Cow::Borrowed(std::slice::from_raw_parts(data as *const u8, size as usize)));
        }
        ffi::PyErr_Clear();
        let encoded = ffi::PyUnicode_AsEncodedString(
            text.as_ptr(),
            c"utf-8".as_ptr(),
            c"surrogatepass".as_ptr(),
        );
        let encoded = Bound::from_owned_ptr_or_err(text.py(), encoded)?;
        let bytes = ffi::PyBytes_AsString(encoded.as_ptr()) as *const u8;
        let size = ffi::PyBytes_Size(encoded.as_ptr()) as usize;
        Ok(Cow::Owned(std::slice::from_raw_parts(bytes, size).to_vec()))
    }
}

/// The str of `text_bytes`'s bytes.
fn text_object<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyString>> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Ok(PyString::new(py, text));
    }
    unsafe {
        let text = ffi::PyUnicode_DecodeUTF8(
            bytes.as_ptr() as *const _,
            bytes.len() as ffi::Py_ssize_t,
            c"surrogatepass".as_ptr(),
        );
        Ok(Bound::from_owned_ptr_or_err(py, text)?.downcast_into_unchecked())
    }
}

fn number(value: &Bound<'_, PyAny>) -> PyResult<Num> {
    if let Ok(float) = value.downcast_exact::<PyFloat>() {
        return Ok(Num::F(float.value()));
    }
    if value.is_instance_of::<PyFloat>() {
        return Ok(Num::F(value.extract::<f64>()?));
    }
    Ok(Num::I(value.extract::<i128>()?))
}

/// Reads `Event` objects through the member descriptors of their slots (no attribute lookup).
struct Reader {
    class: Py<PyType>,
    slots: Vec<Py<PyAny>>,
    types: Vec<Py<PyString>>,
}

impl Reader {
    fn new(class: Bound<'_, PyType>, types: Vec<Bound<'_, PyString>>) -> PyResult<Reader> {
        let slots = slot_descriptors(&class, &FIELDS)?;
        Ok(Reader { class: class.unbind(), slots, types: event_types(types)? })
    }

    #[inline]
    fn slot<'py>(&self, event: &Bound<'py, PyAny>, index: usize) -> PyResult<Bound<'py, PyAny>> {
        let py = event.py();
        let slot = self.slots[index].bind(py);
        unsafe {
            let get = (*slot.get_type().as_type_ptr()).tp_descr_get.unwrap_unchecked();
            let value = get(slot.as_ptr(), event.as_ptr(), ffi::Py_TYPE(event.as_ptr()) as *mut _);
            Bound::from_owned_ptr_or_err(py, value)
        }
    }

    fn optional<'py>(&self, event: &Bound<'py, PyAny>, index: usize) -> PyResult<Option<Bound<'py, PyAny>>> {
        let value = self.slot(event, index)?;
        Ok(if value.is_none() { None } else { Some(value) })
    }

    fn read<'py>(&self, event: &Bound<'py, PyAny>) -> PyResult<Ev<'py>> {
        let py = event.py();
        if !event.get_type().is(self.class.bind(py)) {
            return Err(PyValueError::new_err("the native core applies Event objects only"));
        }
        let kind_obj = self.slot(event, 0)?;
        let kind = match self.types.iter().position(|t| t.bind(py).is(&kind_obj)) {
            Some(kind) => kind,
            None => {
                let text = kind_obj.downcast::<PyString>()?.to_str()?;
                TYPES
                    .iter()
                    .position(|n| *n == text)
                    .ok_or_else(|| PyValueError::new_err(format!("unknown event type {text:?}")))?
            }
        } as u8;
        let event_id = text_bytes(&self.slot(event, 1)?)?;
        let member_obj = self.optional(event, 2)?;
        let member_id = match &member_obj {
            Some(member) => Some(text_bytes(member)?),
            None => None,
        };
        let ts: i64 = self.slot(event, 3)?.extract()?;
        // only the fields the core reads for this type
        let (amount, margin) = if kind == PURCHASE {
            (
                self.optional(event, 4)?.map(|a| number(&a)).transpose()?,
                self.optional(event, 6)?.map(|m| number(&m)).transpose()?,
            )
        } else {
            (None, None)
        };
        let points: i128 = if kind == PURCHASE || kind == REDEMPTION { self.slot(event, 5)?.extract()? } else { 0 };
        let text = |index: usize| -> PyResult<Option<Cow<'py, [u8]>>> {
            match self.optional(event, index)? {
                Some(value) => Ok(Some(text_bytes(&value)?)),
                None => Ok(None),
            }
        };
        let channel = if kind == ENROLLMENT || kind == PURCHASE { text(7)? } else { None };
        let store_id = if kind == PURCHASE { text(12)? } else { None };
        let tier = if kind == PURCHASE || kind == ENROLLMENT { text(8)? } else { None };
        let (nps, csat, comment) = if kind == SURVEY {
            (
                self.optional(event, 9)?.map(|n| n.extract::<i64>()).transpose()?,
                self.optional(event, 10)?.map(|c| c.extract::<i64>()).transpose()?,
                self.optional(event, 11)?.map(Comment::Object),
            )
        } else {
            (None, None, None)
        };
        Ok(Ev {
            kind,
            event_id,
            member_id,
            ts,
            amount,
            points,
            margin,
            channel,
            tier,
            store_id,
            nps,
            csat,
            comment,
        })
    }
}

// ---- member state -----------------------------------------------------------------------

const ACTIVE: u8 = 0;
const AT_RISK: u8 = 1;
const CHURNED: u8 = 2;

/// A lot or a redemption: [ts, event_id, points], sorted by (ts, event_id).
struct Lot {
    ts: i64,
    id: Box<[u8]>,
    points: i128,
}

/// The lots a points event changed: (lot index, remaining before, or None for a new lot).
type LotChanges = Vec<(usize, Option<i128>)>;

/// `member.MemberState`, the fields the aggregates read (not the segments' or CLV's). Kept
/// small: a replay holds one per member (see `Recent` and `PointLots`).
struct Member {
    key: Rc<[u8]>, // the member id (UTF-8, see text_bytes), shared with Core::member_index
    enrolled_ts: Option<i64>,
    enroll_key: Box<[u8]>,
    channel: u32,
    first_seen: Option<i64>,
    tier: u32,
    tier_key: Option<(i64, Box<[u8]>)>,
    last_activity: Option<i64>,
    last_purchase: Option<i64>,
    prev_purchase: Option<i64>,
    first_purchase: Option<i64>,
    purchase_count: i64,
    lifetime_spend: Num,
    balance: i128, // points earned - points redeemed
    last_redemption: Option<i64>,
    home_store: u32,
    home_key: Option<(i64, Box<[u8]>)>,
    recent: Recent,
    points: Option<Box<PointLots>>, // with points validity, from the first points event
    status: u8,
    months: Vec<i64>,
    purchase_days: PurchaseDays, // with CLV: (UTC day, total amount), sorted by day
}

/// With points validity: the lots and redemptions, [ts, event_id, points] sorted by (ts,
/// event_id), the remaining points per lot after allocation, the unbacked points, and the expiry
/// buckets a notice was sent for.
#[derive(Default)]
struct PointLots {
    lots: Vec<Lot>,
    redemptions: Vec<Lot>,
    remaining: Vec<i128>,
    unbacked: i128,
    notified_expiry: Vec<i64>,
}

/// `MemberState.recent`: the last de-duplication keys, oldest first, in one buffer of entries
/// [hash: u32][length: u16][key bytes] (a key is a type letter and an event id of at most 256
/// characters).
#[derive(Default)]
struct Recent {
    entries: Vec<u8>,
    count: usize,
}

impl Recent {
    fn entry(&self, at: usize) -> (u32, &[u8], usize) {
        let hash = u32::from_le_bytes(self.entries[at..at + 4].try_into().unwrap());
        let len = u16::from_le_bytes(self.entries[at + 4..at + 6].try_into().unwrap()) as usize;
        (hash, &self.entries[at + 6..at + 6 + len], at + 6 + len)
    }

    /// Whether the key is remembered; remembers it if not (the last `bound` keys).
    fn seen(&mut self, key: &[u8], bound: usize) -> bool {
        let mut hasher = Fx::default();
        hasher.write(key);
        let hash = hasher.finish() as u32;
        let mut at = 0;
        while at < self.entries.len() {
            let (h, k, next) = self.entry(at);
            if h == hash && k == key {
                return true;
            }
            at = next;
        }
        self.entries.extend_from_slice(&hash.to_le_bytes());
        self.entries.extend_from_slice(&(key.len() as u16).to_le_bytes());
        self.entries.extend_from_slice(key);
        self.count += 1;
        if self.count > bound {
            let (_, _, next) = self.entry(0);
            self.entries.drain(..next);
            self.count -= 1;
        }
        false
    }
}

/// 8 histogram buckets (ENROLLED .. FIRST_PURCHASE_SINGLE of kpis.py), channel and tier.
#[derive(Clone, Copy, PartialEq)]
struct View {
    buckets: [Option<i64>; 8],
    channel: u32,
    tier: u32,
}

const ENROLLED: usize = 0;
const LAST_TOUCH: usize = 2;

fn insert_sorted(items: &mut Vec<Lot>, item: Lot) -> usize {
    let mut i = items.len();
    if i == 0 || items[i - 1].ts < item.ts {
        items.push(item);
        return i;
    }
    while i > 0 && (items[i - 1].ts, &items[i - 1].id[..]) > (item.ts, &item.id[..]) {
        i -= 1;
    }
    items.insert(i, item);
    i
}

/// `member.allocate_points`: FIFO allocation of redemptions to lots, in event-time order.
fn allocate_points(lots: &[Lot], redemptions: &[Lot], validity: i64) -> (Vec<i128>, i128) {
    let mut remaining: Vec<i128> = lots.iter().map(|lot| lot.points).collect();
    let mut unbacked = 0;
    let mut first = 0;
    let count = lots.len();
    for redemption in redemptions {
        let r = redemption.ts;
        let mut need = redemption.points;
        while first < count && (lots[first].ts + validity <= r || remaining[first] == 0) {
            first += 1;
        }
        let mut i = first;
        while need != 0 && i < count && lots[i].ts <= r {
            if remaining[i] != 0 && lots[i].ts + validity > r {
                let take = need.min(remaining[i]);
                remaining[i] -= take;
                need -= take;
            }
            i += 1;
        }
        unbacked += need;
    }
    (remaining, unbacked)
}

impl Member {
    fn new(key: Rc<[u8]>) -> Member {
        Member {
            key,
            enrolled_ts: None,
            enroll_key: Box::default(),
            channel: 0,
            first_seen: None,
            tier: 0,
            tier_key: None,
            last_activity: None,
            last_purchase: None,
            prev_purchase: None,
            first_purchase: None,
            purchase_count: 0,
            lifetime_spend: Num::F(0.0),
            balance: 0,
            last_redemption: None,
            home_store: 0,
            home_key: None,
            recent: Recent::default(),
            points: None,
            status: ACTIVE,
            months: Vec::new(),
            purchase_days: Vec::new(),
        }
    }

    fn unbacked(&self) -> i128 {
        self.points.as_ref().map_or(0, |p| p.unbacked)
    }

    fn lots(&self) -> &[Lot] {
        self.points.as_ref().map_or(&[], |p| &p.lots)
    }

    fn enrolled_at(&self) -> Option<i64> {
        self.enrolled_ts.or(self.first_seen)
    }

    fn last_touch(&self) -> Option<i64> {
        let enrolled = self.enrolled_at();
        match (self.last_activity, enrolled) {
            (None, _) => enrolled,
            (Some(activity), Some(e)) if activity <= e => Some(e),
            (activity, _) => activity,
        }
    }

    /// `MemberState.seen`: whether the key was applied; remembers it if not (the last `bound`).
    fn seen(&mut self, key: &[u8], bound: usize) -> bool {
        self.recent.seen(key, bound)
    }

    fn view(&self, bucket_ms: i64) -> View {
        let enrolled = self.enrolled_at();
        let activity = self.last_activity;
        let touch = match (activity, enrolled) {
            (Some(a), None) => Some(a),
            (Some(a), Some(e)) if a > e => Some(a),
            _ => enrolled,
        };
        let b = |t: Option<i64>| t.map(|t| floor_div(t, bucket_ms));
        let first = b(self.first_purchase);
        View {
            buckets: [
                b(enrolled),
                b(activity),
                b(touch),
                b(self.last_redemption),
                b(self.last_purchase),
                b(self.prev_purchase),
                first,
                if self.purchase_count == 1 { first } else { None },
            ],
            channel: self.channel,
            tier: self.tier,
        }
    }

    fn activity(&mut self, ts: i64) {
        if self.last_activity.map_or(true, |a| ts > a) {
            self.last_activity = Some(ts);
        }
        if self.first_seen.map_or(true, |f| ts < f) {
            self.first_seen = Some(ts);
        }
    }

    fn maybe_tier(&mut self, ev: &Ev<'_>, tier: Option<u32>) {
        let Some(tier) = tier else { return };
        let newer = match &self.tier_key {
            None => true,
            Some((ts, id)) => (ev.ts, &ev.event_id[..]) > (*ts, &id[..]),
        };
        if newer {
            self.tier_key = Some((ev.ts, ev.event_id.as_ref().into()));
            self.tier = tier;
        }
    }

    /// `MemberState.apply` (channel and tier interned by the caller).
    fn apply(&mut self, ev: &Ev<'_>, validity: Option<i64>, channel: u32, tier: Option<u32>, store: Option<u32>) -> Option<LotChanges> {
        let ts = ev.ts;
        let mut changes = None;
        match ev.kind {
            PURCHASE => {
                self.activity(ts);
                self.purchase_count += 1;
                self.lifetime_spend = self.lifetime_spend.plus(ev.amount.unwrap_or(Num::I(0)));
                self.balance += ev.points;
                match self.last_purchase {
                    Some(last) if ts < last => {
                        if self.prev_purchase.map_or(true, |p| ts > p) {
                            self.prev_purchase = Some(ts);
                        }
                    }
                    _ => {
                        self.prev_purchase = self.last_purchase;
                        self.last_purchase = Some(ts);
                    }
                }
                if self.first_purchase.map_or(true, |f| ts < f) {
                    self.first_purchase = Some(ts);
                }
                if ev.points != 0 {
                    if let Some(validity) = validity {
                        let lot = Lot { ts, id: ev.event_id.as_ref().into(), points: ev.points };
                        changes = Some(self.add_lot(lot, validity));
                    }
                }
                self.maybe_tier(ev, tier);
                if let Some(store) = store {
                    let earlier = match &self.home_key {
                        None => true,
                        Some((t, id)) => (ts, &ev.event_id[..]) < (*t, &id[..]),
                    };
                    if earlier {
                        self.home_key = Some((ts, ev.event_id.as_ref().into()));
                        self.home_store = store;
                    }
                }
            }
            REDEMPTION => {
                self.activity(ts);
                self.balance -= ev.points;
                if self.last_redemption.map_or(true, |r| ts > r) {
                    self.last_redemption = Some(ts);
                }
                if let Some(validity) = validity {
                    let redemption = Lot { ts, id: ev.event_id.as_ref().into(), points: ev.points };
                    changes = Some(self.add_redemption(redemption, validity));
                }
            }
            ENROLLMENT => {
                let earlier = match self.enrolled_ts {
                    None => true,
                    Some(e) => ts < e || (ts == e && ev.event_id[..] < self.enroll_key[..]),
                };
                if earlier {
                    self.enrolled_ts = Some(ts);
                    self.enroll_key = ev.event_id.as_ref().into();
                    self.channel = channel;
                }
                self.maybe_tier(ev, tier);
            }
            _ => {}
        }
        changes
    }

    fn add_lot(&mut self, lot: Lot, validity: i64) -> LotChanges {
        let ts = lot.ts;
        let points = lot.points;
        let p = self.points.get_or_insert_with(Box::default);
        let index = insert_sorted(&mut p.lots, lot);
        if index == p.remaining.len() && p.redemptions.last().map_or(true, |r| r.ts < ts) {
            p.remaining.push(points);
            return vec![(index, None)];
        }
        p.reallocate(validity, Some(index))
    }

    fn add_redemption(&mut self, redemption: Lot, validity: i64) -> LotChanges {
        let r = redemption.ts;
        let mut need = redemption.points;
        let p = self.points.get_or_insert_with(Box::default);
        let index = insert_sorted(&mut p.redemptions, redemption);
        if index < p.redemptions.len() - 1 || p.remaining.len() != p.lots.len() {
            return p.reallocate(validity, None);
        }
        let lots = &p.lots;
        let start = lots.partition_point(|lot| lot.ts <= r - validity);
        let end = start + lots[start..].partition_point(|lot| lot.ts <= r);
        let mut changes = Vec::new();
        for i in start..end {
            let before = p.remaining[i];
            if before == 0 {
                continue;
            }
            let take = need.min(before);
            p.remaining[i] = before - take;
            need -= take;
            changes.push((i, Some(before)));
            if need == 0 {
                break;
            }
        }
        p.unbacked += need;
        changes
    }

    fn has_lots_expiring(&self, after: i64, upto: i64, validity: i64, bucket_ms: i64) -> bool {
        let lots = self.lots();
        match (lots.first(), lots.last()) {
            (Some(first), Some(last)) => {
                first.ts < (upto + 1) * bucket_ms - validity && last.ts >= (after + 1) * bucket_ms - validity
            }
            _ => false,
        }
    }

    /// (expiry bucket, remaining) of the lots whose expiry bucket is in (after, upto].
    fn lots_expiring(&self, after: i64, upto: i64, validity: i64, bucket_ms: i64) -> Vec<(i64, i128)> {
        let Some(p) = self.points.as_ref().filter(|_| self.has_lots_expiring(after, upto, validity, bucket_ms)) else {
            return Vec::new();
        };
        let first_ts = (after + 1) * bucket_ms - validity;
        let end_ts = (upto + 1) * bucket_ms - validity;
        let start = p.lots.partition_point(|lot| lot.ts < first_ts);
        let end = start + p.lots[start..].partition_point(|lot| lot.ts < end_ts);
        (start..end)
            .map(|i| (floor_div(p.lots[i].ts + validity, bucket_ms), p.remaining[i]))
            .collect()
    }

    /// `MemberState.add_purchase_day`.
    fn add_purchase_day(&mut self, day: i64, amount: Num) {
        match self.purchase_days.binary_search_by_key(&day, |entry| entry.0) {
            Ok(at) => self.purchase_days[at].1 = self.purchase_days[at].1.plus(amount),
            Err(at) => self.purchase_days.insert(at, (day, amount)),
        }
    }

    fn add_month(&mut self, month: i64) -> bool {
        match self.months.binary_search(&month) {
            Ok(_) => false,
            Err(at) => {
                self.months.insert(at, month);
                true
            }
        }
    }
}

impl PointLots {
    fn reallocate(&mut self, validity: i64, inserted: Option<usize>) -> LotChanges {
        let mut before: Vec<Option<i128>> = self.remaining.iter().map(|r| Some(*r)).collect();
        if let Some(index) = inserted {
            before.insert(index, None);
        }
        let (remaining, unbacked) = allocate_points(&self.lots, &self.redemptions, validity);
        self.remaining = remaining;
        self.unbacked = unbacked;
        before
            .into_iter()
            .zip(self.remaining.iter())
            .enumerate()
            .filter(|(_, (old, new))| *old != Some(**new))
            .map(|(i, (old, _))| (i, old))
            .collect()
    }
}

// ---- aggregates -------------------------------------------------------------------------

const SUM_NAMES: [&str; 21] = [
    "points_earned", "points_redeemed", "member_revenue", "member_orders", "guest_revenue",
    "guest_orders", "member_margin", "member_margin_orders", "guest_margin", "guest_margin_orders",
    "surveys", "nps_n", "nps_net", "nps_n_member", "nps_net_member", "nps_n_guest", "nps_net_guest",
    "csat_n", "csat_pos", "lot_points", "lot_remaining",
];
const POINTS_EARNED: usize = 0;
const POINTS_REDEEMED: usize = 1;
const MEMBER_SUMS: [usize; 4] = [2, 3, 6, 7];
const GUEST_SUMS: [usize; 4] = [4, 5, 8, 9];
const SURVEYS: usize = 10;
const NPS_N: usize = 11;
const NPS_NET: usize = 12;
const CSAT_N: usize = 17;
const CSAT_POS: usize = 18;
const LOT_POINTS: usize = 19;
const LOT_REMAINING: usize = 20;
const NO_FLOOR: i64 = -(1 << 62);

/// `kpis.Aggregates` without segments, mentions (kept in Python) and CLV.
struct Aggs {
    hists: [Map<i64, i64>; 8],
    by_channel: Map<u32, Map<i64, i64>>,
    tiers: Map<u32, i64>,
    sums: Vec<Map<i64, Num>>,
    members: i64,
    purchasers: i64,
    lifetime_spend: Num,
    points_balance: i128,
    unbacked: i128,
    cohort_members: Map<i64, i64>,
    cohort_active: Map<i64, Map<i64, i64>>,
    cohort_max: Map<i64, Map<i64, i64>>,
    floor: i64,
    // what changed since the last export, once there was one: (histogram, bucket), histograms
    // numbered 0-7 (hists) then 8-28 (sums); `changed_all` after a collapse
    tracking: bool,
    changed: Set<(u8, i64)>,
    changed_all: bool,
}

impl Aggs {
    fn new() -> Aggs {
        Aggs {
            hists: Default::default(),
            by_channel: Map::default(),
            tiers: Map::default(),
            sums: (0..SUM_NAMES.len()).map(|_| Map::default()).collect(),
            members: 0,
            purchasers: 0,
            lifetime_spend: Num::I(0),
            points_balance: 0,
            unbacked: 0,
            cohort_members: Map::default(),
            cohort_active: Map::default(),
            cohort_max: Map::default(),
            floor: NO_FLOOR,
            tracking: false,
            changed: Set::default(),
            changed_all: true,
        }
    }

    #[inline]
    fn changed(&mut self, histogram: usize, bucket: i64) {
        if self.tracking {
            self.changed.insert((histogram as u8, bucket));
        }
    }

    /// `kpis._add` to a count histogram.
    #[inline]
    fn count(&mut self, hist: usize, bucket: i64, amount: i64) {
        add_count(&mut self.hists[hist], bucket, amount);
        self.changed(hist, bucket);
    }

    /// `kpis._add` to a sum.
    #[inline]
    fn num(&mut self, sum: usize, bucket: i64, amount: Num) {
        add_num(&mut self.sums[sum], bucket, amount);
        self.changed(8 + sum, bucket);
    }

    /// `hist[bucket] = hist.get(bucket, 0) + amount` on a sum (an event sum keeps a zero).
    #[inline]
    fn keep(&mut self, sum: usize, bucket: i64, amount: Num) {
        sum_num(&mut self.sums[sum], bucket, amount);
        self.changed(8 + sum, bucket);
    }

    fn clamp(&self, bucket: i64) -> i64 {
        bucket.max(self.floor)
    }

    fn move_member(&mut self, old: Option<&View>, new: &View) {
        let Some(old) = old else {
            self.members += 1;
            for i in 0..8 {
                if let Some(after) = new.buckets[i] {
                    let after = self.clamp(after);
                    self.count(i, after, 1);
                }
            }
            let enrolled = new.buckets[ENROLLED].map(|e| self.clamp(e)).unwrap_or(NO_FLOOR);
            add_count(self.by_channel.entry(new.channel).or_default(), enrolled, 1);
            add_count(&mut self.tiers, new.tier, 1);
            return;
        };
        for i in 0..8 {
            let (before, after) = (old.buckets[i], new.buckets[i]);
            if before != after {
                if let Some(before) = before {
                    let before = self.clamp(before);
                    self.count(i, before, -1);
                }
                if let Some(after) = after {
                    let after = self.clamp(after);
                    self.count(i, after, 1);
                }
            }
        }
        if old.buckets[ENROLLED] != new.buckets[ENROLLED] || old.channel != new.channel {
            let before = old.buckets[ENROLLED].map(|e| self.clamp(e)).unwrap_or(NO_FLOOR);
            let after = new.buckets[ENROLLED].map(|e| self.clamp(e)).unwrap_or(NO_FLOOR);
            add_count(self.by_channel.entry(old.channel).or_default(), before, -1);
            add_count(self.by_channel.entry(new.channel).or_default(), after, 1);
        }
        if old.tier != new.tier {
            add_count(&mut self.tiers, old.tier, -1);
            add_count(&mut self.tiers, new.tier, 1);
        }
    }

    fn add_cohort(&mut self, cohort: i64, months: &[i64], sign: i64) {
        add_count(&mut self.cohort_members, cohort, sign);
        if let Some(last) = months.last() {
            let active = self.cohort_active.entry(cohort).or_default();
            for month in months {
                if *month >= cohort {
                    add_count(active, *month, sign);
                }
            }
            add_count(self.cohort_max.entry(cohort).or_default(), *last, sign);
        }
    }

    fn add_cohort_month(&mut self, cohort: i64, month: i64, old_max: Option<i64>) {
        if month >= cohort {
            add_count(self.cohort_active.entry(cohort).or_default(), month, 1);
        }
        if old_max.map_or(true, |m| month > m) {
            let latest = self.cohort_max.entry(cohort).or_default();
            if let Some(m) = old_max {
                add_count(latest, m, -1);
            }
            add_count(latest, month, 1);
        }
    }

    /// `Aggregates.collapse` (the mentions are folded by the Python side).
    fn collapse(&mut self, floor: i64) {
        if floor <= self.floor {
            return;
        }
        fn fold(hist: &mut Map<i64, i64>, floor: i64) {
            let mut total = 0;
            hist.retain(|key, value| {
                if *key <= floor {
                    total += *value;
                    false
                } else {
                    true
                }
            });
            if total != 0 {
                hist.insert(floor, total);
            }
        }
        for hist in self.hists.iter_mut().chain(self.by_channel.values_mut()) {
            fold(hist, floor);
        }
        for (i, hist) in self.sums.iter_mut().enumerate() {
            if i == LOT_POINTS || i == LOT_REMAINING {
                // counts of points: ints only
                let mut total = Num::I(0);
                hist.retain(|key, value| {
                    if *key <= floor {
                        total = total.plus(*value);
                        false
                    } else {
                        true
                    }
                });
                if !total.is_zero() {
                    hist.insert(floor, total);
                }
            } else {
                hist.retain(|key, _| *key > floor);
            }
        }
        self.floor = floor;
        self.changed_all = true;
        self.changed.clear();
    }
}

/// `kpis.Contribution`: a whole member's part of a member-dimension segment.
struct Contribution {
    view: View,
    spend: Num,
    balance: i128,
    purchaser: bool,
    unbacked: i128,
    lots: Vec<(i64, i128, i128)>, // (expiry bucket, points, remaining) per lot
}

impl Contribution {
    /// Python's `==` of the two tuples.
    fn same(&self, other: &Contribution) -> bool {
        self.view == other.view
            && self.spend.same(other.spend)
            && self.balance == other.balance
            && self.purchaser == other.purchaser
            && self.unbacked == other.unbacked
            && self.lots == other.lots
    }
}

impl Aggs {
    fn with_floor(floor: i64) -> Aggs {
        let mut aggs = Aggs::new();
        aggs.floor = floor;
        aggs
    }

    /// `Aggregates.add`: an event sum (nothing at or before the floor).
    fn add(&mut self, sum: usize, bucket: i64, amount: Num) {
        if bucket > self.floor {
            self.num(sum, bucket, amount);
        }
    }

    fn add_lots(&mut self, lots: &[(i64, i128, i128)], sign: i64) {
        for (expiry, points, remaining) in lots {
            let expiry = self.clamp(*expiry);
            self.num(LOT_POINTS, expiry, Num::I(sign as i128 * points));
            self.num(LOT_REMAINING, expiry, Num::I(sign as i128 * remaining));
        }
    }

    /// `Aggregates.add_contribution`.
    fn add_contribution(&mut self, c: &Contribution, sign: i64) {
        for i in 0..8 {
            if let Some(bucket) = c.view.buckets[i] {
                let bucket = self.clamp(bucket);
                self.count(i, bucket, sign);
            }
        }
        self.members += sign;
        self.lifetime_spend = self.lifetime_spend.plus(c.spend.times(sign));
        self.points_balance += sign as i128 * c.balance;
        self.purchasers += sign * c.purchaser as i64;
        self.unbacked += sign as i128 * c.unbacked;
        if !c.lots.is_empty() {
            self.add_lots(&c.lots, sign);
        }
    }

    /// `Aggregates.replace_contribution`.
    fn replace_contribution(&mut self, old: &Contribution, new: &Contribution) {
        for i in 0..8 {
            let (before, after) = (old.view.buckets[i], new.view.buckets[i]);
            if before != after {
                if let Some(before) = before {
                    let before = self.clamp(before);
                    self.count(i, before, -1);
                }
                if let Some(after) = after {
                    let after = self.clamp(after);
                    self.count(i, after, 1);
                }
            }
        }
        self.lifetime_spend = self.lifetime_spend.plus(new.spend.minus(old.spend));
        self.points_balance += new.balance - old.balance;
        self.purchasers += new.purchaser as i64 - old.purchaser as i64;
        self.unbacked += new.unbacked - old.unbacked;
        if old.lots != new.lots {
            self.add_lots(&old.lots, -1);
            self.add_lots(&new.lots, 1);
        }
    }
}

/// Range sums over a count histogram (kpis._Ranges of ints, unclamped).
struct Ranges {
    keys: Vec<i64>,
    prefix: Vec<i64>,
}

impl Ranges {
    fn new(hist: &Map<i64, i64>) -> Ranges {
        let mut items: Vec<(i64, i64)> = hist.iter().map(|(k, v)| (*k, *v)).collect();
        items.sort_unstable();
        let mut prefix = Vec::with_capacity(items.len() + 1);
        prefix.push(0);
        let mut total = 0;
        for (_, value) in &items {
            total += value;
            prefix.push(total);
        }
        Ranges { keys: items.into_iter().map(|(k, _)| k).collect(), prefix }
    }

    fn between(&self, lo: i64, hi: i64) -> i64 {
        if hi < lo {
            return 0;
        }
        let start = self.keys.partition_point(|k| *k < lo);
        let stop = self.keys.partition_point(|k| *k <= hi);
        self.prefix[stop] - self.prefix[start]
    }

    fn since(&self, lo: i64) -> i64 {
        let start = self.keys.partition_point(|k| *k < lo);
        self.prefix[self.keys.len()] - self.prefix[start]
    }
}

// ---- the core ---------------------------------------------------------------------------

/// The segment dimensions of SPEC 4.2 (catalogue.MEMBER_DIMENSIONS, then ORDER_DIMENSIONS).
const DIMENSIONS: [&str; 5] = ["tier", "enrollment_channel", "home_store", "channel", "store_id"];
const TIER: u8 = 0;
const ENROLLMENT_CHANNEL: u8 = 1;
const CHANNEL: u8 = 3;

/// A member's purchase totals by UTC day, sorted by day (CLV).
type PurchaseDays = Vec<(i64, Num)>;

/// Why `Core::process_lines` stopped.
const LINES_END: u8 = 0;
const LINES_PYTHON: u8 = 1;
const LINES_EMIT: u8 = 2;

/// A member signal, formatted by the Python side: (member, signal, K, last touch, points,
/// expiry bucket).
struct SignalRecord {
    member: u32,
    signal: &'static str,
    k: i64,
    last_touch: i64,
    notice: Option<(i128, i64)>,
}

/// A clock move's churn snapshots: (the oldest bucket still needed, [(K, [(w, num, den)])]).
type ChurnRecord = (i64, Vec<(i64, Vec<(i64, i64, i64)>)>);

#[pyclass(module = "stream_kpis._native", unsendable)]
pub struct Core {
    reader: Reader,
    bucket_ms: i64,
    validity: Option<i64>,
    at_risk: i64,
    horizon: i64,
    notice: i64,
    dedupe_per_member: usize,
    guest_dedupe: usize,
    cohorts: bool,
    reach: i64,
    floor_step: i64,
    bounded_history: bool,
    churn_windows: Vec<i64>,
    max_window: i64,
    record_churn_history: bool,
    event_clock: bool,
    keep_signals: bool,

    members: Vec<Member>,
    member_index: Map<Rc<[u8]>, u32>,
    names: Vec<Py<PyString>>,
    name_index: Map<Box<[u8]>, u32>,
    aggs: Aggs,
    // SPEC 4.2: the dimensions (indexes into DIMENSIONS) in the settings' order, and the
    // aggregates of each (dimension, value)
    member_dims: Vec<u8>,
    order_dims: Vec<u8>,
    segments: Map<(u8, u32), Aggs>,
    seen: Set<Box<[u8]>>,
    seen_order: VecDeque<Box<[u8]>>,
    max_ts: Option<i64>,
    k: Option<i64>,
    touch_index: Map<i64, Set<u32>>,
    forgotten_upto: Option<i64>,
    expiry_index: Map<i64, Set<u32>>,
    #[pyo3(get)]
    applied: u64,
    #[pyo3(get)]
    duplicates: u64,

    signals: Vec<SignalRecord>,
    scratch: Vec<u8>,
    comments: Vec<(PyObject, i64)>,
    clv: bool,
    // with CLV, per purchase: the member's purchase days before it (None: none) and after it,
    // for the Python side's SufficientStats (Processor._move_clv)
    clv_moves: Vec<(Option<PurchaseDays>, PurchaseDays)>,
    churn: Vec<ChurnRecord>,
}

impl Core {
    fn intern(&mut self, py: Python<'_>, text: &[u8]) -> PyResult<u32> {
        if let Some(id) = self.name_index.get(text) {
            return Ok(*id);
        }
        let id = u32::try_from(self.names.len()).map_err(|_| PyValueError::new_err("too many names"))?;
        self.names.push(text_object(py, text)?.unbind());
        self.name_index.insert(text.into(), id);
        Ok(id)
    }

    fn process_one(&mut self, py: Python<'_>, ev: &Ev<'_>) -> PyResult<()> {
        let ts = ev.ts;
        if self.max_ts.map_or(true, |m| ts > m) {
            self.max_ts = Some(ts);
            let bucket = floor_div(ts, self.bucket_ms);
            if self.event_clock && self.k.map_or(true, |k| bucket > k) {
                self.advance_to(bucket);
            }
        }
        if ev.member_id.is_none() || ev.kind == SURVEY {
            if self.seen_without_member(ev) {
                self.duplicates += 1;
                return Ok(());
            }
            self.event_sums(py, ev, ev.member_id.is_some())?;
            self.applied += 1;
            return Ok(());
        }
        self.apply_member_event(py, ev)
    }

    fn seen_without_member(&mut self, ev: &Ev<'_>) -> bool {
        let member: &[u8] = ev.member_id.as_deref().unwrap_or(b"");
        let mut key = Vec::with_capacity(member.len() + ev.event_id.len() + 3);
        key.push(TYPE_LETTERS[ev.kind as usize]);
        key.push(b'|');
        key.extend_from_slice(member);
        key.push(b'|');
        key.extend_from_slice(&ev.event_id);
        if self.seen.contains(&key[..]) {
            return true;
        }
        let key: Box<[u8]> = key.into();
        self.seen.insert(key.clone());
        self.seen_order.push_back(key);
        if self.seen_order.len() > self.guest_dedupe {
            if let Some(oldest) = self.seen_order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        false
    }

    fn event_sums(&mut self, py: Python<'_>, ev: &Ev<'_>, member: bool) -> PyResult<()> {
        let bucket = floor_div(ev.ts, self.bucket_ms);
        let order_segments =
            if !self.order_dims.is_empty() && ev.kind == PURCHASE { self.order_segments(py, ev)? } else { Vec::new() };
        if bucket <= self.aggs.floor || ev.kind == ENROLLMENT {
            return Ok(());
        }
        let aggs = &mut self.aggs;
        match ev.kind {
            PURCHASE => {
                let who = if member { MEMBER_SUMS } else { GUEST_SUMS };
                let amount = ev.amount.unwrap_or(Num::I(0));
                for key in &order_segments {
                    let segment = self.segments.get_mut(key).unwrap();
                    segment.add(who[0], bucket, amount);
                    segment.add(who[1], bucket, Num::I(1));
                    if let Some(margin) = ev.margin {
                        segment.add(who[2], bucket, margin);
                        segment.add(who[3], bucket, Num::I(1));
                    }
                }
                aggs.keep(who[0], bucket, ev.amount.unwrap_or(Num::I(0)));
                aggs.keep(who[1], bucket, Num::I(1));
                if let Some(margin) = ev.margin {
                    aggs.keep(who[2], bucket, margin);
                    aggs.keep(who[3], bucket, Num::I(1));
                }
                if member && ev.points != 0 {
                    aggs.keep(POINTS_EARNED, bucket, Num::I(ev.points));
                }
            }
            REDEMPTION => aggs.keep(POINTS_REDEEMED, bucket, Num::I(ev.points)),
            SURVEY => {
                aggs.num(SURVEYS, bucket, Num::I(1));
                if let Some(nps) = ev.nps {
                    let score = if nps >= 9 { 1 } else if nps <= 6 { -1 } else { 0 };
                    let offset = if member { 2 } else { 4 };
                    aggs.num(NPS_N, bucket, Num::I(1));
                    aggs.num(NPS_N + offset, bucket, Num::I(1));
                    if score != 0 {
                        aggs.num(NPS_NET, bucket, Num::I(score));
                        aggs.num(NPS_NET + offset, bucket, Num::I(score));
                    }
                }
                if let Some(csat) = ev.csat {
                    aggs.num(CSAT_N, bucket, Num::I(1));
                    if csat >= 4 {
                        aggs.num(CSAT_POS, bucket, Num::I(1));
                    }
                }
                match &ev.comment {
                    Some(Comment::Object(comment)) if comment.is_truthy()? => {
                        self.comments.push((comment.clone().unbind(), bucket));
                    }
                    Some(Comment::Text(comment)) if !comment.is_empty() => {
                        self.comments.push((PyString::new(py, comment).into_any().unbind(), bucket));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn apply_member_event(&mut self, py: Python<'_>, ev: &Ev<'_>) -> PyResult<()> {
        let member_key = ev.member_id.as_deref().unwrap();
        let mut key = std::mem::take(&mut self.scratch); // no allocation per event
        key.clear();
        key.push(TYPE_LETTERS[ev.kind as usize]);
        key.extend_from_slice(&ev.event_id);
        let result = self.apply_keyed(py, ev, member_key, &key);
        self.scratch = key;
        result
    }

    fn apply_keyed(&mut self, py: Python<'_>, ev: &Ev<'_>, member_key: &[u8], key: &[u8]) -> PyResult<()> {
        let bucket_ms = self.bucket_ms;
        let (index, old_view) = match self.member_index.get(member_key) {
            Some(index) => {
                let index = *index;
                let member = &mut self.members[index as usize];
                if member.seen(key, self.dedupe_per_member) {
                    self.duplicates += 1;
                    return Ok(());
                }
                (index, Some(member.view(bucket_ms)))
            }
            None => {
                let index = u32::try_from(self.members.len())
                    .map_err(|_| PyValueError::new_err("more than 2^32 members in one native core"))?;
                let id: Rc<[u8]> = member_key.into();
                let mut member = Member::new(id.clone());
                member.seen(key, self.dedupe_per_member);
                self.members.push(member);
                self.member_index.insert(id, index);
                (index, None)
            }
        };
        // interned before borrowing the member: an enrollment's channel, a tier
        let channel = match (&ev.channel, ev.kind) {
            (Some(channel), ENROLLMENT) if !channel.is_empty() => self.intern(py, channel)?,
            _ => 0,
        };
        let tier = match &ev.tier {
            Some(tier) if ev.kind != REDEMPTION => Some(self.intern(py, tier)?),
            _ => None,
        };
        let store = match &ev.store_id {
            Some(store) if ev.kind == PURCHASE && !store.is_empty() => Some(self.intern(py, store)?),
            _ => None,
        };
        let segments_before =
            if !self.member_dims.is_empty() && old_view.is_some() { Some(self.segments_of(index)) } else { None };
        let validity = self.validity;
        let member = &mut self.members[index as usize];
        let (old_enrolled, old_max) = if self.cohorts && old_view.is_some() {
            (member.enrolled_at(), member.months.last().copied())
        } else {
            (None, None)
        };
        let had_purchase = member.purchase_count > 0;
        let points_event = validity.is_some() && (ev.kind == REDEMPTION || ev.points != 0);
        let old_unbacked = member.unbacked();
        let changes = member.apply(ev, validity, channel, tier, store);
        let new_view = member.view(bucket_ms);
        let unbacked = member.unbacked();
        self.aggs.move_member(old_view.as_ref(), &new_view);
        match ev.kind {
            PURCHASE => {
                self.aggs.lifetime_spend = self.aggs.lifetime_spend.plus(ev.amount.unwrap_or(Num::I(0)));
                self.aggs.points_balance += ev.points;
                if !had_purchase {
                    self.aggs.purchasers += 1;
                }
            }
            REDEMPTION => self.aggs.points_balance -= ev.points,
            _ => {}
        }
        if points_event {
            if let (Some(changes), Some(validity)) = (changes, validity) {
                self.move_lots(index, &changes, validity);
            }
            self.aggs.unbacked += unbacked - old_unbacked;
        }
        self.event_sums(py, ev, true)?;
        if self.cohorts {
            self.move_cohort(index, ev, old_view.is_none(), old_enrolled, old_max);
        }
        if self.clv && ev.kind == PURCHASE {
            let member = &mut self.members[index as usize];
            let before = if member.purchase_days.is_empty() { None } else { Some(member.purchase_days.clone()) };
            member.add_purchase_day(floor_div(ev.ts, 86_400_000), ev.amount.unwrap_or(Num::I(0)));
            self.clv_moves.push((before, member.purchase_days.clone()));
        }
        if !self.member_dims.is_empty() {
            let after = self.segments_of(index);
            self.move_segments(segments_before, after);
        }
        let old_touch = old_view.and_then(|v| v.buckets[LAST_TOUCH]);
        let touch = new_view.buckets[LAST_TOUCH];
        if touch != old_touch {
            if let Some(old_touch) = old_touch {
                if let Some(indexed) = self.touch_index.get_mut(&old_touch) {
                    indexed.remove(&index);
                }
            }
            if let Some(touch) = touch {
                if self.forgotten_upto.map_or(true, |f| touch > f) {
                    self.touch_index.entry(touch).or_default().insert(index);
                }
                let status = self.members[index as usize].status;
                if status != ACTIVE || self.k.map_or(true, |k| touch <= k - self.at_risk) {
                    self.update_status(index);
                }
            }
        }
        if let (true, Some(k), Some(validity)) = (points_event, self.k, validity) {
            if self.members[index as usize].has_lots_expiring(k, k + self.notice, validity, bucket_ms) {
                self.expiry_notices(index, k);
            }
        }
        self.applied += 1;
        Ok(())
    }

    // ---- segments (SPEC 4.2) -------------------------------------------------------------

    fn segment(&mut self, dimension: u8, value: u32) -> &mut Aggs {
        let floor = self.aggs.floor;
        self.segments.entry((dimension, value)).or_insert_with(|| Aggs::with_floor(floor))
    }

    /// `Processor._segments_of`: the member's contribution and its value of each member
    /// dimension.
    fn segments_of(&self, index: u32) -> (Contribution, Vec<u32>) {
        let member = &self.members[index as usize];
        let lots = match (self.validity, member.points.as_ref()) {
            (Some(validity), Some(p)) => p
                .lots
                .iter()
                .zip(&p.remaining)
                .map(|(lot, remaining)| (floor_div(lot.ts + validity, self.bucket_ms), lot.points, *remaining))
                .collect(),
            _ => Vec::new(),
        };
        let contribution = Contribution {
            view: member.view(self.bucket_ms),
            spend: member.lifetime_spend,
            balance: member.balance,
            purchaser: member.purchase_count > 0,
            unbacked: member.unbacked(),
            lots,
        };
        let values = self
            .member_dims
            .iter()
            .map(|d| match *d {
                TIER => member.tier,
                ENROLLMENT_CHANNEL => member.channel,
                _ => member.home_store,
            })
            .collect();
        (contribution, values)
    }

    /// `Processor._move_segments`.
    fn move_segments(&mut self, before: Option<(Contribution, Vec<u32>)>, after: (Contribution, Vec<u32>)) {
        let Some(before) = before else {
            for (i, value) in after.1.iter().enumerate() {
                self.segment(self.member_dims[i], *value).add_contribution(&after.0, 1);
            }
            return;
        };
        if before.0.same(&after.0) && before.1 == after.1 {
            return;
        }
        for (i, (old, new)) in before.1.iter().zip(&after.1).enumerate() {
            let dimension = self.member_dims[i];
            if old == new {
                self.segment(dimension, *new).replace_contribution(&before.0, &after.0);
            } else {
                self.segment(dimension, *old).add_contribution(&before.0, -1);
                self.segment(dimension, *new).add_contribution(&after.0, 1);
            }
        }
    }

    /// `Processor._order_segments`: the (dimension, value) of a purchase's order dimensions,
    /// each segment made when first seen.
    fn order_segments(&mut self, py: Python<'_>, ev: &Ev<'_>) -> PyResult<Vec<(u8, u32)>> {
        let mut out = Vec::with_capacity(self.order_dims.len());
        for i in 0..self.order_dims.len() {
            let dimension = self.order_dims[i];
            let value = if dimension == CHANNEL { &ev.channel } else { &ev.store_id };
            let value = match value {
                Some(text) if !text.is_empty() => self.intern(py, text)?,
                _ => 0,
            };
            self.segment(dimension, value);
            out.push((dimension, value));
        }
        Ok(out)
    }

    fn move_lots(&mut self, index: u32, changes: &LotChanges, validity: i64) {
        let Some(p) = self.members[index as usize].points.as_ref() else { return };
        let mut deltas = Vec::with_capacity(changes.len());
        for (i, before) in changes {
            let lot = &p.lots[*i];
            let expiry = floor_div(lot.ts + validity, self.bucket_ms);
            match before {
                None => {
                    deltas.push((expiry, lot.points, p.remaining[*i]));
                    self.expiry_index.entry(expiry).or_default().insert(index);
                }
                Some(before) => deltas.push((expiry, 0, p.remaining[*i] - before)),
            }
        }
        self.aggs.add_lots(&deltas, 1);
    }

    fn move_cohort(&mut self, index: u32, ev: &Ev<'_>, new_member: bool, old_enrolled: Option<i64>, old_max: Option<i64>) {
        let member = &mut self.members[index as usize];
        let mut new_month = None;
        if ev.kind == PURCHASE || ev.kind == REDEMPTION {
            let month = month_of(floor_div(ev.ts, self.bucket_ms) * self.bucket_ms);
            if Some(month) != old_max && member.add_month(month) {
                new_month = Some(month);
            }
        }
        let enrolled = member.enrolled_at().unwrap_or(0);
        let cohort = month_of(enrolled);
        if new_member {
            let months = member.months.clone();
            self.aggs.add_cohort(cohort, &months, 1);
            return;
        }
        if Some(enrolled) != old_enrolled {
            let before = month_of(old_enrolled.unwrap_or(0));
            if before != cohort {
                let months = member.months.clone();
                let without: Vec<i64> = months.iter().copied().filter(|m| Some(*m) != new_month).collect();
                self.aggs.add_cohort(before, &without, -1);
                self.aggs.add_cohort(cohort, &months, 1);
                return;
            }
        }
        if let Some(month) = new_month {
            self.aggs.add_cohort_month(cohort, month, old_max);
        }
    }

    // ---- clock and member signals --------------------------------------------------------

    fn newly_passed(index: &Map<i64, Set<u32>>, after: i64, upto: i64) -> Vec<i64> {
        let mut buckets: Vec<i64> = if upto - after > index.len() as i64 {
            index.keys().copied().filter(|b| after < *b && *b <= upto).collect()
        } else {
            ((after + 1)..=upto).filter(|b| index.contains_key(b)).collect()
        };
        buckets.sort_unstable();
        buckets
    }

    fn members_of(&self, index: &Map<i64, Set<u32>>, bucket: i64) -> Vec<u32> {
        index.get(&bucket).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    fn sort_signals(&mut self, start: usize) {
        let members = &self.members;
        if self.signals.len() - start > 1 {
            self.signals[start..].sort_by(|a, b| members[a.member as usize].key.cmp(&members[b.member as usize].key));
        }
    }

    fn advance_to(&mut self, k: i64) {
        let previous = self.k;
        if previous.is_some_and(|p| k <= p) {
            return;
        }
        if let (true, Some(previous)) = (self.record_churn_history, previous) {
            self.record_churn(previous, k);
        }
        self.k = Some(k);
        let (touch_buckets, expiry_buckets) = match previous {
            None => {
                let mut touch: Vec<i64> = self.touch_index.keys().copied().filter(|b| *b <= k - self.at_risk).collect();
                touch.sort_unstable();
                let mut expiry: Vec<i64> = self.expiry_index.keys().copied().filter(|b| *b <= k + self.notice).collect();
                expiry.sort_unstable();
                (touch, expiry)
            }
            Some(previous) => {
                let mut touch = Self::newly_passed(&self.touch_index, previous - self.at_risk, k - self.at_risk);
                touch.extend(Self::newly_passed(&self.touch_index, previous - self.horizon, k - self.horizon));
                let expiry = Self::newly_passed(&self.expiry_index, previous + self.notice, k + self.notice);
                (touch, expiry)
            }
        };
        // The Python core visits a bucket's members in id order, so that the signals of one
        // as_of come in the same order in every run. A visit changes only that member, so the
        // same signals come from visiting them in any order and sorting the bucket's signals
        // by member id (stable: a member's own notices keep their order): fewer to sort.
        for bucket in touch_buckets {
            let start = self.signals.len();
            for member in self.members_of(&self.touch_index, bucket) {
                self.update_status(member);
            }
            self.sort_signals(start);
        }
        for bucket in expiry_buckets {
            let start = self.signals.len();
            for member in self.members_of(&self.expiry_index, bucket) {
                self.expiry_notices(member, k);
            }
            self.sort_signals(start);
        }
        self.forget_churned();
        self.trim_history();
    }

    fn forget_churned(&mut self) {
        let Some(k) = self.k else { return };
        let upto = k - self.horizon;
        let buckets: Vec<i64> = match self.forgotten_upto {
            Some(after) if upto <= after => return,
            Some(after) => Self::newly_passed(&self.touch_index, after, upto),
            None => self.touch_index.keys().copied().filter(|b| *b <= upto).collect(),
        };
        for bucket in buckets {
            self.touch_index.remove(&bucket);
        }
        self.forgotten_upto = Some(upto);
    }

    fn trim_history(&mut self) {
        let Some(k) = self.k else { return };
        if !self.bounded_history {
            return;
        }
        let step = self.floor_step;
        let floor = (floor_div(k - self.reach, step) - 1) * step;
        if floor > self.aggs.floor {
            self.aggs.collapse(floor);
            for segment in self.segments.values_mut() {
                segment.collapse(floor);
            }
        }
    }

    fn record_churn(&mut self, previous: i64, k: i64) {
        let oldest_needed = k - self.max_window;
        let h = self.horizon;
        let ks = previous.max(oldest_needed)..k;
        let touch_hist = &self.aggs.hists[LAST_TOUCH];
        let enrolled_hist = &self.aggs.hists[ENROLLED];
        let snapshots = if ks.end - ks.start <= 4 {
            // the usual move of one bucket: a pass over the two histograms per bucket, cheaper
            // than sorting them
            let windows = &self.churn_windows;
            ks.map(|at| {
                let (mut num, mut touched, mut enrolled) =
                    (vec![0; windows.len()], vec![0; windows.len()], vec![0; windows.len()]);
                for (bucket, count) in touch_hist {
                    for (j, w) in windows.iter().enumerate() {
                        if *bucket > at - w - h {
                            touched[j] += count;
                            if *bucket <= at - h {
                                num[j] += count;
                            }
                        }
                    }
                }
                for (bucket, count) in enrolled_hist {
                    for (j, w) in windows.iter().enumerate() {
                        if *bucket > at - w {
                            enrolled[j] += count;
                        }
                    }
                }
                let pairs = (0..windows.len()).map(|j| (windows[j], num[j], touched[j] - enrolled[j])).collect();
                (at, pairs)
            })
            .collect()
        } else {
            let touch = Ranges::new(touch_hist);
            let enrolled = Ranges::new(enrolled_hist);
            ks.map(|at| {
                let pairs = self
                    .churn_windows
                    .iter()
                    .map(|w| {
                        let w = *w;
                        (w, touch.between(at - w - h + 1, at - h), touch.since(at - w - h + 1) - enrolled.since(at - w + 1))
                    })
                    .collect();
                (at, pairs)
            })
            .collect()
        };
        self.churn.push((oldest_needed, snapshots));
    }

    fn status_of(&self, touch_bucket: i64, k: i64) -> u8 {
        if touch_bucket <= k - self.horizon {
            CHURNED
        } else if touch_bucket <= k - self.at_risk {
            AT_RISK
        } else {
            ACTIVE
        }
    }

    fn update_status(&mut self, index: u32) {
        let Some(k) = self.k else { return };
        let member = &self.members[index as usize];
        let Some(touch) = member.last_touch() else { return };
        let status = self.status_of(floor_div(touch, self.bucket_ms), k);
        if status == member.status {
            return;
        }
        let previous = member.status;
        self.members[index as usize].status = status;
        if status == ACTIVE && previous == AT_RISK {
            return;
        }
        let signal = if previous == CHURNED && status != CHURNED {
            "reactivated"
        } else if status == AT_RISK {
            "at_risk"
        } else if status == CHURNED {
            "churned"
        } else {
            return;
        };
        if self.keep_signals {
            self.signals.push(SignalRecord { member: index, signal, k, last_touch: touch, notice: None });
        }
    }

    fn expiry_notices(&mut self, index: u32, k: i64) {
        let Some(validity) = self.validity else { return };
        let horizon = k + self.notice;
        let bucket_ms = self.bucket_ms;
        let member = &mut self.members[index as usize];
        let touch = member.last_touch().unwrap_or(0);
        let expiring = member.lots_expiring(k, horizon, validity, bucket_ms);
        let Some(p) = member.points.as_mut() else { return };
        let mut due: Vec<(i64, i128)> = Vec::new();
        for (expiry, remaining) in expiring {
            if remaining != 0 && !p.notified_expiry.contains(&expiry) {
                match due.iter_mut().find(|(e, _)| *e == expiry) {
                    Some(entry) => entry.1 += remaining,
                    None => due.push((expiry, remaining)),
                }
            }
        }
        if due.is_empty() {
            return;
        }
        p.notified_expiry.retain(|e| *e > k);
        due.sort_unstable();
        for (expiry, points) in due {
            p.notified_expiry.push(expiry);
            if self.keep_signals {
                self.signals.push(SignalRecord {
                    member: index,
                    signal: "points_expiring",
                    k,
                    last_touch: touch,
                    notice: Some((points, expiry)),
                });
            }
        }
    }
}

fn count_dict<'py>(py: Python<'py>, hist: &Map<i64, i64>) -> PyResult<Bound<'py, PyDict>> {
    let mut items: Vec<(i64, i64)> = hist.iter().map(|(k, v)| (*k, *v)).collect();
    items.sort_unstable();
    let dict = PyDict::new(py);
    for (key, value) in items {
        dict.set_item(key, value)?;
    }
    Ok(dict)
}

fn nested_dict<'py>(py: Python<'py>, hists: &Map<i64, Map<i64, i64>>) -> PyResult<Bound<'py, PyDict>> {
    let mut keys: Vec<i64> = hists.keys().copied().collect();
    keys.sort_unstable();
    let dict = PyDict::new(py);
    for key in keys {
        dict.set_item(key, count_dict(py, &hists[&key])?)?;
    }
    Ok(dict)
}

#[pymethods]
impl Core {
    /// `settings` as plain numbers (see native_core.NativeProcessor): buckets and bounds.
    #[new]
    #[pyo3(signature = (event_class, types, *, bucket_ms, validity_ms, at_risk, horizon, notice,
                        dedupe_per_member, guest_dedupe, cohorts, reach, floor_step,
                        bounded_history, windows, record_churn_history, event_clock, signals,
                        segments=Vec::new(), clv=false, sum_names=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        event_class: Bound<'_, PyType>,
        types: Vec<Bound<'_, PyString>>,
        bucket_ms: i64,
        validity_ms: Option<i64>,
        at_risk: i64,
        horizon: i64,
        notice: i64,
        dedupe_per_member: usize,
        guest_dedupe: usize,
        cohorts: bool,
        reach: i64,
        floor_step: i64,
        bounded_history: bool,
        windows: Vec<i64>,
        record_churn_history: bool,
        event_clock: bool,
        signals: bool,
        segments: Vec<String>,
        clv: bool,
        sum_names: Vec<String>,
    ) -> PyResult<Core> {
        if sum_names.iter().map(String::as_str).ne(SUM_NAMES.iter().copied()) {
            return Err(PyValueError::new_err(format!("the sums must be {SUM_NAMES:?} (kpis.SUM_NAMES)")));
        }
        let mut member_dims = Vec::new();
        let mut order_dims = Vec::new();
        for name in &segments {
            let dimension = DIMENSIONS
                .iter()
                .position(|d| d == name)
                .ok_or_else(|| PyValueError::new_err(format!("unknown segment dimension {name:?}")))?
                as u8;
            if dimension < CHANNEL {
                member_dims.push(dimension);
            } else {
                order_dims.push(dimension);
            }
        }
        if bucket_ms <= 0 || floor_step <= 0 || windows.is_empty() {
            return Err(PyValueError::new_err("bucket_ms and floor_step must be > 0, windows not empty"));
        }
        let unknown = PyString::new(py, "unknown");
        let mut name_index = Map::default();
        name_index.insert(Box::from(&b"unknown"[..]), 0u32);
        Ok(Core {
            reader: Reader::new(event_class, types)?,
            bucket_ms,
            validity: validity_ms,
            at_risk,
            horizon,
            notice,
            dedupe_per_member,
            guest_dedupe,
            cohorts,
            reach,
            floor_step,
            bounded_history,
            churn_windows: windows.iter().copied().filter(|w| *w <= horizon).collect(),
            max_window: *windows.iter().max().unwrap(),
            record_churn_history,
            event_clock,
            keep_signals: signals,
            members: Vec::new(),
            member_index: Map::default(),
            names: vec![unknown.unbind()],
            name_index,
            aggs: Aggs::new(),
            member_dims,
            order_dims,
            segments: Map::default(),
            seen: Set::default(),
            seen_order: VecDeque::new(),
            max_ts: None,
            k: None,
            touch_index: Map::default(),
            forgotten_upto: None,
            expiry_index: Map::default(),
            applied: 0,
            duplicates: 0,
            signals: Vec::new(),
            scratch: Vec::new(),
            comments: Vec::new(),
            clv,
            clv_moves: Vec::new(),
            churn: Vec::new(),
        })
    }

    /// Apply events in order (`Processor.process_batch`).
    fn process(&mut self, py: Python<'_>, events: &Bound<'_, PyList>) -> PyResult<()> {
        for event in events.iter() {
            let ev = self.reader.read(&event)?;
            self.process_one(py, &ev)?;
        }
        Ok(())
    }

    /// Read and apply JSON Lines from `lines[start]` on, as replay reads them (a line without
    /// its line break; a blank line skipped) and `EventParser.parse(line, kind)` would, until
    /// one of them needs the Python side. Returns (index, why, bucket): `LINES_END` (index =
    /// len(lines)); `LINES_PYTHON`: the line at index is one the JSON reader does not answer
    /// for (a dead letter, or a form only Python reads); `LINES_EMIT`: the event at index is in
    /// `bucket`, after `stop_bucket` (an evaluation of `--every` comes first).
    #[pyo3(signature = (lines, start, kind, max_event_bytes, stop_bucket=None))]
    fn process_lines(&mut self, py: Python<'_>, lines: &Bound<'_, PyList>, start: usize, kind: Option<&str>,
                     max_event_bytes: usize, stop_bucket: Option<i64>) -> PyResult<(usize, u8, i64)> {
        let kind = match kind {
            None => None,
            Some(name) => Some(type_index(name).ok_or_else(|| PyValueError::new_err(format!("unknown event type {name:?}")))?),
        };
        let count = lines.len();
        for index in start..count {
            let item = lines.get_item(index)?;
            let line = item.downcast::<PyBytes>()?.as_bytes();
            let end = line.iter().rposition(|b| *b != b'\r' && *b != b'\n').map_or(0, |i| i + 1);
            let line = &line[..end];
            // bytes.strip()'s white space: space, \t, \n, \v, \f, \r
            if line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')) {
                continue;
            }
            let Some(parsed) = json_event(line, kind, max_event_bytes) else {
                return Ok((index, LINES_PYTHON, 0));
            };
            let bucket = floor_div(parsed.ts, self.bucket_ms);
            if stop_bucket.is_some_and(|stop| bucket > stop) {
                return Ok((index, LINES_EMIT, bucket));
            }
            self.process_one(py, &Ev::of_parsed(parsed))?;
        }
        Ok((count, LINES_END, 0))
    }

    /// Move the as-of bucket to K (`Processor.advance`).
    fn advance(&mut self, k: i64) -> PyResult<()> {
        // event time is at most 2100 (events.py): far from where bucket arithmetic overflows
        if k.checked_mul(self.bucket_ms).map_or(true, |ms| ms.abs() > 1 << 61) {
            return Err(PyValueError::new_err(format!("as-of bucket {k} is out of range")));
        }
        self.advance_to(k);
        Ok(())
    }

    #[getter(K)]
    fn as_of(&self) -> Option<i64> {
        self.k
    }

    #[getter]
    fn max_ts(&self) -> Option<i64> {
        self.max_ts
    }

    #[getter]
    fn floor(&self) -> i64 {
        self.aggs.floor
    }

    #[getter]
    fn member_count(&self) -> usize {
        self.members.len()
    }

    /// The signals since the last call, in order: (member_id, signal, K, last_touch ms, points
    /// or None, expiry bucket or None).
    fn take_signals<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for record in std::mem::take(&mut self.signals) {
            let (points, expiry) = match record.notice {
                Some((points, expiry)) => (Some(points), Some(expiry)),
                None => (None, None),
            };
            let item = (
                text_object(py, &self.members[record.member as usize].key)?,
                record.signal,
                record.k,
                record.last_touch,
                points,
                expiry,
            );
            out.append(item.into_pyobject(py)?)?;
        }
        Ok(out)
    }

    /// The (comment, bucket) of the surveys applied since the last call whose bucket was after
    /// the floor: the Python side matches them against the lexicons.
    fn take_comments<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for (comment, bucket) in std::mem::take(&mut self.comments) {
            out.append(PyTuple::new(py, [comment, bucket.into_pyobject(py)?.into_any().unbind()])?)?;
        }
        Ok(out)
    }

    /// With CLV, the purchases since the last call: [(purchase days before or None, after)],
    /// each a list of (day, total).
    fn take_clv<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let days = |days: &[(i64, Num)]| -> PyResult<Bound<'py, PyList>> {
            let list = PyList::empty(py);
            for (day, total) in days {
                list.append((*day, total.to_object(py)))?;
            }
            Ok(list)
        };
        for (before, after) in std::mem::take(&mut self.clv_moves) {
            let before = match before {
                Some(before) => days(&before)?.into_any(),
                None => py.None().into_bound(py),
            };
            out.append((before, days(&after)?))?;
        }
        Ok(out)
    }

    /// The churn snapshots recorded since the last call: [(oldest bucket still needed,
    /// [(K, {w: (num, den)})])], in the order the clock moved.
    fn take_churn<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for (oldest, snapshots) in std::mem::take(&mut self.churn) {
            let list = PyList::empty(py);
            for (at, pairs) in snapshots {
                let dict = PyDict::new(py);
                for (w, num, den) in pairs {
                    dict.set_item(w, (num, den))?;
                }
                list.append((at, dict))?;
            }
            out.append((oldest, list))?;
        }
        Ok(out)
    }

    /// The aggregates as the parts of a Python `Aggregates` (without mentions and CLV), and
    /// under "segments" the (dimension, value, parts) of each segment. The first export of
    /// each has its histograms and sums in full ("hists", "sums"); later ones have only what
    /// changed since ("changes": (histogram, bucket, value or None when gone), histograms
    /// numbered as `SUM_NAMES` follows the 8 count histograms), unless a collapse changed all.
    fn export<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = parts(py, &self.names, &mut self.aggs)?;
        let segments = PyList::empty(py);
        let mut keys: Vec<(u8, u32)> = self.segments.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            let (dimension, value) = key;
            let segment = self.segments.get_mut(&key).unwrap();
            let parts = parts(py, &self.names, segment)?;
            segments.append((DIMENSIONS[dimension as usize], self.names[value as usize].clone_ref(py), parts))?;
        }
        out.set_item("segments", segments)?;
        Ok(out)
    }
}

fn parts<'py>(py: Python<'py>, names: &[Py<PyString>], aggs: &mut Aggs) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    if aggs.changed_all || !aggs.tracking {
        let hists = PyList::empty(py);
        for hist in &aggs.hists {
            hists.append(count_dict(py, hist)?)?;
        }
        out.set_item("hists", hists)?;
        let sums = PyDict::new(py);
        for (sum_name, hist) in SUM_NAMES.iter().zip(&aggs.sums) {
            let mut items: Vec<(i64, Num)> = hist.iter().map(|(k, v)| (*k, *v)).collect();
            items.sort_unstable_by_key(|item| item.0);
            let dict = PyDict::new(py);
            for (key, value) in items {
                dict.set_item(key, value.to_object(py))?;
            }
            sums.set_item(*sum_name, dict)?;
        }
        out.set_item("sums", sums)?;
    } else {
        let changes = PyList::empty(py);
        for (histogram, bucket) in aggs.changed.drain() {
            let value = if histogram < 8 {
                aggs.hists[histogram as usize].get(&bucket).map(|count| Num::I(*count as i128))
            } else {
                aggs.sums[histogram as usize - 8].get(&bucket).copied()
            };
            changes.append((histogram, bucket, value.map(|v| v.to_object(py))))?;
        }
        out.set_item("changes", changes)?;
    }
    aggs.tracking = true; // from now on, what changes is remembered for the next export
    aggs.changed_all = false;
    aggs.changed.clear();
    let name = |id: &u32| names[*id as usize].clone_ref(py);
    let by_channel = PyDict::new(py);
    let mut channels: Vec<&u32> = aggs.by_channel.keys().collect();
    channels.sort_unstable();
    for channel in channels {
        by_channel.set_item(name(channel), count_dict(py, &aggs.by_channel[channel])?)?;
    }
    out.set_item("by_channel", by_channel)?;
    let tiers = PyDict::new(py);
    let mut tier_ids: Vec<&u32> = aggs.tiers.keys().collect();
    tier_ids.sort_unstable();
    for tier in tier_ids {
        tiers.set_item(name(tier), aggs.tiers[tier])?;
    }
    out.set_item("tiers", tiers)?;
    let totals = PyDict::new(py);
    totals.set_item("members", aggs.members)?;
    totals.set_item("purchasers", aggs.purchasers)?;
    totals.set_item("lifetime_spend", aggs.lifetime_spend.to_object(py))?;
    totals.set_item("points_balance", aggs.points_balance)?;
    totals.set_item("unbacked", aggs.unbacked)?;
    out.set_item("totals", totals)?;
    out.set_item("cohort_members", count_dict(py, &aggs.cohort_members)?)?;
    out.set_item("cohort_active", nested_dict(py, &aggs.cohort_active)?)?;
    out.set_item("cohort_max", nested_dict(py, &aggs.cohort_max)?)?;
    out.set_item("floor", aggs.floor)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_as_python_counts_them() {
        // 1970-01 is 1970*12; 2024-02-29T23:59:59.999Z is in 2024-02; 1969-12-31 in 1969-12
        assert_eq!(month_of(0), 1970 * 12);
        assert_eq!(month_of(1_709_251_199_999), 2024 * 12 + 1);
        assert_eq!(month_of(1_709_251_200_000), 2024 * 12 + 2);
        assert_eq!(month_of(-1), 1969 * 12 + 11);
        assert_eq!(month_of(4_102_444_800_000), 2100 * 12);
    }

    #[test]
    fn allocation_is_fifo_within_validity() {
        let lot = |ts, points| Lot { ts, id: Box::default(), points };
        let lots = [lot(0, 10), lot(5, 10)];
        let redemptions = [lot(6, 15), lot(20, 10)];
        // at 6: 10 from the first lot, 5 from the second; at 20 the first expired (validity 10),
        // the second too (5 + 10 <= 20): all 10 unbacked
        assert_eq!(allocate_points(&lots, &redemptions, 10), (vec![0, 5], 10));
    }

    #[test]
    fn sums_keep_python_number_types() {
        let mut hist = Map::default();
        sum_num(&mut hist, 1, Num::F(0.0));
        assert!(matches!(hist[&1], Num::F(x) if x == 0.0));
        add_num(&mut hist, 2, Num::I(1));
        add_num(&mut hist, 2, Num::I(-1));
        assert!(!hist.contains_key(&2));
    }
}
