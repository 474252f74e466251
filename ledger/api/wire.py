"""Request decoding and response encoding with msgspec, so money stays exact.

Bodies are decoded straight into the core's types (decimals from the JSON
text, never through a float); responses write decimals as JSON numbers, as
the plans guide shows them, always in plain notation (never ``0E-12``). The
OpenAPI document gets each body's JSON Schema.
"""

from __future__ import annotations

import re
from decimal import Decimal
from itertools import accumulate
from typing import Any, TypeVar

import msgspec
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response

T = TypeVar("T")
BODY_BYTES_MAX = 1024 * 1024
# Arrays and objects nested deeper than this are refused with a 422 before anything is decoded: no body of
# ours nests past 5, and decoders recurse (past about 1,000 levels Python's recursion limit is a 500).
JSON_DEPTH_MAX = 32
_JSON_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes

_encoder = msgspec.json.Encoder(decimal_format="number")


def plain_decimals(value: Any) -> Any:
    """``value`` with every Decimal that Python would write in exponent notation (``0E-12``, ``1.5E-7``) as
    the same number in plain notation (``0.000000000000``), digit for digit."""
    if isinstance(value, Decimal):
        text = str(value)
        return msgspec.Raw(format(value, "f").encode()) if "E" in text and value.is_finite() else value
    if isinstance(value, dict):
        return {k: plain_decimals(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_decimals(v) for v in value]
    return value


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        encoded = _encoder.encode(content)
        # Cheap test first: only a body with an "E" somewhere can hold an amount in exponent notation.
        return _encoder.encode(plain_decimals(content)) if b"E" in encoded else encoded


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > BODY_BYTES_MAX:
        raise HTTPException(413, f"request body is larger than {BODY_BYTES_MAX} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > BODY_BYTES_MAX:
            raise HTTPException(413, f"request body is larger than {BODY_BYTES_MAX} bytes")
    return body


def nesting_depth(text: bytes) -> int:
    """How deep arrays and objects nest in JSON ``text`` (brackets inside strings do not count).

    Linear and in C (a regular expression, a translation, ``accumulate`` over signed bytes): a 1 MB body of
    brackets takes milliseconds, where a recursive decoder would exhaust the stack.
    """
    brackets = _JSON_STRINGS.sub(b"", text).translate(None, _NOT_BRACKETS)
    return max(0, max(accumulate(memoryview(brackets.translate(_BRACKET_STEPS)).cast("b")), default=0))


def depth_problem(text: bytes, where: str = "body") -> str | None:
    if text.count(b"[") + text.count(b"{") <= JSON_DEPTH_MAX:  # the usual case, without a scan
        return None
    depth = nesting_depth(text)
    if depth > JSON_DEPTH_MAX:
        return f"{where} nests arrays or objects {depth} deep; at most {JSON_DEPTH_MAX} levels are accepted"
    return None


def decode(body: bytes, kind: type[T]) -> T:
    """Decode a JSON body; a 422 names the offending field."""
    problem = depth_problem(body)
    if problem is not None:
        raise HTTPException(422, problem)
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise HTTPException(422, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise HTTPException(422, f"body is not valid JSON: {exc}") from None


_components: dict[str, Any] = {}


def body_schema(kind: Any, *, content_type: str = "application/json") -> dict[str, Any]:
    """``openapi_extra`` documenting a body that the route reads and decodes itself."""
    (schema,), components = msgspec.json.schema_components([kind], ref_template="#/components/schemas/{name}")
    _components.update(components)
    return {"requestBody": {"required": True, "content": {content_type: {"schema": schema}}}}


def install_openapi(app: FastAPI) -> None:
    """Add the msgspec body schemas to the app's OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            spec.setdefault("components", {}).setdefault("schemas", {}).update(_components)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
