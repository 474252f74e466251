"""Wire codecs: JSON via msgspec for commands, outputs and table values."""

from __future__ import annotations

from typing import Any

import msgspec
from faust.serializers import codecs

from ledger.account import Account, PlanHistory, Seen
from ledger.events import AnyCommand, Envelope
from streams.state import Position

STATE_CODEC = "ledger_state"

_command_decoder = msgspec.json.Decoder(AnyCommand)
_record_decoder = msgspec.json.Decoder(AnyCommand | Envelope)
_state_decoder = msgspec.json.Decoder(Account | PlanHistory | Position)
_seen_decoder = msgspec.json.Decoder(Seen)  # an array, the only one: msgspec cannot tag it beside the others
_encoder = msgspec.json.Encoder()

encode = _encoder.encode


def decode_command(raw: bytes) -> AnyCommand:
    """Decode one command; raises msgspec.DecodeError (incl. ValidationError)."""
    return _command_decoder.decode(raw)


def decode_record(raw: bytes) -> AnyCommand | Envelope:
    """Decode one usage-log record: a command, or an envelope of them (each still undecoded)."""
    return _record_decoder.decode(raw)


class StateCodec(codecs.Codec):
    """Faust codec for the account table's values (changelog and restore)."""

    def _dumps(self, obj: Any) -> bytes:
        return _encoder.encode(obj)

    def _loads(self, s: bytes) -> Any:
        return s if kept_encoded(s) else decode_state(s)


def decode_state(raw: bytes) -> Any:
    """A table value as the changelog holds it."""
    return _seen_decoder.decode(raw) if raw[:1] == b"[" else _state_decoder.decode(raw)


def kept_encoded(raw: bytes) -> bool:
    """Whether the table keeps this value as its bytes (an account or a remembered id), decoded on each read.

    These are nearly all of a worker's values, and encoded they take a sixth of the
    memory: a million users fit in a worker. Plan histories and positions are few,
    and read on every command, so they are kept decoded.
    """
    return raw[:1] == b"[" or raw.startswith(_ACCOUNT_PREFIX)


def table_form(value: Any, raw: bytes | None) -> Any:
    """What the table holds for a value written as ``raw``: its bytes, the value itself, or None (a tombstone)."""
    if raw is None:
        return None
    return raw if kept_encoded(raw) else value


_ACCOUNT_PREFIX = b'{"type":"account"'  # msgspec writes the tag first


codecs.register(STATE_CODEC, StateCodec())
