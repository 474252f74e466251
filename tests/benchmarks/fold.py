"""The processor's fold alone, in-process with no Kafka: CPU µs per command, beside a bare decode of the same records.

The pipeline benchmark's workload (2,000 users, 40,000 usage events by default) in envelopes, folded 5 records
at a time over a dict standing for the table, each batch's state stored before the next (as the worker's
writer does). What it measures is what every command costs whatever carries it: decode, decide, the outputs'
and the state's encoding. ``--profile`` adds a cProfile listing.

    python -m tests.benchmarks.fold [--events 40000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from typing import Any

from ledger.events import Envelope
from ledger_sdk.envelopes import ENVELOPE_KEY
from streams.codecs import decode_command, decode_record, table_form
from streams.processor import Record, UsageProcessor
from streams.publisher import usage_records
from streams.topics import Topics
from tests.benchmarks.pipeline import workload

PARTITIONS = 8
RECORDS_PER_BATCH = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    setup, calls = workload(args.users, args.events)
    offsets: dict[int, int] = {}
    records = []
    for p, key, value in usage_records([*setup, *calls], PARTITIONS, envelopes=True):
        offsets[p] = offsets.get(p, -1) + 1
        records.append(Record("bench.usage", p, offsets[p], key, value))
    head = [r for r in records if r.key != ENVELOPE_KEY]
    body = [r for r in records if r.key == ENVELOPE_KEY]

    table: dict[str, Any] = {}
    processor = UsageProcessor(Topics.for_namespace("bench"), table.get,
                               lambda prefix: [(k, v) for k, v in table.items() if k.startswith(prefix)],
                               partitions=PARTITIONS)

    def fold(batch_records: list[Record]) -> None:
        batch = processor.run(batch_records)
        for key, value in batch.writes.items():
            held = table_form(value, batch.encoded[key])
            if held is None:
                table.pop(key, None)
            else:
                table[key] = held

    def fold_all() -> None:
        for i in range(0, len(body), RECORDS_PER_BATCH):
            fold(body[i:i + RECORDS_PER_BATCH])

    fold(head)  # plans and assignments
    started = time.process_time()
    for r in body:
        envelope = decode_record(r.value or b"")
        assert isinstance(envelope, Envelope)
        for raw in envelope.commands:
            decode_command(bytes(raw))
    decode_s = time.process_time() - started
    started = time.process_time()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(fold_all)
    else:
        fold_all()
    fold_s = time.process_time() - started
    print(f"{len(calls):,} usage commands in {len(body):,} envelopes, {args.users:,} users")
    print(f"baseline: decoding envelopes and commands:    {decode_s * 1e6 / len(calls):6.1f} CPU µs per command")
    print(f"fold (UsageProcessor.run, state stored):      {fold_s * 1e6 / len(calls):6.1f} CPU µs per command"
          + (" (under cProfile)" if args.profile else ""))
    if args.profile:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
