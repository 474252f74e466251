"""The gate stream's cursor and its bound on concurrent streams (the stream itself: tests/integration/test_sdk_live.py)."""

from __future__ import annotations

import base64

import pytest
from fastapi import HTTPException

from ledger.api.gates import CURSOR_LENGTH_MAX, StreamSlots, decode_cursor, encode_cursor

PARTITIONS = list(range(8))


@pytest.mark.parametrize("positions", [{0: 0}, {p: 10 ** p for p in PARTITIONS}, {3: 7, 1: 2}])
def test_a_cursor_round_trips(positions):
    cursor = encode_cursor(positions)
    assert "=" not in cursor and decode_cursor(cursor, PARTITIONS) == positions


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize("cursor", ["not base64 at all!", _b64("0:1,zz"), _b64("0:-1"), _b64("9:1"), _b64(""),
                                    _b64("0:1:2"), "A" * (CURSOR_LENGTH_MAX + 1), _b64("\xff")])
def test_anything_else_is_a_422_that_says_so(cursor):
    with pytest.raises(HTTPException) as raised:
        decode_cursor(cursor, PARTITIONS)
    assert raised.value.status_code == 422 and "not a cursor" in raised.value.detail


def test_streams_beyond_the_bound_answer_503_until_one_closes():
    slots = StreamSlots(limit=2)
    slots.take()
    slots.take()
    with pytest.raises(HTTPException) as raised:
        slots.take()
    assert raised.value.status_code == 503 and raised.value.headers == {"Retry-After": "5"}
    slots.give_back()
    slots.take()
    assert slots.used == 2
