"""Plans: limits, cost rates and gate thresholds, as immutable versions.

A plan is read from the plans guide's JSON (top-level ``soft_gate_at`` /
``hard_gate_at`` plus a ``plans`` list) and becomes a :class:`Plan` version.
Changing a plan makes a new version; nothing edits one in place.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated, Literal

import msgspec

DEFAULT_SOFT_GATE_AT = Decimal("0.80")
DEFAULT_HARD_GATE_AT = Decimal("1.00")
DEFAULT_SESSION_TIMEOUT_MINUTES = Decimal("30")
GATE_RATIO_MAX = Decimal("10")
PLAN_NAME_LENGTH_MAX = 64
# Bounds on a plan's shape (docs/limits.md): each plan version is written to every partition of the
# usage log, which keeps it forever, and the processor holds it in its state. Each bound's name is the
# lower-case constant name, which the error message carries.
MODEL_NAME_LENGTH_MAX = 128  # = the longest model name a usage event can carry
TOOL_NAME_LENGTH_MAX = 128
PLAN_MAP_ENTRIES_MAX = 256  # entries of each map: cost_rates, model_limits, tool_costs
PLAN_DOCUMENT_BYTES_MAX = 64 * 1024  # one version as JSON, as the log carries it
PLANS_PER_FILE_MAX = 50  # plans per request or file (each is one record per partition)
# Bounds that keep every price computable in 38 digits (a plan at 1e999999 priced nothing).
AMOUNT_MAX = Decimal(1_000_000_000)
MARKUP_MAX = Decimal(100)
PLAN_NAMESPACE = uuid.UUID("6b0f7c1e-8a55-4d55-9a43-2f1d4a8f0c11")

# msgspec cannot bound a Decimal; _check_amounts does, naming the field.
NonNegative = Decimal
Ratio = Decimal
# Lengths are checked by build_plan, so the answer names the bound.
ModelName = Annotated[str, msgspec.Meta(min_length=1)]
ToolName = Annotated[str, msgspec.Meta(min_length=1)]


class CostRate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Dollars per 1,000 tokens."""

    input: NonNegative
    output: NonNegative


class ModelLimit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_tokens_per_period: Annotated[int, msgspec.Meta(ge=0)]


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """One immutable version of a plan. A limit of ``None`` or 0 means unlimited."""

    plan_id: str
    name: str
    version: int
    max_spend_per_period: Decimal | None = None
    max_spend_per_session: Decimal | None = None
    model_limits: dict[str, ModelLimit] = {}
    cost_rates: dict[str, CostRate] = {}
    default_cost_rate: CostRate | None = None
    tool_costs: dict[str, Decimal] = {}
    soft_gate_at: Decimal = DEFAULT_SOFT_GATE_AT
    hard_gate_at: Decimal = DEFAULT_HARD_GATE_AT
    session_timeout_minutes: Decimal = DEFAULT_SESSION_TIMEOUT_MINUTES
    markup: Decimal = Decimal(1)
    period_interval: Literal["month", "year"] = "month"
    billing_mode: Literal["subscription", "paygo"] = "subscription"
    trial_days: int = 0
    # Tokens assumed for a pre-call check that gives no estimate (priced as output tokens).
    pre_call_estimate: int | None = None

    def allows(self, model: str) -> bool:
        return model in self.cost_rates or model in self.model_limits

    def rate_for(self, model: str) -> CostRate | None:
        """The model's own rate, else the default rate; None if not allowed."""
        if not self.allows(model):
            return None
        return self.cost_rates.get(model, self.default_cost_rate)


class PlanSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One entry of the plans guide's ``plans`` list, as an operator writes it."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=PLAN_NAME_LENGTH_MAX, pattern=r"^[^\x00]*$")]
    max_spend_per_period: NonNegative | None = None
    max_spend_per_session: NonNegative | None = None
    model_limits: dict[ModelName, ModelLimit] = {}
    cost_rates: dict[ModelName, CostRate] = {}
    default_cost_rate: CostRate | None = None
    tool_costs: dict[ToolName, NonNegative] = {}
    soft_gate_at: Ratio | None = None
    hard_gate_at: Ratio | None = None
    session_timeout_minutes: Decimal = DEFAULT_SESSION_TIMEOUT_MINUTES
    markup: Decimal = Decimal(1)
    period_interval: Literal["month", "year"] = "month"
    billing_mode: Literal["subscription", "paygo"] = "subscription"
    trial_days: Annotated[int, msgspec.Meta(ge=0, le=366)] = 0
    pre_call_estimate: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] | None = None


class PlansConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The plans guide's request body: global gate thresholds and the plans."""

    plans: list[PlanSpec]  # at most PLANS_PER_FILE_MAX: check_plan_count names the bound
    soft_gate_at: Ratio = DEFAULT_SOFT_GATE_AT
    hard_gate_at: Ratio = DEFAULT_HARD_GATE_AT


class PlanError(ValueError):
    """A plan configuration that cannot be accepted; the message names the field."""


def plan_id_for(tenant: str, name: str) -> str:
    """Deterministic id of a plan defined in a file, so re-loading it is idempotent."""
    return str(uuid.uuid5(PLAN_NAMESPACE, f"{tenant}/{name}"))


def parse_plans_config(raw: bytes | str) -> PlansConfig:
    try:
        config = msgspec.json.decode(raw, type=PlansConfig)
    except msgspec.ValidationError as exc:
        raise PlanError(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise PlanError(f"not valid JSON: {exc}") from None
    check_plan_count(config)
    return config


def check_plan_count(config: PlansConfig) -> None:
    if len(config.plans) > PLANS_PER_FILE_MAX:
        raise PlanError(f"plans: plans_per_file_max: at most {PLANS_PER_FILE_MAX} plans per request or file, "
                        f"got {len(config.plans)}")


def check_plan_shape(plan: Plan) -> None:
    """The bounds on a plan version's maps, names and size; PlanError names the bound that is passed."""
    where = f"plan {plan.name!r}"
    maps: list[tuple[str, dict[str, object], int, str]] = [
        ("cost_rates", dict(plan.cost_rates), MODEL_NAME_LENGTH_MAX, "model_name_length_max"),
        ("model_limits", dict(plan.model_limits), MODEL_NAME_LENGTH_MAX, "model_name_length_max"),
        ("tool_costs", dict(plan.tool_costs), TOOL_NAME_LENGTH_MAX, "tool_name_length_max"),
    ]
    for field, entries, length_max, length_bound in maps:
        if len(entries) > PLAN_MAP_ENTRIES_MAX:
            raise PlanError(f"{where}: {field}: plan_map_entries_max: at most {PLAN_MAP_ENTRIES_MAX} entries, "
                            f"got {len(entries)}")
        long = next((name for name in entries if len(name) > length_max), None)
        if long is not None:
            raise PlanError(f"{where}: {field}: {length_bound}: a name is at most {length_max} characters, "
                            f"got {len(long)} ({long[:32]!r}...)")
    size = len(msgspec.json.encode(plan))
    if size > PLAN_DOCUMENT_BYTES_MAX:
        raise PlanError(f"{where}: plan_document_bytes_max: a plan version is at most {PLAN_DOCUMENT_BYTES_MAX} "
                        f"bytes as JSON, this one is {size}")


def build_plan(spec: PlanSpec, config: PlansConfig, *, plan_id: str, version: int) -> Plan:
    """Resolve a spec against the global defaults into one validated plan version."""
    _check_amounts(spec, config)
    soft = spec.soft_gate_at if spec.soft_gate_at is not None else config.soft_gate_at
    hard = spec.hard_gate_at if spec.hard_gate_at is not None else config.hard_gate_at
    if soft > hard:
        raise PlanError(f"plan {spec.name!r}: soft_gate_at {soft} is above hard_gate_at {hard}")
    for model in spec.model_limits:
        if model not in spec.cost_rates and spec.default_cost_rate is None:
            raise PlanError(
                f"plan {spec.name!r}: model {model!r} has a limit but no cost rate "
                "and the plan has no default_cost_rate"
            )
    fields = msgspec.structs.asdict(spec)
    fields.update(soft_gate_at=soft, hard_gate_at=hard)
    plan = Plan(plan_id=plan_id, version=version, **fields)
    check_plan_shape(plan)
    return plan


def _check_amounts(spec: PlanSpec, config: PlansConfig) -> None:
    where = f"plan {spec.name!r}"
    amounts: list[tuple[str, Decimal | None]] = [
        ("max_spend_per_period", spec.max_spend_per_period),
        ("max_spend_per_session", spec.max_spend_per_session),
    ]
    rates = dict(spec.cost_rates)
    if spec.default_cost_rate is not None:
        rates["default_cost_rate"] = spec.default_cost_rate
    for model, rate in rates.items():
        amounts += [(f"cost_rates.{model}.input", rate.input), (f"cost_rates.{model}.output", rate.output)]
    amounts += [(f"tool_costs.{tool}", cost) for tool, cost in spec.tool_costs.items()]
    for field, value in amounts:
        if value is not None and (not value.is_finite() or not 0 <= value <= AMOUNT_MAX):
            raise PlanError(f"{where}: {field} must be a number from 0 to {AMOUNT_MAX}, got {value}")
    ratios = [("soft_gate_at", spec.soft_gate_at), ("hard_gate_at", spec.hard_gate_at),
              ("soft_gate_at (global)", config.soft_gate_at), ("hard_gate_at (global)", config.hard_gate_at)]
    for field, ratio in ratios:
        if ratio is not None and not (ratio.is_finite() and 0 < ratio <= GATE_RATIO_MAX):
            raise PlanError(f"{where}: {field} must be above 0 and at most {GATE_RATIO_MAX}, got {ratio}")
    if not (spec.session_timeout_minutes.is_finite() and spec.session_timeout_minutes > 0):
        raise PlanError(f"{where}: session_timeout_minutes must be positive")
    if not (spec.markup.is_finite() and 0 < spec.markup <= MARKUP_MAX):
        raise PlanError(f"{where}: markup must be above 0 and at most {MARKUP_MAX}")


def plans_from_config(config: PlansConfig, tenant: str) -> list[Plan]:
    """Version 1 of every plan in a plans-guide config, with deterministic ids."""
    check_plan_count(config)
    names = [spec.name for spec in config.plans]
    if len(set(names)) != len(names):
        raise PlanError("plan names must be unique within one config")
    return [
        build_plan(spec, config, plan_id=plan_id_for(tenant, spec.name), version=1)
        for spec in config.plans
    ]


class PlanPatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A partial update: only the fields present change (``null`` clears a limit)."""

    max_spend_per_period: NonNegative | None | msgspec.UnsetType = msgspec.UNSET
    max_spend_per_session: NonNegative | None | msgspec.UnsetType = msgspec.UNSET
    model_limits: dict[ModelName, ModelLimit] | msgspec.UnsetType = msgspec.UNSET
    cost_rates: dict[ModelName, CostRate] | msgspec.UnsetType = msgspec.UNSET
    default_cost_rate: CostRate | None | msgspec.UnsetType = msgspec.UNSET
    tool_costs: dict[ToolName, NonNegative] | msgspec.UnsetType = msgspec.UNSET
    soft_gate_at: Ratio | msgspec.UnsetType = msgspec.UNSET
    hard_gate_at: Ratio | msgspec.UnsetType = msgspec.UNSET
    session_timeout_minutes: Decimal | msgspec.UnsetType = msgspec.UNSET
    markup: Decimal | msgspec.UnsetType = msgspec.UNSET
    period_interval: Literal["month", "year"] | msgspec.UnsetType = msgspec.UNSET
    billing_mode: Literal["subscription", "paygo"] | msgspec.UnsetType = msgspec.UNSET
    trial_days: Annotated[int, msgspec.Meta(ge=0, le=366)] | msgspec.UnsetType = msgspec.UNSET
    pre_call_estimate: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] | None | msgspec.UnsetType = msgspec.UNSET


def revise(plan: Plan, patch: PlanPatch) -> Plan:
    """The next version of ``plan``: its fields, overlaid with the patch, validated again."""
    fields = {name: getattr(plan, name) for name in PlanSpec.__struct_fields__}
    fields |= {name: value for name in PlanPatch.__struct_fields__
               if (value := getattr(patch, name)) is not msgspec.UNSET}
    spec = PlanSpec(**fields)
    return build_plan(spec, PlansConfig(plans=[spec]), plan_id=plan.plan_id, version=plan.version + 1)
