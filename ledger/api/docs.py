"""The API's documentation page, ``/docs``: Swagger UI from files shipped in the package, never from a CDN.

The assets are swagger-ui-dist from the npm registry, at the version below, unchanged (see
``static/swagger-ui/VERSION``); the page loads them and its own ``init.js`` from ``/docs/assets``, so
its Content-Security-Policy allows scripts from this origin only (``ledger/api/headers.py``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

SWAGGER_UI_VERSION = "5.35.0"
ASSETS = Path(__file__).parent / "static" / "swagger-ui"
ASSETS_PATH = "/docs/assets"

_PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{title}} - API documentation</title>
<link rel="stylesheet" href="{ASSETS_PATH}/swagger-ui.css?v={SWAGGER_UI_VERSION}">
<link rel="icon" type="image/png" href="{ASSETS_PATH}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS_PATH}/swagger-ui-bundle.js?v={SWAGGER_UI_VERSION}"></script>
<script src="{ASSETS_PATH}/init.js?v={SWAGGER_UI_VERSION}"></script>
</body>
</html>
"""


def install(app: FastAPI) -> None:
    """``/docs`` and its assets; the app is built with ``docs_url=None`` and ``redoc_url=None``."""
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS), name="docs-assets")
    page = _PAGE.replace("{title}", app.title)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page)
