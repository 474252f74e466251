"""Security headers on every response of the API, the documentation page and its assets included.

Every response says ``nosniff``, refuses to be framed (``X-Frame-Options`` and CSP ``frame-ancestors``),
sends no referrer, and carries a Content-Security-Policy: JSON answers allow nothing at all, the
documentation page allows scripts, styles and images from this origin only. Answers are ``no-store``
unless they set their own caching (only the documentation's static assets may be cached): every
``/api/v1`` answer is one tenant's data, and some carry secrets (a webhook's signing secret, shown once).
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ledger.api.docs import ASSETS_PATH

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI sets inline style attributes and uses data: images in its CSS; its scripts are files of ours.
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; font-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
COMMON = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
          "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Resource-Policy": "same-origin"}
ASSETS_CACHE = "public, max-age=86400"


def security_headers(path: str) -> dict[str, str]:
    """The headers a response to ``path`` gets (those it sets itself win, except the ones here that must hold)."""
    docs = path == "/docs" or path.startswith(ASSETS_PATH + "/")
    return {**COMMON, "Content-Security-Policy": DOCS_CSP if docs else API_CSP,
            "Cache-Control": ASSETS_CACHE if path.startswith(ASSETS_PATH + "/") else "no-store"}


# The console's pages set their own, strict, policy (ledger/api/console/pages.py): it is kept.
OWN_POLICY_PATHS = ("/console",)


class SecurityHeaders:
    """Pure ASGI, so streams pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wanted = security_headers(scope["path"])

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                own_policy = scope["path"].startswith(OWN_POLICY_PATHS)
                for name, value in wanted.items():
                    if name == "Cache-Control" and name in headers:
                        continue  # a response that says how it may be cached (the gate stream: no-store) keeps it
                    if name == "Content-Security-Policy" and own_policy and name in headers:
                        continue
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, sending)
