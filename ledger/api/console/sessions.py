"""Console sessions: a key signs in once, the browser holds an opaque session id, the server holds the rest.

The session id and its CSRF token are 256 random bits each. The server keeps the key's id (never the key),
so every request re-reads the key and a revoked key ends its sessions at once. Sessions live in the API
process's memory: a restart signs everyone out, and N API processes need sticky routing (said in
docs/console.md). Every POST carries the session's CSRF token; the sign-in form, before any session,
carries a token that must equal a pre-session cookie (double submit).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

SESSION_COOKIE = "ledger_console"
SIGN_IN_COOKIE = "ledger_console_sign_in"
# A session ends this long after sign-in, or after this long without a request, whichever comes first.
SESSION_TTL_S = 8 * 3600
SESSION_IDLE_S = 3600
# Sessions kept per API process; signing in beyond this forgets the least recently used one.
SESSIONS_MAX = 10_000
TOKEN_BYTES = 32


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def same_token(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


@dataclass
class ConsoleSession:
    key_id: str
    csrf: str
    created_at: float
    seen_at: float = field(default=0.0)


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.monotonic, sessions_max: int = SESSIONS_MAX,
                 ttl_s: float = SESSION_TTL_S, idle_s: float = SESSION_IDLE_S) -> None:
        self.clock, self.sessions_max, self.ttl_s, self.idle_s = clock, sessions_max, ttl_s, idle_s
        self._sessions: OrderedDict[str, ConsoleSession] = OrderedDict()

    def open(self, key_id: str) -> tuple[str, ConsoleSession]:
        now = self.clock()
        session_id = new_token()
        session = ConsoleSession(key_id=key_id, csrf=new_token(), created_at=now, seen_at=now)
        self._sessions[session_id] = session
        while len(self._sessions) > self.sessions_max:
            self._sessions.popitem(last=False)
        return session_id, session

    def get(self, session_id: str | None) -> ConsoleSession | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self.clock()
        if now - session.created_at > self.ttl_s or now - session.seen_at > self.idle_s:
            del self._sessions[session_id]
            return None
        session.seen_at = now
        self._sessions.move_to_end(session_id)
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)
