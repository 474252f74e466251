"""Wire codecs: JSON via msgspec for commands, outputs and table values."""

from __future__ import annotations

from typing import Any

import msgspec
from faust.serializers import codecs

from ledger.account import Account, Block, ClosedPeriod, PlanHistory, Reservation, Seen, SessionState
from ledger.events import AnyCommand, Envelope
from streams.state import Position

STATE_CODEC = "ledger_state"

_command_decoder = msgspec.json.Decoder(AnyCommand)
_record_decoder = msgspec.json.Decoder(AnyCommand | Envelope)
_state_decoder = msgspec.json.Decoder(PlanHistory | Position)  # objects, tagged
_account_decoder = msgspec.json.Decoder(Account)  # a tagged array: ["account", ...]
_seen_decoder = msgspec.json.Decoder(Seen)  # an untagged array: [n, "digest"]
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
    """A table value as the changelog holds it (an account stored as an object, before, too)."""
    if raw[:1] == b"[":
        return _account_decoder.decode(raw) if raw.startswith(_ACCOUNT_PREFIX) else _seen_decoder.decode(raw)
    if raw.startswith(_OBJECT_ACCOUNT_PREFIX):
        return _account_from_object(raw)
    return _state_decoder.decode(raw)


# An account's parts that are arrays now and were objects, by the Account field that holds them in a dict.
_PARTS = {"sessions": SessionState, "blocks": Block, "reservations": Reservation, "closed": ClosedPeriod}


def _account_from_object(raw: bytes) -> Account:
    """An account as stored before accounts were arrays: the same fields, by name, its parts objects too.

    Read as plain JSON, laid out as the arrays of today (a missing field takes its default) and decoded as
    any account; the next write of the account stores it as an array.
    """
    document = msgspec.json.decode(raw)
    for field, part in _PARTS.items():
        document[field] = {key: _as_array(part, value) for key, value in document.get(field, {}).items()}
    return _account_decoder.decode(encode(["account", *_as_array(Account, document)]))


def _as_array(kind: type[msgspec.Struct], document: dict[str, Any]) -> list[Any]:
    return [document[f.name] if f.name in document else
            f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
            for f in msgspec.structs.fields(kind)]


def kept_encoded(raw: bytes) -> bool:
    """Whether the table keeps this value as its bytes (an account or a remembered id), decoded on each read.

    These are nearly all of a worker's values, and encoded they take a sixth of the
    memory: a million users fit in a worker. Plan histories and positions are few,
    and read on every command, so they are kept decoded.
    """
    return raw[:1] == b"[" or is_account(raw)


def is_account(raw: bytes) -> bool:
    """Whether a table value is an account (as stored now, or as an object before)."""
    return raw.startswith((_ACCOUNT_PREFIX, _OBJECT_ACCOUNT_PREFIX))


def table_form(value: Any, raw: bytes | None) -> Any:
    """What the table holds for a value written as ``raw``: its bytes, the value itself, or None (a tombstone)."""
    if raw is None:
        return None
    return raw if kept_encoded(raw) else value


_ACCOUNT_PREFIX = b'["account"'  # msgspec writes the tag first
_OBJECT_ACCOUNT_PREFIX = b'{"type":"account"'  # as accounts were stored before they were arrays


codecs.register(STATE_CODEC, StateCodec())
