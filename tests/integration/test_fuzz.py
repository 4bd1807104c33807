"""Hostile input through a live worker: it never dies, and every record is accounted for.

A seeded generator mixes 10,000+ malformed and hostile messages (broken JSON, invalid UTF-8,
wrong types, payloads over ``max_event_bytes``, NaN/Infinity, timestamps before 1970 or after
2100, unicode ids, missing fields, wrong or null Kafka keys, tombstones, deep nesting, ...)
into a generated stream of valid events. :func:`live.classify` says, from the records alone,
what must happen to each one; the worker's counters, the DLQ topic and the KPIs (against
``replay`` of the valid records) must agree.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from stream_kpis.generate import GeneratorConfig, write_jsonl
from stream_kpis.replay import replay, source_for_path
from tests.integration.live import DUPLICATE, FIRST, LiveStack, classify, outcome_totals

SEED = 20240611
HOSTILE = 12_500
TYPES = ("purchase", "redemption", "enrollment", "survey")
Message = tuple[str, bytes | None, bytes | None]

# ids a producer might really send: accents, CJK, RTL, emoji, zero-width and combining marks
UNICODE_IDS = ("müller-ø", "顧客-42", "عميل-٧", "👩‍💻-1", "zero\u200bwidth", "e\u0301-nfd",
               "tab\tid", "nul\u0000id", "a|b|c", "-1")


def _key(event: dict[str, Any]) -> bytes | None:
    key = event.get("member_id") or event.get("event_id")
    return key.encode() if isinstance(key, str) else None


class Hostile:
    """Builders of hostile messages, each from a random valid event of the stream."""

    def __init__(self, rng: random.Random, valid: list[dict[str, Any]]) -> None:
        self.rng, self.valid = rng, valid
        self.builders: list[Callable[[int], Message]] = [
            self.truncated_json, self.random_bytes, self.invalid_utf8, self.wrong_type,
            self.too_large, self.nan_infinity, self.bad_timestamp, self.unicode_ids,
            self.missing_field, self.wrong_key, self.null_key, self.not_an_object,
            self.empty_or_tombstone, self.deep_nesting, self.duplicate_json_keys,
            self.bad_values, self.ancient_but_valid,
        ]

    def build(self, i: int) -> Message:
        # big payloads are rarer: they cost the broker and the test, not the worker
        weights = [0.1 if b in (self.too_large, self.deep_nesting) else 1.0 for b in self.builders]
        return self.rng.choices(self.builders, weights)[0](i)

    def base(self, i: int) -> dict[str, Any]:
        event = dict(self.rng.choice(self.valid))
        event["event_id"] = f"fuzz-{i}"
        return event

    def _send(self, event: dict[str, Any], key: bytes | None = None, raw: bytes | None = None,
              topic: str | None = None) -> Message:
        value = raw if raw is not None else orjson.dumps(event)
        return topic or event.get("type", "purchase"), key if key is not None else _key(event), value

    def truncated_json(self, i: int) -> Message:
        raw = orjson.dumps(self.base(i))
        return self._send({}, b"k", raw[: self.rng.randrange(1, len(raw) - 1)],
                          self.rng.choice(TYPES))

    def random_bytes(self, i: int) -> Message:
        return self.rng.choice(TYPES), None, self.rng.randbytes(self.rng.randrange(0, 300))

    def invalid_utf8(self, i: int) -> Message:
        event = self.base(i)
        raw = orjson.dumps(event).replace(b"fuzz-", b"\xff\xfe\xc3(-", 1)
        return self._send(event, raw=raw)

    def wrong_type(self, i: int) -> Message:
        event = self.base(i)
        field = self.rng.choice(["event_id", "ts", "amount", "points", "member_id", "nps", "csat",
                                 "channel", "tier", "comment", "margin", "value", "reward_id"])
        event[field] = self.rng.choice(["12", [1, 2], {"a": 1}, True, False, 1.5, -3, 1e300])
        return self._send(event, key=self.rng.choice([_key(event), b"whatever"]))

    def too_large(self, i: int) -> Message:
        event = self.base(i)
        event["comment"] = "slow " * self.rng.randrange(13_200, 20_000)  # 66 KB .. 100 KB
        return self._send(event)

    def nan_infinity(self, i: int) -> Message:
        event = self.base(i)
        field = self.rng.choice(["amount", "ts", "margin", "points", "nps"])
        event[field] = "@@"
        literal = self.rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
        return self._send(event, raw=orjson.dumps(event).replace(b'"@@"', literal))

    def bad_timestamp(self, i: int) -> Message:
        event = self.base(i)
        event["ts"] = self.rng.choice([
            4_102_444_800_000, 4_102_444_800_000 + self.rng.randrange(10**12), -1, -10**12,
            "@@", "2100-01-01T00:00:00Z", "3000-06-01T12:00:00+02:00", "1969-12-31T23:59:59Z",
            "1900-01-01T00:00:00Z", "2024-13-45T00:00:00Z", "2024-01-01T00:00:00", "yesterday", ""])
        # "@@": an integer beyond 64 bits, which JSON allows and orjson cannot write
        return self._send(event, raw=orjson.dumps(event).replace(b'"@@"', b"1" + b"0" * 20))

    def unicode_ids(self, i: int) -> Message:
        event = self.base(i)
        event["event_id"] = f"{self.rng.choice(UNICODE_IDS)}-{i}"
        if event.get("member_id") is not None or event["type"] in ("redemption", "enrollment"):
            event["member_id"] = self.rng.choice(UNICODE_IDS)
        return self._send(event)

    def missing_field(self, i: int) -> Message:
        event = self.base(i)
        required = {"purchase": ["event_id", "ts", "amount"], "redemption": ["member_id", "points"],
                    "enrollment": ["member_id", "ts"], "survey": ["nps", "ts"]}[event["type"]]
        for field in self.rng.sample(required, self.rng.randrange(1, len(required) + 1)):
            if self.rng.random() < 0.5:
                event.pop(field, None)
            else:
                event[field] = None
        return self._send(event)

    def wrong_key(self, i: int) -> Message:
        event = self.base(i)
        other = self.rng.choice(self.valid)
        key = _key(other) if _key(other) != _key(event) else b"someone-else"
        return self._send(event, key=key)

    def null_key(self, i: int) -> Message:
        event = self.base(i)
        return event["type"], None, orjson.dumps(event)

    def not_an_object(self, i: int) -> Message:
        raw = self.rng.choice([b"[]", b"[1,2]", b"123", b'"purchase"', b"null", b"true", b"-0.5"])
        return self.rng.choice(TYPES), b"k", raw

    def empty_or_tombstone(self, i: int) -> Message:
        return self.rng.choice(TYPES), b"k", self.rng.choice([b"", None, b" ", b"\n"])

    def deep_nesting(self, i: int) -> Message:
        depth = self.rng.randrange(1_100, 12_000)
        return self.rng.choice(TYPES), b"k", b'{"a":' * depth + b"1" + b"}" * depth

    def duplicate_json_keys(self, i: int) -> Message:
        event = self.base(i)
        raw = orjson.dumps(event)
        return self._send(event, raw=raw[:-1] + b',"ts":"not a time"}')

    def bad_values(self, i: int) -> Message:
        event = self.base(i)
        field, value = self.rng.choice([("amount", -0.01), ("points", -5), ("nps", 11), ("csat", 0),
                                        ("event_id", ""), ("event_id", "x" * 300),
                                        ("member_id", ""), ("value", -1.0)])
        event[field] = value
        if field == "member_id" and event["type"] in ("purchase", "survey"):
            event["member_id"] = "m-x" * 100  # too long rather than a guest
        return self._send(event)

    def ancient_but_valid(self, i: int) -> Message:
        event = self.base(i)
        event["ts"] = self.rng.choice([0, 1, 86_400_000, "1970-01-01T00:00:00.001+00:00",
                                       "1999-12-31T23:59:59-05:00"])
        return self._send(event)


def test_hostile_input_is_accounted_for(tmp_path, kafka_bootstrap, redis_url):
    rng = random.Random(SEED)
    stream = tmp_path / "valid.jsonl"
    write_jsonl(GeneratorConfig(members=250, days=90, seed=SEED % 1000), stream)
    valid = []
    for line in stream.read_bytes().splitlines():
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("type") in TYPES:
            valid.append(event)
    stack = LiveStack(tmp_path, kafka_bootstrap, redis_url)
    messages: list[Message] = stack.file_messages(stream)
    hostile = Hostile(rng, valid)
    messages += [hostile.build(i) for i in range(HOSTILE)]
    rng.shuffle(messages)
    try:
        worker = stack.start_worker()
        stack.wait_assigned([worker])
        assert stack.send(messages) == len(messages)
        records = stack.read_inputs()
        assert len(records) == len(messages)
        outcomes = classify(records, stack.settings)
        want = outcome_totals(outcomes.values())
        dead = Counter(o for o in outcomes.values() if o not in (FIRST, DUPLICATE))
        assert want["dead_letter"] >= 10_000 and want[FIRST] > 3_000, want
        assert {"malformed_json", "too_large", "bad_type", "bad_timestamp", "missing_field",
                "wrong_key", "not_an_object", "bad_value", "negative_amount"} <= set(dead), dead

        got = stack.wait_accounted(worker, len(records), timeout=120)
        assert worker.alive()
        assert sum(got.values()) == len(records), got
        assert got == {"applied": want[FIRST], "duplicate": want[DUPLICATE],
                       "dead_letter": want["dead_letter"]}
        assert worker.total("stream_kpis_dead_letters_total") == want["dead_letter"]
        for reason, n in dead.items():
            assert worker.total("stream_kpis_dead_letters_total", reason=reason) == n, reason
        assert worker.total("stream_kpis_duplicates_total") == want[DUPLICATE]

        # every dead letter in the DLQ, once, with its reason and source
        dlq = {(d["topic"], d["partition"], d["offset"]): d["reason"] for d in stack.dead_letters()}
        assert dlq == {(r.topic, r.partition, r.offset): o for r, o in outcomes.items()
                       if o not in (FIRST, DUPLICATE)}

        # KPIs: replay of the records the worker had to apply, each under its topic's type
        kinds = {name: kind for kind, name in stack.settings.topics.inputs().items()}
        applied = tmp_path / "applied.jsonl"
        with applied.open("wb") as out:
            for record, outcome in outcomes.items():
                if outcome in (FIRST, DUPLICATE):
                    event = orjson.loads(record.value)
                    event["type"] = kinds[record.topic]
                    out.write(orjson.dumps(event) + b"\n")
        expected = [r for r in replay([source_for_path(applied)], stack.settings).records
                    if r["kpi"] != "churn_reduction"]
        stack.wait_for_kpis(expected, timeout=60)
        log = worker.log_text()
        assert "Traceback" not in log and "CRITICAL" not in log and "Restarting dead" not in log
    finally:
        stack.stop()
