"""Bearer API keys: the tenant comes from the key, never from the path or the body."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ledger.control.keys import Scope
from ledger.control.store import ControlStore, Principal

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer pg_live_...`")


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


async def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    # async: a one-row indexed lookup is cheaper on the event loop than a trip through the thread pool,
    # which queued every request behind the pool's 40 threads at 200 requests/s. Read on every request, not
    # cached, so a revoked key is refused at once.
    if credentials is None:
        raise _unauthorized("missing API key: send `Authorization: Bearer <key>`")
    store: ControlStore = request.app.state.store
    found = store.authenticate(credentials.credentials)
    if found is None:
        raise _unauthorized("unknown or revoked API key")
    settings = request.app.state.settings
    rate = found.requests_per_s or settings.rate_per_key_per_s
    burst = found.burst or settings.rate_burst
    wait_s = request.app.state.rate_limits.take(found.key_id, rate, burst)
    if wait_s is not None:
        raise HTTPException(429, f"rate_per_key: this key may make {rate} requests per second "
                                 f"(bursts of {burst}); retry in {wait_s} s", headers={"Retry-After": str(wait_s)})
    return found


def require(*scopes: Scope) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that admits a key holding any of ``scopes``."""
    async def check(who: Principal = Depends(principal)) -> Principal:
        if not who.scopes & set(scopes):
            raise HTTPException(403, f"this key lacks the {' or '.join(s.value for s in scopes)} scope")
        return who
    return check
