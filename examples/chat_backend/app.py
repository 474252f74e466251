"""A small chat backend built on the ledger SDK.

``POST /chat`` wraps the model call in ``async_metered_call``: the ledger reserves first, a blocked
user gets a 402 page and the model is never called, and the response's ``usage`` is recorded
against the reservation. ``POST /webhooks/ledger`` receives gate webhooks, verified with the
tenant's webhook secret. ``GET /users/{user}/budget`` shows what the user has left.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from ledger_sdk import AsyncLedgerClient, Blocked, NotFound, async_metered_call

PROMPT_CHARS_MAX = 8_000
GATES_REMEMBERED_MAX = 10_000  # users whose last gate event the backend keeps in memory


@dataclass(frozen=True)
class ChatSettings:
    ledger_url: str
    api_key: str
    model_url: str
    webhook_secret: str
    model: str = "gpt-4o-mini"
    # Reserved before each call; the actual usage settles it.
    input_tokens_estimate: int = 1_000
    output_tokens_estimate: int = 500

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ChatSettings:
        env = os.environ if env is None else env
        return cls(ledger_url=env.get("LEDGER_URL", "http://127.0.0.1:18000"), api_key=env["LEDGER_API_KEY"],
                   model_url=env["CHAT_MODEL_URL"], webhook_secret=env.get("LEDGER_WEBHOOK_SECRET", ""),
                   model=env.get("CHAT_MODEL", "gpt-4o-mini"))


class ChatIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user: str
    message: str
    session_id: str = "default"


def create_app(settings: ChatSettings, *, ledger_transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    last_gate: dict[str, dict[str, Any]] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncLedgerClient(settings.ledger_url, settings.api_key, transport=ledger_transport) as ledger, \
                httpx.AsyncClient(base_url=settings.model_url, timeout=60) as model:
            app.state.ledger, app.state.model = ledger, model
            yield

    app = FastAPI(title="chat backend (ledger SDK example)", lifespan=lifespan)

    @app.post("/chat")
    async def chat(request: Request) -> JSONResponse:
        try:
            body = msgspec.json.decode(await request.body(), type=ChatIn)
        except msgspec.DecodeError as exc:
            raise HTTPException(422, str(exc)) from None
        if len(body.message) > PROMPT_CHARS_MAX:
            raise HTTPException(413, f"message is longer than {PROMPT_CHARS_MAX} characters")
        try:
            async with async_metered_call(app.state.ledger, body.user, settings.model, session_id=body.session_id,
                                          input_tokens=settings.input_tokens_estimate,
                                          output_tokens=settings.output_tokens_estimate) as call:
                answer = await app.state.model.post("/chat/completions", json={
                    "model": settings.model, "messages": [{"role": "user", "content": body.message}]})
                answer.raise_for_status()
                completion = answer.json()
                await call.record(completion)
        except Blocked as blocked:
            return JSONResponse({"error": "budget exhausted", "reason": blocked.reason,
                                 "dimension": blocked.dimension}, status_code=402)
        return JSONResponse({"reply": completion["choices"][0]["message"]["content"], "usage": completion["usage"],
                             "warning": call.reservation.reason if call.reservation.decision == "warn" else None})

    @app.post("/webhooks/ledger", status_code=204)
    async def gate_webhook(request: Request) -> None:
        from ledger_sdk.webhooks import WebhookVerificationError, verify

        body = await request.body()
        try:
            verify(settings.webhook_secret, request.headers, body)
        except WebhookVerificationError as exc:
            raise HTTPException(400, f"webhook rejected: {exc}") from None
        payload = msgspec.json.decode(body)
        gate = payload.get("data", payload) if isinstance(payload, dict) else {}
        if isinstance(gate, dict) and isinstance(gate.get("user"), str):
            if len(last_gate) >= GATES_REMEMBERED_MAX and gate["user"] not in last_gate:
                last_gate.pop(next(iter(last_gate)))
            last_gate[gate["user"]] = gate

    @app.get("/users/{user}/budget")
    async def budget(user: str) -> JSONResponse:
        try:
            spend = await app.state.ledger.spend(user)
        except NotFound:
            raise HTTPException(404, f"{user} has no plan") from None
        return JSONResponse({
            "user": user, "status": spend.status, "plan": spend.plan_name, "period_end": spend.period_end.isoformat(),
            "period_spend": str(spend.period_spend),
            "limits": [{"dimension": limit.dimension, "model": limit.model, "limit": str(limit.limit),
                        "used": str(limit.used), "remaining": str(limit.remaining), "status": limit.status}
                       for limit in spend.limits],
            "balance": None if spend.balance is None else str(spend.balance),
            "last_gate": last_gate.get(user),
        })

    return app
