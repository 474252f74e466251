"""An independent oracle for workloads in one period and one session per user.

It re-reads the plans file and prices with Fractions, so it shares no code with
the core beyond the plans guide's JSON.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from tests.factories import SEED_PLANS_JSON

_config = json.loads(SEED_PLANS_JSON, parse_float=Fraction)
PLANS = {p["name"]: p for p in _config["plans"]}
SOFT, HARD = Fraction(_config["soft_gate_at"]), Fraction(_config["hard_gate_at"])


def cost(plan: str, model: str, input_tokens: int, output_tokens: int) -> Fraction:
    rate = PLANS[plan]["cost_rates"][model]
    exact = input_tokens * Fraction(rate["input"]) / 1000 + output_tokens * Fraction(rate["output"]) / 1000
    return Fraction(round(exact * 10**12), 10**12)


@dataclass
class UserOracle:
    plan: str
    spend: Fraction = Fraction(0)
    tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # (kind, dimension, model) -> event id that first reached the threshold
    crossings: dict[tuple[str, str, str | None], str] = field(default_factory=dict)

    def apply(self, event_id: str, model: str, input_tokens: int, output_tokens: int) -> None:
        p = PLANS[self.plan]
        self.spend += cost(self.plan, model, input_tokens, output_tokens)
        self.tokens[model] += input_tokens + output_tokens
        checks = [("period_spend", None, self.spend, p.get("max_spend_per_period")),
                  ("session_spend", None, self.spend, p.get("max_spend_per_session")),
                  ("model_tokens", model, self.tokens[model], p["model_limits"].get(model, {}).get("max_tokens_per_period"))]
        for dimension, m, used, limit in checks:
            if not limit:
                continue
            for kind, ratio in (("soft_warning", SOFT), ("hard_block", HARD)):
                if used >= ratio * Fraction(limit):
                    self.crossings.setdefault((kind, dimension, m), event_id)

    @property
    def spend_decimal(self) -> Decimal:
        return Decimal(self.spend.numerator) / Decimal(self.spend.denominator)
