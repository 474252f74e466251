"""Accounts are stored as arrays; the accounts a changelog holds from before, as objects, are still read.

The two documents below are what the code before the change wrote for these accounts
(``streams.codecs.encode`` of the same values), kept verbatim.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from ledger.account import Account, Block, ClosedPeriod, Reservation, SessionState
from streams.codecs import StateCodec, decode_state, encode, is_account, kept_encoded

T = datetime(2026, 11, 1, tzinfo=UTC)
ANN = Account(
    tenant="acme", user="ann", plan_id="p1", anchor=T, period_start=T, period_end=datetime(2026, 12, 1, tzinfo=UTC),
    period_spend=Decimal("3.250000000000"), period_tokens={"gpt-4o": 51000},
    crossed=["model_tokens:gpt-4o:hard_block:50000"],
    sessions={"s1": SessionState(session_id="s1", started_at=T, last_at=T, plan_version=1, spend=Decimal("1.5"),
                                 crossed=["session_spend:soft_warning:1"])},
    seq=7, remembered=9, balance=Decimal("2.5"), topups=1,
    blocks={"model_tokens:gpt-4o": Block(dimension="model_tokens", model="gpt-4o",
                                         scope="period:2026-11-01T00:00:00+00:00", threshold=Decimal("50000.00"),
                                         limit=Decimal("50000"), plan_id="p1", plan_version=1)},
    reservations={"r1": Reservation(reservation_id="r1", session_id="s1", model="gpt-4o", cost=Decimal("0.01"),
                                    tokens=700, expires_at=T)},
    closed={"2026-10-01T00:00:00+00:00": ClosedPeriod(spend=Decimal("9.75"), tokens={"gpt-4o": 10}, crossed=[])},
    applied_to=42)
ANN_AS_OBJECT = (
    b'{"type":"account","tenant":"acme","user":"ann","plan_id":"p1","anchor":"2026-11-01T00:00:00Z",'
    b'"period_start":"2026-11-01T00:00:00Z","period_end":"2026-12-01T00:00:00Z","period_spend":"3.250000000000",'
    b'"period_tokens":{"gpt-4o":51000},"crossed":["model_tokens:gpt-4o:hard_block:50000"],"sessions":{"s1":'
    b'{"session_id":"s1","started_at":"2026-11-01T00:00:00Z","last_at":"2026-11-01T00:00:00Z","plan_version":1,'
    b'"spend":"1.5","crossed":["session_spend:soft_warning:1"]}},"seq":7,"remembered":9,"balance":"2.5","topups":1,'
    b'"blocks":{"model_tokens:gpt-4o":{"dimension":"model_tokens","model":"gpt-4o",'
    b'"scope":"period:2026-11-01T00:00:00+00:00","threshold":"50000.00","limit":"50000","plan_id":"p1",'
    b'"plan_version":1}},"reservations":{"r1":{"reservation_id":"r1","session_id":"s1","model":"gpt-4o",'
    b'"cost":"0.01","tokens":700,"expires_at":"2026-11-01T00:00:00Z"}},"closed":{"2026-10-01T00:00:00+00:00":'
    b'{"spend":"9.75","tokens":{"gpt-4o":10},"crossed":[]}},"applied_to":42}'
)
# Fields at their default were not written at all.
BOB_AS_OBJECT = b'{"type":"account","tenant":"acme","user":"bob","applied_to":3}'


def test_an_account_is_stored_as_an_array_and_read_back_equal() -> None:
    raw = encode(ANN)
    assert raw.startswith(b'["account","acme","ann",42,')
    assert len(raw) < len(ANN_AS_OBJECT) * 3 // 4, (len(raw), len(ANN_AS_OBJECT))
    assert decode_state(raw) == ANN
    assert is_account(raw) and kept_encoded(raw)


def test_an_account_stored_as_an_object_before_is_read_as_the_same_account() -> None:
    assert decode_state(ANN_AS_OBJECT) == ANN
    assert decode_state(BOB_AS_OBJECT) == Account(tenant="acme", user="bob", applied_to=3)
    assert is_account(ANN_AS_OBJECT) and kept_encoded(ANN_AS_OBJECT)  # the table keeps it as bytes, as before
    assert StateCodec()._loads(ANN_AS_OBJECT) == ANN_AS_OBJECT


def test_an_account_stored_as_an_object_is_written_back_as_an_array() -> None:
    assert encode(decode_state(ANN_AS_OBJECT)) == encode(ANN)
