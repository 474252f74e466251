"""Keeping what startup built out of the cyclic collector's full passes.

A full (generation 2) collection walks every tracked object: the libraries' and the
app's, made once at startup and never freed. At 200 checks/s such a pass took 38 to
90 ms in the API, the worker and the benchmark's client alike, about once a minute
in each, and every request in flight waited for it: those pauses were a good part of
the p99 of a check (docs/benchmarks.md). ``gc.freeze`` moves every object alive now
to a permanent generation that later passes skip; the collection before it leaves no
garbage behind to be frozen with them.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Call once, in a process's entry point, when startup is done: what exists then is kept out of later
    collections, for good (so never in a process that builds and drops apps, such as the tests')."""
    gc.collect()
    gc.freeze()
