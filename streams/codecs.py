"""Wire codecs: JSON via msgspec for commands, outputs and table values."""

from __future__ import annotations

from typing import Any

import msgspec
from faust.serializers import codecs

from ledger.account import Account, PlanHistory
from ledger.events import AnyCommand
from streams.state import Position

STATE_CODEC = "ledger_state"

_command_decoder = msgspec.json.Decoder(AnyCommand)
_state_decoder = msgspec.json.Decoder(Account | PlanHistory | Position)
_encoder = msgspec.json.Encoder()

encode = _encoder.encode


def decode_command(raw: bytes) -> AnyCommand:
    """Decode one usage-log record; raises msgspec.DecodeError (incl. ValidationError)."""
    return _command_decoder.decode(raw)


class StateCodec(codecs.Codec):
    """Faust codec for the account table's values (changelog and restore)."""

    def _dumps(self, obj: Any) -> bytes:
        return _encoder.encode(obj)

    def _loads(self, s: bytes) -> Any:
        return _state_decoder.decode(s)


codecs.register(STATE_CODEC, StateCodec())
