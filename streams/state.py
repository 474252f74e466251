"""The processor's table: its keys, and the position record it keeps beside the accounts.

Every key names its usage-log partition (``"<partition>:..."``), so a value lives
in the changelog partition of the usage partition whose records made it. Beside
each partition's accounts, their remembered command ids and plan histories the table holds one
:class:`Position`: the next usage-log offset that partition must apply. It is
written after the outputs and state of the records before it are durable, in the
same changelog partition, so a restore finds state and position together.
"""

from __future__ import annotations

import msgspec

from ledger.events import user_key


class Position(msgspec.Struct, kw_only=True, tag="position"):
    """The next usage-log offset of ``partition`` to apply: everything before it is applied and durable."""

    partition: int
    next_offset: int


def account_key(partition: int, tenant: str, user: str) -> str:
    return f"{partition}:a:{user_key(tenant, user)}"


def plan_key(partition: int, tenant: str, plan_id: str) -> str:
    return f"{partition}:p:{tenant}/{plan_id}"


def dedup_key(partition: int, tenant: str, user: str, event_id: str) -> str:
    """Where a user's remembered command id is stored (``ledger.account.Seen``), one value per id.

    The user's key is length-prefixed: a user name or an event id may hold any character.
    """
    owner = user_key(tenant, user)
    return f"{partition}:d:{len(owner)}:{owner}{event_id}"


def dedup_owner(table_key: str) -> str:
    """The account key of the user a dedup key belongs to."""
    partition, _d, rest = table_key.split(":", 2)
    length, rest = rest.split(":", 1)
    return f"{partition}:a:{rest[:int(length)]}"


def position_key(partition: int) -> str:
    return f"{partition}:pos"


def tail_key(partition: int) -> str:
    """A plain record after each transaction of state, so that a changelog partition never ends in a marker."""
    return f"{partition}:tail"


def partition_of(table_key: str) -> int:
    return int(table_key.split(":", 1)[0])


def is_account_key(table_key: str) -> bool:
    return table_key.split(":", 2)[1] == "a"
