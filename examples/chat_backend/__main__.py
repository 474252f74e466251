"""`make example`: the chat backend against the local stack (`ledger up`), with a fake model server.

Creates (or reuses) the tenant ``chat-example`` with a fresh key, a small plan and the user
``alice-<random>``, registers the backend's webhook URL (when the API has webhooks), starts the fake
model and the backend on ``CHAT_PORT`` (18080), chats as alice until her budget blocks her, prints
what she has left, then keeps serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid

import httpx
import uvicorn

from examples.chat_backend.app import ChatSettings, create_app
from examples.chat_backend.fake_model import FakeModel
from ledger.cli.stack import wait_for_http
from ledger.control.store import ControlStore
from ledger.settings import Settings

TENANT = "chat-example"
PLAN = {"plans": [{"name": "chat-example", "max_spend_per_period": 0.002,
                   "cost_rates": {"gpt-4o-mini": {"input": 0.00015, "output": 0.0006}}}]}
USER = f"alice-{uuid.uuid4().hex[:6]}"  # a new user per run, with a whole budget
API_WAIT_S = 60.0
CHATS_MAX = 50
WEBHOOK_WAIT_S = 15.0


def tenant_key(settings: Settings) -> str:
    """A new all-scopes key of the example's tenant (created on first run)."""
    store = ControlStore(settings.control_url)
    store.create_schema()
    with store.session() as session:
        tenant_id = session.tenant_id(TENANT)
        if tenant_id is None:
            return session.create_tenant(TENANT)[1]
        from ledger.control.keys import ALL_SCOPES

        return session.create_key(tenant_id, ALL_SCOPES, label="chat example")


def _admin(api_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=f"{api_url}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def provision(api_url: str, key: str) -> None:
    with _admin(api_url, key) as http:
        answer = http.post("/config/plans", json=PLAN).json()
        plan_id = (answer["plans"] or answer["duplicates"])[0]["id"]
        created = http.post("/users", json={"external_id": USER, "plan_id": plan_id})
        if created.status_code not in (201, 409):
            raise SystemExit(f"could not create {USER}: {created.text}")


def register_webhook(api_url: str, key: str, url: str) -> str:
    """Register ``url`` for the tenant's gate webhooks (replacing an earlier registration); its secret, or ""."""
    with _admin(api_url, key) as http:
        listed = http.get("/webhooks")
        if listed.status_code == 404:  # an API without the webhooks part
            return ""
        listed.raise_for_status()
        for webhook in listed.json()["webhooks"]:
            if webhook["url"] == url:  # its secret was shown once, on an earlier run: replace it
                http.delete(f"/webhooks/{webhook['id']}").raise_for_status()
        created = http.post("/webhooks", json={"url": url, "description": "chat backend example"})
        created.raise_for_status()
        return str(created.json()["secret"])


def converse(chat_url: str) -> None:
    with httpx.Client(base_url=chat_url, timeout=60) as http:
        for n in range(1, CHATS_MAX + 1):
            answer = http.post("/chat", json={"user": USER, "message": "tell me about budgets " * 40})
            print(f"chat {n}: {answer.status_code} {answer.json()}")
            if answer.status_code != 200:
                break
        deadline = time.monotonic() + WEBHOOK_WAIT_S
        while True:  # the gate webhook comes from `ledger webhooks` shortly after the block
            budget = http.get(f"/users/{USER}/budget")
            if budget.status_code != 200 or budget.json()["last_gate"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print(f"budget of {USER}: {budget.status_code} {budget.text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="chat until blocked, print the budget, and exit")
    args = parser.parse_args()
    settings = Settings.from_env()
    wait_for_http(f"{settings.api_url}/docs", API_WAIT_S)
    key = tenant_key(settings)
    provision(settings.api_url, key)
    port = int(os.environ.get("CHAT_PORT", "18080"))
    chat_url = f"http://127.0.0.1:{port}"
    secret = os.environ.get("LEDGER_WEBHOOK_SECRET") or register_webhook(settings.api_url, key,
                                                                         f"{chat_url}/webhooks/ledger")
    with FakeModel() as model:
        chat = ChatSettings(ledger_url=settings.api_url, api_key=key, model_url=model.url, webhook_secret=secret)
        server = uvicorn.Server(uvicorn.Config(create_app(chat), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for_http(f"{chat_url}/docs", API_WAIT_S)
        converse(chat_url)
        print(f"\nchat backend on {chat_url} (OpenAPI at /docs), fake model on {model.url}\n"
              f"  curl -s {chat_url}/users/{USER}/budget\n"
              + (f"  gate webhooks: registered {chat_url}/webhooks/ledger" if secret else
                 "  gate webhooks: this API has no webhook registration; set LEDGER_WEBHOOK_SECRET to receive them"))
        try:
            if not args.once:
                thread.join()
        except KeyboardInterrupt:
            pass
        finally:
            server.should_exit = True
            thread.join(timeout=10)


if __name__ == "__main__":
    main()
