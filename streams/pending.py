"""State folded but not yet durable, read over the table by the next batch's fold.

The worker folds batch N+1 while batch N's state is still being written (see
``streams.app.PartitionLedger``). N+1 must see N's writes: this overlay holds
them until N's transaction has committed and the table has them. A write
of N+1 to the same key replaces N's in the overlay, and settling N leaves it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from streams.codecs import table_form


class PendingState:
    def __init__(self, table: Callable[[], Mapping[str, Any]]) -> None:
        self._table = table  # the table's current store (Faust may replace it)
        self._values: dict[str, tuple[int, Any]] = {}  # key -> (batch number, value as the table will hold it)

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: str) -> Any:
        """The newest value of ``key``: pending, else stored; None if absent or deleted."""
        if key in self._values:
            return self._values[key][1]
        return self._table().get(key)

    def scan(self, prefix: str) -> Iterator[tuple[str, Any]]:
        """Every present key with this prefix and its newest value. Consume it before the next await."""
        pending = self._values
        for key, value in self._table().items():
            if key.startswith(prefix) and key not in pending:
                yield key, value
        for key, (_n, value) in pending.items():
            if key.startswith(prefix) and value is not None:
                yield key, value

    def stage(self, number: int, writes: Iterable[tuple[str, Any, bytes | None]]) -> None:
        """Batch ``number``'s writes (key, value, encoded; None deletes), readable until it is settled."""
        for key, value, raw in writes:
            self._values[key] = (number, table_form(value, raw))

    def settle(self, number: int, keys: Iterable[str]) -> None:
        """Batch ``number`` is in the table (or dropped): its writes no later batch replaced leave the overlay."""
        for key in keys:
            staged = self._values.get(key)
            if staged is not None and staged[0] == number:
                del self._values[key]

    def clear(self) -> None:
        self._values.clear()
