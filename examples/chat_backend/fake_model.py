"""A stand-in for an OpenAI-style model server on loopback: answers chat completions with a ``usage`` field
and counts the requests it receives, so the example (and the tests) need no real provider."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

START_TIMEOUT_S = 10.0


class FakeModel:
    """``usage`` is what every answer reports; by default a token per character of the prompt, and 50 out."""

    def __init__(self, usage: dict[str, int] | None = None, port: int = 0) -> None:
        self.requests = 0
        self.usage = usage
        self.port = port or _free_port()
        app = Starlette(routes=[Route("/v1/chat/completions", self.complete, methods=["POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def complete(self, request: Request) -> JSONResponse:
        self.requests += 1
        body: dict[str, Any] = await request.json()
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        usage = self.usage or {"prompt_tokens": len(prompt), "completion_tokens": 50}
        return JSONResponse({
            "id": f"chatcmpl-{self.requests}", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"(fake model) you said {len(prompt)} chars"}}],
            "usage": {**usage, "total_tokens": sum(usage.values())},
        })

    def __enter__(self) -> FakeModel:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the fake model server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=START_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
