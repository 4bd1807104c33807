"""Property test of the comment matcher (stream_kpis.core.kpis.MentionMatcher) against the
oracle's whole-word search (tests/oracle.py ``mentions``), with the shipped lexicons, on comments
made of their terms in any case, glued to letters, digits and marks or set apart by spaces and
punctuation (a term inside a longer word is no mention)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_kpis.core.kpis import MentionMatcher
from stream_kpis.settings import DEFAULT_LEXICONS
from tests.oracle import mentions

TERMS = sorted({term for terms in DEFAULT_LEXICONS.values() for term in terms})
MATCHER = MentionMatcher(DEFAULT_LEXICONS)

pieces = st.one_of(
    st.sampled_from(TERMS).flatmap(lambda t: st.sampled_from([t, t.upper(), t.title()])),
    st.sampled_from([" ", ", ", "!", "-", "_", "ly", "s", "2", "\u064b", "ß", "\u200c", "\n"]),
    st.text(max_size=3),
)
comments = st.lists(pieces, max_size=12).map("".join)


@settings(max_examples=2000, deadline=None)
@given(comment=comments)
def test_matches_are_the_oracles_whole_word_mentions(comment):
    expected = [f"{lexicon}\t{term}" for lexicon, terms in DEFAULT_LEXICONS.items()
                for term in terms if mentions(comment, term)]
    assert MATCHER.matches(comment) == expected
