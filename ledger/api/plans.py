"""Plans: the plans guide's API, verbatim. Every new version goes to the log."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import msgspec
from fastapi import APIRouter, Depends, HTTPException, Request

from ledger.api.auth import require
from ledger.api.db import published, unit_of_work
from ledger.api.wire import JSONResponse, body_schema, decode, read_body
from ledger.control.config import plan_published
from ledger.control.keys import Scope
from ledger.control.outbox import enqueue
from ledger.control.store import ControlSession, Principal
from ledger.plans import Plan, PlanError, PlanPatch, PlansConfig, build_plan, check_plan_count, revise

router = APIRouter(prefix="/config/plans", tags=["plans"])


def plan_document(plan: Plan) -> dict[str, Any]:
    """A plan as the API shows it: its id, then every field with defaults filled."""
    fields = msgspec.to_builtins(plan, builtin_types=(Decimal,))
    return {"id": fields.pop("plan_id"), **fields}


@router.post("", openapi_extra=body_schema(PlansConfig), response_class=JSONResponse,
             summary="Create plans (names that exist are skipped and listed under duplicates)")
async def create_plans(request: Request, who: Principal = Depends(require(Scope.admin))) -> JSONResponse:
    config = decode(await read_body(request), PlansConfig)
    try:
        check_plan_count(config)
    except PlanError as exc:
        raise HTTPException(422, str(exc)) from None

    def record(session: ControlSession) -> tuple[list[Plan], list[dict[str, str]], list[int]]:
        session.lock_tenant(who.tenant_id)
        existing = {p.name: p.plan_id for p in session.plans(who.tenant_id)}
        created: list[Plan] = []
        duplicates: list[dict[str, str]] = []
        for spec in config.plans:
            if spec.name in existing:
                duplicates.append({"name": spec.name, "id": existing[spec.name]})
                continue
            try:
                plan = build_plan(spec, config, plan_id=str(uuid.uuid4()), version=1)
            except PlanError as exc:
                raise HTTPException(422, str(exc)) from None
            session.add_plan_version(who.tenant_id, plan)
            existing[plan.name] = plan.plan_id
            created.append(plan)
        return created, duplicates, enqueue(session, who.tenant_id, [plan_published(who.tenant_id, p) for p in created])

    created, duplicates, seqs = await unit_of_work(request, record)
    await published(request, seqs)
    return JSONResponse({"plans": [plan_document(p) for p in created], "duplicates": duplicates},
                        status_code=201 if created else 200)


@router.get("", response_class=JSONResponse, summary="Every plan, newest version, defaults filled")
def list_plans(request: Request, who: Principal = Depends(require(Scope.admin, Scope.read))) -> JSONResponse:
    with request.app.state.store.session() as session:
        return JSONResponse({"plans": [plan_document(p) for p in session.plans(who.tenant_id)]})


@router.get("/{plan_id}", response_class=JSONResponse, summary="One plan, newest version")
def get_plan(plan_id: str, request: Request, who: Principal = Depends(require(Scope.admin, Scope.read))
             ) -> JSONResponse:
    with request.app.state.store.session() as session:
        plan = session.plan(who.tenant_id, plan_id)
    if plan is None:
        raise HTTPException(404, f"no plan {plan_id}")
    return JSONResponse(plan_document(plan))


@router.patch("/{plan_id}", openapi_extra=body_schema(PlanPatch), response_class=JSONResponse,
              summary="Update some fields: a new immutable version; running sessions keep theirs")
async def patch_plan(plan_id: str, request: Request, who: Principal = Depends(require(Scope.admin))) -> JSONResponse:
    patch = decode(await read_body(request), PlanPatch)
    return JSONResponse(plan_document(await revise_plan(request, who.tenant_id, plan_id, patch)))


async def revise_plan(request: Request, tenant_id: str, plan_id: str, patch: PlanPatch) -> Plan:
    """Record the plan's next version and publish it (404 no plan, 422 a bad patch, 409 a full quota).

    The PATCH route and the console's plan form both come here.
    """
    def record(session: ControlSession) -> tuple[Plan, list[int]]:
        session.lock_tenant(tenant_id)  # so two PATCHes of one plan make two versions, one after the other
        current = session.plan(tenant_id, plan_id)
        if current is None:
            raise HTTPException(404, f"no plan {plan_id}")
        try:
            plan = revise(current, patch)
        except PlanError as exc:
            raise HTTPException(422, str(exc)) from None
        session.add_plan_version(tenant_id, plan)
        return plan, enqueue(session, tenant_id, [plan_published(tenant_id, plan)])

    plan, seqs = await unit_of_work(request, record)
    await published(request, seqs)
    return plan
