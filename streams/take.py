"""Faust's ``Stream.take_events`` with a window that grows under load.

faust-streaming 0.15.3's ``take_events(max_, within)`` yields what its buffer holds every ``within``
seconds. While the agent works on a batch the stream's drainer waits, so a batch holds only what the
stream delivers within one window: with the 2 ms a lone check may wait, a busy stream of one command
per record made batches of a few records per partition, and each paid its state transactions. Here
the window is short while batches are small (an idle stream, a trickle of checks) and long once a
batch was large (a backlog, where a check waits on the records before it anyway).

The body is Faust's, with the window chosen per batch (``Window.next``); its acks, buffer and passive
draining are unchanged (see faust/streams.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from faust.types import EventT, StreamT
from mode.utils.futures import notify


@dataclass
class Window:
    """How long the next batch gathers: ``short_s`` after a batch of fewer than ``grow_at`` events, else ``long_s``."""

    short_s: float
    long_s: float
    grow_at: int

    def next(self, last_batch: int) -> float:
        return self.long_s if last_batch >= self.grow_at else self.short_s


def take_events(stream: StreamT[Any], max_: int, window: Window) -> AsyncIterator[Sequence[EventT[Any]]]:
    """Lists of up to ``max_`` events, each gathered for ``window.next(len(previous))`` seconds.

    Registered on the stream as Faust registers its own, so that stopping the stream closes it.
    """
    agen = _take_events(stream, max_, window)
    stream._active_agens.add(agen)  # type: ignore[attr-defined]
    return agen


async def _take_events(stream: StreamT[Any], max_: int, window: Window) -> AsyncIterator[Sequence[EventT[Any]]]:
    s: Any = stream  # Faust's Stream: the private parts its own take_events uses
    buffer: list[Any] = []
    events: list[EventT[Any]] = []
    buffer_full = asyncio.Event()
    buffer_consumed = asyncio.Event()
    buffer_consuming: asyncio.Future[None] | None = None
    stream_enable_acks: bool = s.enable_acks
    channel_it = s.channel.__aiter__()

    async def add_to_buffer(value: Any) -> Any:
        nonlocal buffer_consuming
        try:
            if buffer_consuming is not None:  # the agent holds the last batch: wait until it is done with it
                try:
                    await buffer_consuming
                finally:
                    buffer_consuming = None
            buffer.append(value)
            event = s.current_event
            if event is None:
                raise RuntimeError("Take buffer found current_event is None")
            events.append(event)
            if len(buffer) >= max_:
                buffer_full.set()
                buffer_consumed.clear()
                await s.wait(buffer_consumed)
        except asyncio.CancelledError:  # pragma: no cover
            raise
        except Exception as exc:
            s.log.exception("Error adding to take buffer: %r", exc)
            await s.crash(exc)
        return value

    s.enable_acks = False  # acked here, once the agent is done with each batch
    s.add_processor(add_to_buffer)
    s._enable_passive(channel_it)
    last = 0
    try:
        while not s.should_stop:
            await s.wait_for_stopped(buffer_full, timeout=window.next(last))
            if buffer:
                buffer_consuming = s.loop.create_future()
                last = len(events)
                try:
                    yield list(events)
                finally:
                    buffer.clear()
                    for event in events:
                        await s.ack(event)
                    events.clear()
                    notify(buffer_consuming)
                    buffer_full.clear()
                    buffer_consumed.set()
            else:
                last = 0
    finally:
        s.enable_acks = stream_enable_acks
        s._processors.remove(add_to_buffer)
