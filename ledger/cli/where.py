"""The one line a reading command prints first: which namespace and home it reads, and whether they are defaults.

Without LEDGER_NAMESPACE and LEDGER_HOME a command reads the defaults (``ledger`` under ``./.ledger``), which is
rarely what someone who started the stack elsewhere means: the line says so instead of answering silently from
an empty or unrelated history.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ledger.settings import Settings


def reading_line(settings: Settings, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    namespace = settings.namespace if "LEDGER_NAMESPACE" in env else \
        f"{settings.namespace} (the default: LEDGER_NAMESPACE is not set)"
    home = settings.home.resolve() if "LEDGER_HOME" in env else \
        f"{settings.home.resolve()} (the default: LEDGER_HOME is not set)"
    return f"reading namespace {namespace}, home {home}"
