"""Tiers: created from the tiers guide's YAML (or JSON), listed with their margins."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec
import yaml
from fastapi import APIRouter, Depends, HTTPException, Request

from ledger.api.auth import require
from ledger.api.db import published, unit_of_work
from ledger.api.wire import JSON_DEPTH_MAX, JSONResponse, depth_problem, read_body
from ledger.control.config import TierRecord, create_tiers
from ledger.control.keys import Scope
from ledger.control.store import ControlSession, Principal
from ledger.plans import PlanError
from ledger.tiers import Tier, TierError, display, margin, parse_tier, parse_tiers_yaml

router = APIRouter(prefix="/config/tiers", tags=["tiers"])

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain")


def tier_document(record: TierRecord) -> dict[str, Any]:
    tier = record.tier
    doc: dict[str, Any] = {"id": record.id, "plan_id": record.plan_id,
                           **msgspec.to_builtins(tier, builtin_types=(Decimal,))}
    if tier.budget_usd is None:
        doc["margin"] = None  # unlimited or pay-as-you-go: no fixed margin
    else:
        shown = display(margin(tier))
        doc["margin"] = {"price_usd": shown.price_usd, "budget_usd": shown.budget_usd, "cost_usd": shown.cost_usd,
                         "profit_usd": shown.profit_usd, "margin_pct": shown.margin_pct}
    return doc


def _parse(body: bytes, content_type: str) -> list[Tier]:
    problem = depth_problem(body)  # YAML's flow style nests with the same brackets
    if problem is not None:
        raise HTTPException(422, problem)
    try:
        if content_type.split(";")[0].strip() in YAML_TYPES:
            return parse_tiers_yaml(body.decode("utf-8"))
        raw = msgspec.json.decode(body)
        return [parse_tier(item, where=f"tiers[{i}]") for i, item in enumerate(raw if isinstance(raw, list) else [raw])]
    except (TierError, UnicodeDecodeError, yaml.YAMLError, msgspec.DecodeError) as exc:
        raise HTTPException(422, str(exc)) from None
    except RecursionError:  # YAML's block style nests by indentation, which the bracket count does not see
        raise HTTPException(422, f"body nests too deep; at most {JSON_DEPTH_MAX} levels are accepted") from None


@router.post("", response_class=JSONResponse, summary="Create tiers from the guide's YAML (or JSON); each gets a plan",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/yaml": {"schema": {"type": "string"}},
                 "application/json": {"schema": {"type": "object"}}}}})
async def post_tiers(request: Request, who: Principal = Depends(require(Scope.admin))) -> JSONResponse:
    tiers = _parse(await read_body(request), request.headers.get("content-type", "application/json"))
    catalog = request.app.state.catalog

    def record(session: ControlSession) -> tuple[list[TierRecord], list[TierRecord], list[int]]:
        try:
            return create_tiers(session, who.tenant_id, tiers, catalog)
        except (TierError, PlanError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from None

    created, duplicates, seqs = await unit_of_work(request, record)
    await published(request, seqs)
    return JSONResponse({"tiers": [tier_document(r) for r in created],
                         "duplicates": [{"tier_code": r.tier.tier_code, "id": r.id} for r in duplicates]},
                        status_code=201 if created else 200)


@router.get("", response_class=JSONResponse, summary="Every tier with its margin")
def list_tiers(request: Request, who: Principal = Depends(require(Scope.admin, Scope.read))) -> JSONResponse:
    with request.app.state.store.session() as session:
        records = [TierRecord(*row) for row in session.tiers(who.tenant_id)]
    return JSONResponse({"tiers": [tier_document(r) for r in records]})


@router.get("/{tier_id}", response_class=JSONResponse, summary="One tier with its margin")
def get_tier(tier_id: str, request: Request, who: Principal = Depends(require(Scope.admin, Scope.read))) -> JSONResponse:
    with request.app.state.store.session() as session:
        row = session.tier(who.tenant_id, tier_id)
    if row is None:
        raise HTTPException(404, f"no tier {tier_id}")
    return JSONResponse(tier_document(TierRecord(*row)))

