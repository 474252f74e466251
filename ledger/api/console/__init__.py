"""The operator's console at ``/console``: server-rendered pages over the API's own queries and code paths.

A tenant's operator signs in with an API key (``read`` to look, ``admin`` to change plans and see webhooks);
the browser then holds a session cookie (see ``sessions.py``). Every page is scoped to the key's tenant.
Pages work without JavaScript; the vendored chart library and ``console.js`` only draw charts and keep
the gate events live. The choices are in docs/console.md.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ledger.api.console import pages
from ledger.api.console.sessions import Sessions

STATIC_DIR = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    app.state.console_sessions = Sessions()
    app.include_router(pages.router)
    app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console-static")

    @app.exception_handler(pages.SignInRequired)
    async def sign_in_first(request: Request, _exc: pages.SignInRequired) -> Response:
        return pages.to_sign_in(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if pages.is_console_page(request):
            return pages.error_page(request, exc.status_code, str(exc.detail), exc.headers)
        return await http_exception_handler(request, exc)
