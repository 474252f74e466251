"""Metered model calls: reserve first, call the model only if admitted, record what the response says it used.

    with metered_call(ledger, user="u42", model="gpt-4o", input_tokens=2_000) as call:
        response = openai.chat.completions.create(model="gpt-4o", messages=...)
        call.record(response)

A 402 raises ``Blocked`` on entry, so the block's model call never runs. ``record`` reads the
response's ``usage`` (``prompt_tokens``, ``completion_tokens``) and sends it with the reservation
id, which settles the reservation at the actual cost. A block that raises records nothing: the
reservation expires after its ttl.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from ledger_sdk._client import AsyncLedgerClient, LedgerClient
from ledger_sdk._types import CheckResult, Outcome, UsageEvent


def usage_tokens(response: Any) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of an OpenAI-style response: an object or a JSON mapping."""
    usage = response.get("usage") if isinstance(response, Mapping) else getattr(response, "usage", None)
    if usage is None:
        raise ValueError("the model's response has no `usage` field to record")

    def field(name: str) -> int:
        value = usage.get(name) if isinstance(usage, Mapping) else getattr(usage, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"the response's usage.{name} is {value!r}, not a token count")
        return value

    return field("prompt_tokens"), field("completion_tokens")


class MeteredCall:
    """One admitted call: its reservation, then the event recorded for it."""

    def __init__(self, reservation: CheckResult, user: str, model: str, session_id: str) -> None:
        self.reservation = reservation
        self.outcome: Outcome | None = None
        self._user, self._model, self._session_id = user, model, session_id

    def usage_event(self, response: Any) -> UsageEvent:
        if self.outcome is not None:
            raise RuntimeError("this call's usage is recorded already")
        prompt, completion = usage_tokens(response)
        return UsageEvent(user=self._user, model=self._model, input_tokens=prompt, output_tokens=completion,
                          session_id=self._session_id, reservation_id=self.reservation.reservation_id)

    def _check_recorded(self) -> None:
        if self.outcome is None:
            raise RuntimeError("the metered block ended without call.record(response): nothing was recorded")


class SyncMeteredCall(MeteredCall):
    def __init__(self, client: LedgerClient, reservation: CheckResult, user: str, model: str, session_id: str) -> None:
        super().__init__(reservation, user, model, session_id)
        self._client = client

    def record(self, response: Any) -> Outcome:
        self.outcome = self._client.record_usage_batch([self.usage_event(response)])[0]
        return self.outcome


class AsyncMeteredCall(MeteredCall):
    def __init__(self, client: AsyncLedgerClient, reservation: CheckResult, user: str, model: str,
                 session_id: str) -> None:
        super().__init__(reservation, user, model, session_id)
        self._client = client

    async def record(self, response: Any) -> Outcome:
        self.outcome = (await self._client.record_usage_batch([self.usage_event(response)]))[0]
        return self.outcome


@contextmanager
def metered_call(client: LedgerClient, user: str, model: str, *, session_id: str = "default",
                 input_tokens: int | None = None, output_tokens: int | None = None,
                 ttl_seconds: int | None = None) -> Iterator[SyncMeteredCall]:
    """Reserve (``Blocked`` on 402), run the block, and insist that it recorded the response's usage."""
    reservation = client.reserve(user, model, session_id=session_id, input_tokens=input_tokens,
                                 output_tokens=output_tokens, ttl_seconds=ttl_seconds)
    call = SyncMeteredCall(client, reservation, user, model, session_id)
    yield call
    call._check_recorded()


@asynccontextmanager
async def async_metered_call(client: AsyncLedgerClient, user: str, model: str, *, session_id: str = "default",
                             input_tokens: int | None = None, output_tokens: int | None = None,
                             ttl_seconds: int | None = None) -> AsyncIterator[AsyncMeteredCall]:
    """The async form of ``metered_call``."""
    reservation = await client.reserve(user, model, session_id=session_id, input_tokens=input_tokens,
                                       output_tokens=output_tokens, ttl_seconds=ttl_seconds)
    call = AsyncMeteredCall(client, reservation, user, model, session_id)
    yield call
    call._check_recorded()
