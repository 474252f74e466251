"""Per-tenant quotas of the control plane: each a named limit with its bound (see docs/limits.md).

A write past one answers 409 with the limit's name and value. The request rate per API key has
defaults in the typed settings and may be set per tenant (``ledger tenants rate``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    name: str
    value: int
    what: str  # what is counted, for the message


PLANS_PER_TENANT = Limit("plans_per_tenant_max", 200, "plans (each tier is a plan too)")
VERSIONS_PER_PLAN = Limit("versions_per_plan_max", 100, "versions of one plan")
# All versions of one plan, as JSON bytes: the processor stores them as one value, which must stay well
# under its record limit (streams.processor.RECORD_BYTES_MAX, 1,000,000 bytes) so that it never refuses
# (too_large) a version the API accepted.
PLAN_HISTORY_BYTES = Limit("plan_history_bytes_max", 768 * 1024, "bytes of all versions of one plan")
USERS_PER_TENANT = Limit("users_per_tenant_max", 100_000, "users")
TIERS_PER_TENANT = Limit("tiers_per_tenant_max", 100, "tiers")
WEBHOOKS_PER_TENANT = Limit("webhooks_per_tenant_max", 20, "webhooks")
ALL = (PLANS_PER_TENANT, VERSIONS_PER_PLAN, PLAN_HISTORY_BYTES, USERS_PER_TENANT, TIERS_PER_TENANT, WEBHOOKS_PER_TENANT)

# A request rate or burst set per tenant is at most this (requests per second, requests).
RATE_VALUE_MAX = 1_000_000
