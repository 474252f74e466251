"""Envelopes: many commands of one usage-log partition in one Kafka record (docs/topics.md).

The ledger's processor pays about the same per Kafka record whatever it holds, so a
producer of volume sends a partition's consecutive commands in envelopes. The SDK's
Kafka transport and the ledger's own publisher both build them here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

ENVELOPE_KEY = b"~envelope"
ENVELOPE_COMMANDS_MAX = 1000  # the ledger refuses more in one envelope (ledger.events.ENVELOPE_COMMANDS_MAX)
# An envelope stays under aiokafka's default max_batch_size (256 KiB) and far under Kafka's record limit.
ENVELOPE_BYTES_MAX = 200 * 1024
_HEAD, _TAIL = b'{"type":"envelope","commands":[', b"]}"


def enveloped(items: Sequence[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, bytes]]:
    """One partition's commands, each (key, JSON value), as records (key, value) in the same order.

    Consecutive commands share an envelope of at most ENVELOPE_COMMANDS_MAX commands and
    ENVELOPE_BYTES_MAX bytes; a command left alone (or too large to share) is a plain
    record under its own key.
    """
    start = 0
    while start < len(items):
        end, size = start, len(_HEAD) + len(_TAIL)
        while end < len(items) and end - start < ENVELOPE_COMMANDS_MAX and (
                end == start or size + len(items[end][1]) + 1 <= ENVELOPE_BYTES_MAX):
            size += len(items[end][1]) + 1
            end += 1
        if end - start == 1:
            yield items[start]
        else:
            yield ENVELOPE_KEY, _HEAD + b",".join(value for _key, value in items[start:end]) + _TAIL
        start = end
