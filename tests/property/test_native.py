"""The native fast paths of the input stage (stream_kpis._native) against the Python reference.

Each native reader answers only for input it is sure of (an Event), else None and the Python
code decides. The properties, on generated input (valid events, wrong types, values out of
range, unknown and nested fields, repeated fields, other JSON spellings, broken bytes; CSV cells
in every ts_format with padding, signs, exponents, other digits and Unicode white space):

* **sound**: whenever the native reader returns an Event, the Python code returns an Event
  with the same fields, of the same types (floats bit for bit);
* **serving**: on the well-formed forms it reads, it returns an Event whenever Python does,
  so the fast path really carries the usual input.

And replay end to end gives the same KPIs, dead letters and signals with the native paths off
(STREAM_KPIS_NATIVE=0, in a child process) as on.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stream_kpis.core.events import EVENT_TYPES, Event, EventParser
from stream_kpis.core.native import NATIVE_ENV, native_module, native_status
from stream_kpis.replay import Source, _csv_plan, _map_row, _native_rows
from tests.property.test_timestamps import rfc3339_texts

ROOT = Path(__file__).resolve().parents[2]

native = native_module()
needs_native = pytest.mark.skipif(native is None, reason=f"native fast paths {native_status()}")


def test_native_fast_paths_are_built():
    """`pip install` (make setup) builds them; only STREAM_KPIS_NATIVE=0 turns them off."""
    if os.environ.get(NATIVE_ENV, "1").strip() != "0":
        assert native is not None, native_status()
        assert EventParser().native


def _fields(event: Event) -> dict:
    """An event's fields with their types; floats by their bits (-0.0 is not 0.0)."""
    out = {}
    for name in Event.__slots__:
        value = getattr(event, name)
        if type(value) is float:
            value = struct.pack("<d", value)
        out[name] = (type(value).__name__, value)
    return out


def _assert_same(fast: Event | None, reference: object, where: object) -> None:
    if fast is None:
        return
    assert type(fast) is Event and type(reference) is Event, (where, reference)
    assert _fields(fast) == _fields(reference), where


REFERENCE = EventParser(native=False)

# ---------------------------------------------------------------------------------- JSON

ids = st.one_of(st.text(min_size=1, max_size=8), st.just(""), st.text(min_size=256, max_size=258))


def _values(integers: st.SearchStrategy[int]) -> st.SearchStrategy:
    return st.one_of(st.none(), st.booleans(), integers, st.floats(), st.text(max_size=4),
                     st.lists(integers, max_size=2),
                     st.dictionaries(st.text(max_size=3), integers, max_size=2))


wrong = _values(st.integers(-2**70, 2**70))
wrong_in_64_bits = _values(st.integers(-2**63, 2**63 - 1))
timestamps = st.one_of(st.integers(-10, 5_000_000_000_000), rfc3339_texts,
                       st.floats(0, 2e12, allow_nan=False))
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64),
                    st.integers(-10, 10**6), st.floats(0, 1e6).map(lambda x: round(x, 2)))
small_ints = st.integers(-2, 12)
GOOD = {
    "type": st.sampled_from(EVENT_TYPES), "event_id": ids, "member_id": st.one_of(st.none(), ids),
    "ts": timestamps, "amount": numbers, "points": st.integers(-1, 2**63), "margin": numbers,
    "value": numbers, "channel": st.text(max_size=6), "tier": st.text(max_size=6),
    "nps": small_ints, "csat": small_ints, "comment": st.text(max_size=12),
    "store_id": st.text(max_size=6), "currency": st.text(max_size=3), "reward_id": st.text(max_size=3),
}


@st.composite
def event_objects(draw, clean: bool = False) -> dict:
    """An event-like JSON object: each known field absent, well-typed, or (unless clean) of any
    type; sometimes unknown and nested fields."""
    obj = {}
    for name, good in GOOD.items():
        choice = draw(st.sampled_from(["absent", "good", "good"] + ([] if clean else ["wrong"])))
        if choice == "good":
            obj[name] = draw(good)
        elif choice == "wrong":
            obj[name] = draw(wrong)
    if draw(st.booleans()):
        obj[draw(st.text(max_size=5))] = draw(st.recursive(
            wrong_in_64_bits if clean else wrong,
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner,
                                                                        max_size=3)))
    return obj


def _dump(obj: dict, style: str) -> bytes:
    if style == "orjson":
        try:
            return orjson.dumps(obj)
        except TypeError:  # an integer beyond 64 bits
            return json.dumps(obj).encode()
    if style == "ascii":  # \\u escapes, surrogate pairs
        return json.dumps(obj, ensure_ascii=True).encode()
    return json.dumps(obj, ensure_ascii=False, indent=1, separators=(" , ", " : ")).encode()


@st.composite
def raw_lines(draw) -> bytes:
    obj = draw(event_objects())
    try:
        raw = _dump(obj, draw(st.sampled_from(["orjson", "ascii", "spaced"])))
    except ValueError:  # a float json.dumps will not write
        raw = b"{}"
    edit = draw(st.sampled_from(["none", "none", "none", "repeat", "truncate", "byte", "wrap"]))
    if edit == "repeat" and len(obj) > 0:  # a field given twice
        name = draw(st.sampled_from(sorted(obj)))
        raw = raw[:-1] + b"," + _dump({name: draw(wrong)}, "orjson")[1:]
    elif edit == "truncate":
        raw = raw[:draw(st.integers(0, max(0, len(raw) - 1)))]
    elif edit == "byte":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at:]
    elif edit == "wrap":
        raw = draw(st.sampled_from([b" \t\r\n", b"", b"\xef\xbb\xbf"])) + raw + draw(
            st.sampled_from([b" \n", b"x", b"", b"}"]))
    return raw


event_types = st.one_of(st.none(), st.sampled_from(EVENT_TYPES))
nows = st.one_of(st.none(), st.integers(0, 5_000_000_000_000))


@needs_native
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=raw_lines(), event_type=event_types, now_ms=nows)
def test_native_json_events_are_the_reference_events(raw, event_type, now_ms):
    fast = EventParser()._native_parse(raw, event_type, now_ms)
    _assert_same(fast, REFERENCE.parse(raw, event_type, now_ms), raw)


@needs_native
@settings(max_examples=1500, deadline=None)
@given(obj=event_objects(clean=True), style=st.sampled_from(["orjson", "ascii", "spaced"]),
       event_type=event_types, now_ms=nows)
def test_native_json_reads_every_clean_valid_event(obj, style, event_type, now_ms):
    # a form left to Python on purpose: integers beyond 64 bits
    assume(all(not (type(v) is int and abs(v) >= 2**63) for v in obj.values()))
    raw = _dump(obj, style)
    fast = EventParser()._native_parse(raw, event_type, now_ms)
    reference = REFERENCE.parse(raw, event_type, now_ms)
    _assert_same(fast, reference, raw)
    assert (fast is None) == (type(reference) is not Event), (raw, reference)


@needs_native
def test_native_json_gives_none_to_what_it_does_not_read():
    parse = EventParser()._native_parse
    base = {"type": "purchase", "event_id": "p1", "ts": 1_700_000_000_000, "amount": 1.5}
    assert parse(orjson.dumps(base)) is not None
    assert parse(orjson.dumps({**base, "ts": "2024-01-01T00:00:00.1234567Z"})).ts == 1704067200123
    for variant in [{**base, "amount": -1}, {**base, "points": 2**64}, {**base, "member_id": ""}]:
        assert parse(json.dumps(variant).encode()) is None, variant
    assert parse(b'{"type":"purchase","type":"purchase","event_id":"p","ts":1,"amount":1}') is None
    assert parse(orjson.dumps(base), "refund") is None  # an unknown type is not an error here
    assert parse(b"x" * 70_000) is None  # too large: the reference names the reason
    assert parse(orjson.dumps(base), None, 1_600_000_000_000) is None  # in the future


@needs_native
@settings(max_examples=500, deadline=None)
@given(where=st.sampled_from(['"x":{}', '"x":[{}]', '"nps":{}', '"value":{}', '"amount":{}',
                              '"y":{{"z":{}}}']),
       number=st.sampled_from(["1e400", "-1e400", "1.8e308", "1E309", "9" * 310 + ".0", "1e-400",
                               "1.7976931348623157e308", "4.9e-324", "2e-324"]),
       kind=st.sampled_from(EVENT_TYPES))
def test_native_json_numbers_beyond_a_double(where, number, kind):
    """orjson refuses a number that rounds to infinity anywhere in the line (malformed_json),
    also in a field the event does not read; one that rounds to 0 it reads as 0.0."""
    fields = '"type":"{}","event_id":"e","member_id":"m","ts":5,"amount":1,"points":2,"nps":3'
    raw = ("{" + fields.format(kind) + "," + where.format(number) + "}").encode()
    _assert_same(EventParser()._native_parse(raw), REFERENCE.parse(raw), raw)


@needs_native
def test_native_arguments_it_cannot_read_are_left_to_python():
    raw = b'{"type":"purchase","event_id":"p","ts":5,"amount":1}'
    parse = EventParser()._native_parse
    assert parse(raw, None, 10) is not None
    for now in (2**64, -2**64, 5.0, "5"):
        assert parse(raw, None, now) is None
    assert parse(raw, "purchase\ud800") is None
    assert not EventParser(max_skew_ms=2**70).native  # limits beyond 64 bits: pure Python
    assert type(EventParser(max_skew_ms=2**70).parse(raw)) is Event
    rows = native.CsvEvents.for_source(Event, list(EVENT_TYPES), [("event_id", 0), ("ts", 1),
                                                                  ("amount", 2), ("channel", 3)],
                                       "epoch_ms", 4, "purchase")
    assert rows.event(["p", "5", "1", "web"]).channel == "web"
    assert rows.event(["p", "5", "1", "w\ud800"]) is None  # a lone surrogate (utf-7, say)


# ---------------------------------------------------------------------------------- CSV

FORMATS = ["auto", "epoch_ms", "epoch_s", "rfc3339", "%Y-%m-%d %H:%M", "%d/%m/%Y %H:%M:%S",
           "%Y%m%d"]
spaces = st.sampled_from(["", "", " ", "\t", "\x0b", "\x1c", "\x1f", "\xa0", "\u2003", "\u200b",
                          "\u180e", "\u3000", "\x85", "\ufeff", "\u2028"])
digits = st.text(alphabet="0123456789", min_size=1, max_size=14)
number_texts = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr), st.integers(-10**6, 10**6).map(str),
    st.builds(lambda a, b: f"{a}.{b}", digits, digits), st.builds(lambda a: f".{a}", digits),
    st.builds(lambda a: f"{a}.", digits), st.builds(lambda a, e: f"{a}e{e}", digits, st.integers(-5, 5)),
    st.sampled_from(["inf", "nan", "-0", "+5", "1_000", "\u0665", "1e", "-", "", "0x10", "1,5"]))
ts_texts = st.one_of(
    digits, st.builds(lambda a, b: f"{a}.{b}", digits, st.text(alphabet="0123456789", max_size=4)),
    rfc3339_texts, st.sampled_from(["-5", "--5", "\u0661\u0662", "+17", "1_7"]),
    st.datetimes().map(lambda d: d.strftime("%Y-%m-%d %H:%M")),
    st.datetimes().map(lambda d: d.strftime("%d/%m/%Y %H:%M:%S")),
    st.datetimes().map(lambda d: d.strftime("%Y%m%d")))
CELLS = {"ts": ts_texts, "amount": number_texts, "margin": number_texts, "value": number_texts,
         "points": number_texts, "nps": number_texts, "csat": number_texts,
         "type": st.sampled_from(EVENT_TYPES + ("refund", ""))}
COLUMNS = ["type", "event_id", "member_id", "ts", "amount", "points", "margin", "value", "channel",
           "tier", "nps", "csat", "comment", "store_id", "currency"]


@st.composite
def csv_rows(draw):
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=len(COLUMNS)))
    cells = []
    for name in header:
        text = draw(CELLS.get(name, st.text(max_size=8)))
        cells.append(draw(spaces) + text + draw(spaces))
    cells = cells[:draw(st.integers(0, len(cells) + 1))] + draw(st.lists(st.text(max_size=2), max_size=1))
    return header, cells


def _csv_readers(header: list[str], ts_format: str, event_type: str | None):
    """Replay's two readers of the rows of a source with this header: the native one (replay's
    own _native_rows, None when it does not read the source) and the reference (_map_row, then
    validation in Python; None for a row that does not map)."""
    source = Source(path=Path("x.csv"), format="csv", type=event_type, ts_format=ts_format)
    plan = _csv_plan(source, header)

    def reference(cells: list[str]) -> object:
        fields, error = _map_row(cells, len(header), plan, ts_format)
        return None if error else REFERENCE.validate(fields, b"", event_type)

    return _native_rows(source, plan, len(header)), reference


@needs_native
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=csv_rows(), ts_format=st.sampled_from(FORMATS), event_type=event_types)
def test_native_csv_rows_are_the_reference_events(row, ts_format, event_type):
    header, cells = row
    assume(cells)
    fast, reference = _csv_readers(header, ts_format, event_type)
    assert fast is not None  # every format of FORMATS is one the native side reads
    _assert_same(fast(cells), reference(cells), (header, cells))


@needs_native
@settings(max_examples=1000, deadline=None)
@given(member=st.text(alphabet="abc-0123456789", min_size=1, max_size=8),
       ts=st.integers(0, 4_102_444_799_999), amount=st.floats(0, 1e6, allow_nan=False),
       points=st.integers(0, 10**6), ts_format=st.sampled_from(FORMATS))
def test_native_csv_reads_every_clean_row(member, ts, amount, points, ts_format):
    from datetime import UTC, datetime

    moment = datetime.fromtimestamp(ts // 1000, UTC)
    ts_text = {"auto": str(ts), "epoch_ms": str(ts), "epoch_s": f"{ts / 1000}",
               "rfc3339": moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ts % 1000:03d}Z"}.get(
                   ts_format, moment.strftime(ts_format))
    header = ["event_id", "member_id", "ts", "amount", "points", "channel"]
    cells = ["p1", member, ts_text, repr(amount), str(points), "web "]
    read, read_in_python = _csv_readers(header, ts_format, "purchase")
    fast, reference = read(cells), read_in_python(cells)
    assert type(reference) is Event and fast is not None, (cells, reference)
    _assert_same(fast, reference, cells)


@needs_native
def test_native_csv_strips_white_space_as_python_does():
    """Every code point at both ends of a text cell: the native reader strips what str.strip()
    strips (Python's white space, ASCII and not), and keeps the rest."""
    header = ["event_id", "ts", "amount", "channel"]
    read, _ = _csv_readers(header, "epoch_ms", "purchase")
    for code in range(0x110000):
        if 0xD800 <= code < 0xE000:
            continue
        char = chr(code)
        event = read(["p", "5", "1", f"{char}x{char}"])
        assert event is not None and event.channel == f"{char}x{char}".strip(), hex(code)


@needs_native
def test_native_csv_leaves_other_patterns_to_python():
    assert native.CsvEvents.for_source(Event, list(EVENT_TYPES), [("ts", 0)], "%Y-%m-%d %I %p", 1,
                                       None) is None


# ---------------------------------------------------------------------------------- end to end


@needs_native
@pytest.mark.parametrize("form", ["jsonl", "mapped csv"])
def test_replay_is_the_same_with_the_native_paths_off(tmp_path, form):
    """`stream-kpis replay` of a generated stream (JSONL, or the four mapped CSV exports of the
    benchmark with every KPI on), with the native paths on and off: the same KPI series, dead
    letters and signals, byte for byte."""
    from benchmarks.replay import generate_csv

    events = tmp_path / "events.jsonl"
    run = [sys.executable, "-m", "stream_kpis"]
    subprocess.run([*run, "generate", "--seed", "3", "--members", "300", "--days", "150", "-o",
                    str(events)], check=True, cwd=ROOT)
    inputs = [str(events)] if form == "jsonl" else ["--config",
                                                    str(generate_csv(events, tmp_path / "csv"))]
    outputs = {}
    for flag in ("1", "0"):
        out = tmp_path / flag
        out.mkdir()
        result = subprocess.run(
            [*run, "replay", *inputs, "--every", "7d", "--output", "jsonl",
             "--dead-letters", str(out / "dead.jsonl"), "--signals", str(out / "signals.jsonl")],
            check=True, cwd=ROOT, env={**os.environ, NATIVE_ENV: flag}, capture_output=True)
        outputs[flag] = (result.stdout, (out / "dead.jsonl").read_bytes(),
                         (out / "signals.jsonl").read_bytes())
    assert outputs["1"][0].count(b"\n") > 100 and outputs["1"][2]
    assert outputs["1"] == outputs["0"]
