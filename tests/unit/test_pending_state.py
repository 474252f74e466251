"""The overlay the next batch folds over while earlier batches' state is being written."""

from __future__ import annotations

from streams.codecs import encode
from streams.pending import PendingState
from streams.state import Position


def test_a_later_batch_reads_an_earlier_ones_writes_until_they_are_stored_and_keeps_its_own() -> None:
    table: dict[str, object] = {"0:a:t/u": b"stored", "0:a:t/v": b"v-stored", "0:d:3:t/ue": b"[1,\"x\"]"}
    pending = PendingState(lambda: table)
    pos1, pos2 = Position(partition=0, next_offset=5), Position(partition=0, next_offset=9)
    pending.stage(1, [("0:a:t/u", None, b'{"type":"account","n":1}'), ("0:pos", pos1, encode(pos1)),
                      ("0:d:3:t/ue", None, None)])
    pending.stage(2, [("0:a:t/u", None, b'{"type":"account","n":2}'), ("0:pos", pos2, encode(pos2))])
    assert pending.get("0:a:t/u") == b'{"type":"account","n":2}'
    assert pending.get("0:pos") is pos2  # kept decoded, as the table keeps it
    assert pending.get("0:d:3:t/ue") is None  # deleted by batch 1
    assert dict(pending.scan("0:")) == {"0:a:t/u": b'{"type":"account","n":2}', "0:a:t/v": b"v-stored", "0:pos": pos2}

    # Batch 1 reaches the table: batch 2's writes stay over it, batch 1's others leave the overlay.
    table.update({"0:a:t/u": b'{"type":"account","n":1}', "0:pos": pos1})
    del table["0:d:3:t/ue"]
    pending.settle(1, ["0:a:t/u", "0:pos", "0:d:3:t/ue"])
    assert len(pending) == 2 and pending.get("0:a:t/u") == b'{"type":"account","n":2}'
    pending.settle(2, ["0:a:t/u", "0:pos"])
    assert len(pending) == 0 and pending.get("0:a:t/u") == b'{"type":"account","n":1}'
