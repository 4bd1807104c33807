"""What the generated lines say: timestamps as RFC 3339 strings with offsets, survey comments in
five languages, and malformed lines with the dead-letter reason each one must get."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import orjson

from .config import SECOND_MS, pool

__all__ = ["MALFORMED_REASONS", "rfc3339", "survey_comment", "malformed_line"]

#: Offsets used for RFC 3339 timestamps: (suffix, minutes east of UTC).
_OFFSETS = (
    ("Z", 0), ("+00:00", 0), ("+01:00", 60), ("+02:00", 120), ("-03:00", -180),
    ("-05:00", -300), ("+03:30", 210), ("+05:30", 330), ("+09:00", 540), ("-09:30", -570),
)
_EPOCH_NAIVE = datetime(1970, 1, 1)

#: Malformed-line reasons (the dead-letter reasons a validator following SPEC section 1 gives),
#: with their relative frequency.
MALFORMED_REASONS = {
    "malformed_json": 35,
    "not_an_object": 5,
    "missing_field": 20,
    "bad_type": 20,
    "bad_value": 8,
    "bad_timestamp": 4,
    "negative_amount": 8,
}


# Survey comments by language and sentiment. Lexicon terms (SPEC 4: feedback_mentions) appear
# as whole words: friction "slow", "frustrating", "lento", "frustrante", "بطيء", "کند";
# motivation "rewards", "discount", "recompensa", "descuento", "مكافأة", "پاداش".
_COMMENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "negative": (
            "Checkout was slow and the app kept crashing.",
            "Really frustrating to find my points balance.",
            "Slow queue at the till, frustrating experience.",
            "My coupon did not work at the register.",
            "The app is SLOW after the last update.",
        ),
        "neutral": (
            "It was okay.",
            "Prices are fine, nothing special.",
            "Friendly staff but the website is slow sometimes.",
        ),
        "positive": (
            "Love the rewards, the discount on coffee was great!",
            "Great rewards program, easy to use.",
            "The member discount keeps me coming back.",
            "Fast delivery and friendly staff.",
        ),
    },
    "pt": {
        "negative": (
            "O aplicativo é muito lento.",
            "Experiência frustrante no caixa.",
            "Atendimento lento e frustrante.",
            "Não consegui usar os meus pontos.",
        ),
        "neutral": ("Tudo normal.", "Preços razoáveis, nada de especial."),
        "positive": (
            "Adoro a recompensa por cada compra.",
            "Ótimo programa, a recompensa vale a pena.",
            "Bom atendimento e entrega rápida.",
        ),
    },
    "es": {
        "negative": (
            "El servicio fue lento.",
            "Muy frustrante esperar tanto en la caja.",
            "La web va lento y es frustrante.",
        ),
        "neutral": ("Todo bien.", "Normal, nada especial."),
        "positive": (
            "Me encanta el descuento para socios.",
            "La recompensa llegó rápido, excelente.",
            "Buen descuento y buena atención.",
        ),
    },
    "ar": {
        "negative": ("التطبيق بطيء جدا", "الدفع بطيء والانتظار طويل", "لم أستطع استخدام النقاط"),
        "neutral": ("الخدمة جيدة", "لا بأس"),
        "positive": ("حصلت على مكافأة رائعة", "برنامج ممتاز وكل شراء فيه مكافأة"),
    },
    "fa": {
        "negative": ("اپلیکیشن خیلی کند است", "پرداخت کند بود", "امتیازهایم را نتوانستم استفاده کنم"),
        "neutral": ("خوب بود", "معمولی"),
        "positive": ("پاداش خرید عالی است", "پاداش خوبی گرفتم"),
    },
}
_COMMENT_LANGUAGES = pool(("en", 4), ("pt", 2), ("es", 2), ("ar", 1), ("fa", 1))


def rfc3339(rng: random.Random, ts: int) -> str:
    """``ts`` as an RFC 3339 string in a random offset; milliseconds only when non-zero."""
    suffix, offset_minutes = _OFFSETS[rng.randrange(len(_OFFSETS))]
    local = _EPOCH_NAIVE + timedelta(milliseconds=ts + offset_minutes * 60_000)
    millis = ts % SECOND_MS
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{millis:03d}{suffix}" if millis else text + suffix


def survey_comment(rng: random.Random, latent: float) -> str:
    """A comment whose sentiment follows the respondent's latent score (0-10 scale)."""
    sentiment = ("positive" if latent >= 8.5 else
                 "negative" if latent <= 6.5 else "neutral")
    language = _COMMENT_LANGUAGES[rng.randrange(len(_COMMENT_LANGUAGES))]
    choices = _COMMENTS[language][sentiment]
    return choices[rng.randrange(len(choices))]


def malformed_line(rng: random.Random, n: int, member_ids: list[str], ts: int) -> tuple[str, bytes]:
    """The ``n``-th broken line (exactly one defect) and the reason a SPEC validator gives it.

    Its event ids ("p-x000001", ...) never collide with those of valid events.
    """
    reason = rng.choices(tuple(MALFORMED_REASONS), tuple(MALFORMED_REASONS.values()))[0]
    member = member_ids[rng.randrange(len(member_ids))]
    amount = round(rng.uniform(1.0, 120.0), 2)
    purchase = {"type": "purchase", "event_id": f"p-x{n:06d}", "member_id": member,
                "ts": ts, "amount": amount, "points": int(amount), "channel": "store"}
    redemption = {"type": "redemption", "event_id": f"r-x{n:06d}", "member_id": member,
                  "ts": ts, "points": 500, "reward_id": "rw-5off", "value": 5.0}
    survey = {"type": "survey", "event_id": f"s-x{n:06d}", "member_id": None,
              "ts": ts, "nps": 3, "comment": "Checkout was slow."}
    enrollment = {"type": "enrollment", "event_id": f"e-x{n:06d}", "member_id": member,
                  "ts": ts, "channel": "web", "tier": "bronze"}
    pick = rng.randrange(4)
    if reason == "malformed_json":
        if pick == 0:  # cut short
            line = orjson.dumps(purchase)
            return reason, line[: rng.randrange(1, len(line) - 1)]
        if pick == 1:  # trailing garbage
            return reason, orjson.dumps(redemption) + b"}"
        if pick == 2:  # not UTF-8
            return reason, orjson.dumps(survey).replace(b"slow", b"sl\xff\xfew")
        return reason, repr(enrollment).encode()  # a Python literal: single quotes
    if reason == "not_an_object":
        return reason, orjson.dumps([purchase] if pick < 2 else "purchase")
    if reason == "missing_field":
        target, name = ((purchase, "amount"), (redemption, "member_id"),
                        (survey, "nps"), (enrollment, ("ts", "event_id")[n % 2]))[pick]
        del target[name]
    elif reason == "bad_type":
        target, name, value = ((purchase, "amount", str(amount)),
                               (redemption, "points", "500"),
                               (enrollment, "member_id", 12345),
                               (survey, "ts", [ts]))[pick]
        target[name] = value
    elif reason == "bad_value":
        target, name, value = ((survey, "nps", 11), (redemption, "points", 0),
                               (survey, "csat", 0), (purchase, "event_id", ""))[pick]
        target[name] = value
    elif reason == "bad_timestamp":
        target = (purchase, redemption, survey, enrollment)[pick]
        target["ts"] = ("yesterday", "2024-02-30T10:00:00Z", "2024-01-05 10:00:00", -5)[pick]
    else:  # negative_amount
        target = purchase
        target["amount"] = -amount
    return reason, orjson.dumps(target)

