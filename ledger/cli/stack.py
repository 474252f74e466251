"""`ledger up` / `ledger down`: the local stack as background processes.

Each process writes its log to ``<home>/logs/<name>.log`` and its pid to
``<home>/run/<name>.pid``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ledger.settings import Settings

STOP_TIMEOUT_S = 20.0
# The local stack's settings where they differ from a deployment's; the environment still wins. Its webhooks
# may call loopback and private addresses (a receiver on this machine): deployments refuse them by default.
LOCAL_STACK_ENV = {"LEDGER_WEBHOOK_ALLOW_PRIVATE": "true"}
# `ledger up` gives each process its own metrics port: the projector the API's port + 100, workers the ones after it.
METRICS_PORT_OFFSET = 100


def projector_metrics_port(settings: Settings) -> int:
    return settings.metrics_port or settings.api_port + METRICS_PORT_OFFSET


def webhooks_metrics_port(settings: Settings) -> int:
    return projector_metrics_port(settings) - 1


def worker_metrics_port(settings: Settings, index: int) -> int:
    return projector_metrics_port(settings) + 1 + index


def _run_dir(settings: Settings) -> Path:
    path = settings.home / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def running(settings: Settings) -> dict[str, int]:
    """Names and pids of this stack's live background processes."""
    out = {}
    for pid_file in sorted(_run_dir(settings).glob("*.pid")):
        try:
            pid = int(pid_file.read_text())
        except ValueError:
            continue
        if _alive(pid):
            out[pid_file.stem] = pid
        else:
            pid_file.unlink(missing_ok=True)
    return out


def process_env(settings: Settings, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a stack process: the local stack's settings, then the caller's, then the stack's home."""
    environ = dict(os.environ) if environ is None else environ
    return {**LOCAL_STACK_ENV, **environ, "LEDGER_HOME": str(settings.home), "LEDGER_NAMESPACE": settings.namespace}


def start(settings: Settings, name: str, args: list[str]) -> int:
    """Start ``ledger <args>`` in the background unless it already runs."""
    live = running(settings)
    if name in live:
        return live[name]
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    log = open(settings.logs_dir / f"{name}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledger.cli.main", *args],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env=process_env(settings),
    )
    (_run_dir(settings) / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def stop(settings: Settings, name: str) -> bool:
    pid = running(settings).get(name)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    (_run_dir(settings) / f"{name}.pid").unlink(missing_ok=True)
    return True


def wait_for_http(url: str, timeout_s: float) -> None:
    """Wait until ``url`` answers (any status below 500)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")
