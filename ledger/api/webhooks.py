"""Webhook endpoints per tenant: register (the signing secret is shown once), list, read, delete,
and each endpoint's delivery log. Deliveries themselves are made by `ledger webhooks`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response

from ledger.api.auth import require
from ledger.api.db import unit_of_work
from ledger.api.wire import JSONResponse, body_schema, decode, read_body
from ledger.control.keys import Scope
from ledger.control.store import (
    DELIVERIES_PAGE_MAX,
    WEBHOOK_DESCRIPTION_LENGTH_MAX,
    WEBHOOK_URL_LENGTH_MAX,
    ControlSession,
    Delivery,
    Principal,
    Webhook,
)
from ledger.control.webhook_urls import UnsafeURL, check_url

router = APIRouter(prefix="/webhooks", tags=["webhooks"])
DELIVERIES_PAGE_DEFAULT = 100


class NewWebhook(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: Annotated[str, msgspec.Meta(max_length=WEBHOOK_URL_LENGTH_MAX,
                                     description="Where gate events are POSTed: http or https.")]
    description: Annotated[str, msgspec.Meta(max_length=WEBHOOK_DESCRIPTION_LENGTH_MAX, pattern=r"^[^\x00]*$")] = ""


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def webhook_document(webhook: Webhook) -> dict[str, Any]:
    return {"id": webhook.id, "url": webhook.url, "description": webhook.description, "enabled": webhook.enabled,
            "created_at": _when(webhook.created_at)}


def delivery_document(delivery: Delivery) -> dict[str, Any]:
    return {"event_id": delivery.event_id, "state": delivery.state.value, "attempts": delivery.attempts,
            "last_status": delivery.last_status, "last_error": delivery.last_error,
            "next_attempt_at": _when(delivery.next_attempt_at), "delivered_at": _when(delivery.delivered_at),
            "created_at": _when(delivery.created_at)}


@router.post("", openapi_extra=body_schema(NewWebhook), response_class=JSONResponse, status_code=201,
             summary="Register an endpoint for the tenant's gate events; the answer holds its signing secret, once")
async def create_webhook(request: Request, who: Principal = Depends(require(Scope.admin))) -> JSONResponse:
    body = decode(await read_body(request), NewWebhook)
    try:
        await check_url(body.url, allow_private=request.app.state.settings.webhook_allow_private)
    except UnsafeURL as exc:
        raise HTTPException(422, str(exc)) from None

    def record(session: ControlSession) -> tuple[Webhook, str]:
        session.lock_tenant(who.tenant_id)  # the webhooks quota counts under it
        return session.create_webhook(who.tenant_id, body.url, body.description)

    webhook, secret = await unit_of_work(request, record)  # a full quota answers 409
    return JSONResponse({**webhook_document(webhook), "secret": secret}, status_code=201)


@router.get("", response_class=JSONResponse, summary="The tenant's endpoints (never their secrets)")
def list_webhooks(request: Request, who: Principal = Depends(require(Scope.admin))) -> JSONResponse:
    with request.app.state.store.session() as session:
        found = session.webhooks(who.tenant_id)
    return JSONResponse({"webhooks": [webhook_document(w) for w in found]})


@router.get("/{webhook_id}", response_class=JSONResponse, summary="One endpoint")
def get_webhook(webhook_id: str, request: Request, who: Principal = Depends(require(Scope.admin))) -> JSONResponse:
    with request.app.state.store.session() as session:
        webhook = session.webhook(who.tenant_id, webhook_id)
    if webhook is None:
        raise HTTPException(404, f"no webhook {webhook_id}")
    return JSONResponse(webhook_document(webhook))


@router.delete("/{webhook_id}", status_code=204, response_class=Response,
               summary="Delete an endpoint with its delivery log; pending retries are dropped")
def delete_webhook(webhook_id: str, request: Request, who: Principal = Depends(require(Scope.admin))) -> Response:
    if not request.app.state.store.transact(lambda session: session.delete_webhook(who.tenant_id, webhook_id)):
        raise HTTPException(404, f"no webhook {webhook_id}")
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_class=JSONResponse,
            summary="The endpoint's delivery log, newest first: state, attempts, last status or error, next attempt")
def list_deliveries(webhook_id: str, request: Request, who: Principal = Depends(require(Scope.admin)),
                    limit: int = Query(DELIVERIES_PAGE_DEFAULT, ge=1, le=DELIVERIES_PAGE_MAX)) -> JSONResponse:
    with request.app.state.store.session() as session:
        if session.webhook(who.tenant_id, webhook_id) is None:
            raise HTTPException(404, f"no webhook {webhook_id}")
        found = session.deliveries(who.tenant_id, webhook_id, limit)
    return JSONResponse({"webhook_id": webhook_id, "deliveries": [delivery_document(d) for d in found]})
