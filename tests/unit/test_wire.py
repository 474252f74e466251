"""Amounts in API responses: exact, and always in plain notation."""

from decimal import Decimal

import pytest

from ledger.api.wire import JSONResponse
from ledger.money import ZERO, money


@pytest.mark.parametrize("amount, written", [
    (ZERO, b"0.000000000000"),                       # an empty reservation: was 0E-12
    (money("0.00000015"), b"0.000000150000"),        # was 1.50000E-7
    (Decimal("1E+3"), b"1000"),
    (money("10000"), b"10000.000000000000"),
    (Decimal("12.5"), b"12.5"),
])
def test_every_amount_is_written_in_plain_notation_digit_for_digit(amount, written):
    body = JSONResponse({"reserved": amount, "nested": [{"amount": amount}], "name": "Eve"}).body
    assert body == b'{"reserved":%s,"nested":[{"amount":%s}],"name":"Eve"}' % (written, written)
    assert b"E" not in body.replace(b"Eve", b"")
