"""Schemathesis against the API's own OpenAPI document: no request, however odd, gets a 5xx.

The app runs in-process over ASGI with its lifespan, so its real publisher (and reply reader) talk to the test
broker, and a worker answers the pre-call checks; both control-plane databases. One tenant's key goes on every
call; a second run sends no key and expects 401 everywhere. Plans, tiers and users are created first and their ids
are fed into the generated path parameters and body fields (Schemathesis dictionaries), so the fuzzer gets past
the 404s, along with values random generation rarely hits (NaN, NUL, the ends of the datetime range).

Bounded and reproducible: at most ``MAX_EXAMPLES`` cases per operation, derandomized, no example database.

Schemathesis 4's ``schemathesis.pytest.from_fixture`` does not run under pytest 9.2 (it uses ``Item._nodeid``,
which pytest 9.2 no longer has), so each operation's strategy is driven by Hypothesis here rather than by
``@schema.parametrize()``; the strategies, dictionaries, transport and checks are Schemathesis's own.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
import yaml
from hypothesis import strategies as st
from schemathesis import APIOperation, BaseSchema, Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import content_type_conformance

from ledger.api.app import create_api
from ledger.api.wire import JSON_DEPTH_MAX
from ledger.control.store import ControlStore
from ledger.settings import Settings

pytestmark = [
    pytest.mark.integration,
    # Schemathesis's negative-case mutations use the global `random`, which Hypothesis seeds per example.
    pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PREFIX = "/api/v1"
MAX_EXAMPLES = 30
ANONYMOUS_MAX_EXAMPLES = 10
NUL_MAX_EXAMPLES = 5
REQUEST_TIMEOUT_S = 30  # above the API's own 10 s wait for a check's answer, so a 504 shows as one

# The document types money and ratios as {"type": "string", "format": "decimal"}.
schemathesis.openapi.format("decimal", st.decimals(allow_nan=True, allow_infinity=True).map(str))

# Fuzzing dictionaries. PostgreSQL text refuses NUL; NaN cannot be ordered (comparing it raises); huge or tiny
# exponents overflow arithmetic; a time at either end of datetime's range leaves it when converted to UTC.
AWKWARD_STRINGS = ["\x00", "a\x00b", "%00", "' OR '1'='1", "\U0001f600", " ", "\u202e"]
EDGE_DECIMALS = ["NaN", "sNaN", "-Infinity", "1e999999", "1E-999999", "-0", "0"]
DECIMAL_FIELDS = ["soft_gate_at", "hard_gate_at", "markup", "session_timeout_minutes", "max_spend_per_period",
                  "max_spend_per_session", "amount"]
EDGE_TIMES = ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"]
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5"]
# Integers no column or counter holds: past int32, int64 and uint64, in both directions.
HUGE_INTEGERS = [2 ** 31, 2 ** 63, 2 ** 64 + 1, -(2 ** 63) - 1, 10 ** 40]
INTEGER_FIELDS = ["input_tokens", "output_tokens", "ttl_seconds", "trial_days"]


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


# History cursors a client may forge: nesting deeper than the parser's stack (unclosed, to fit 2048 characters),
# integers past every column, lone surrogates, the wrong types.
HOSTILE_CURSORS = [_b64("[" * 1_500), _b64(f'["plan_version", "p", {2 ** 70}]'), _b64('["model", "\\ud800"]'),
                   _b64('["session", "\\udfff", "2026-01-01T00:00:00+00:00"]'), _b64('["day", {"a": 1}]'),
                   _b64(f'["plan_version", "p", {-(2 ** 63) - 1}]')]
# How deep a value of a fuzzed body is nested: just past the bound, past the decoders' stack, and far past it.
NESTING_DEPTHS = [JSON_DEPTH_MAX + 1, 1_200, 100_000]
DEEP_MAX_EXAMPLES = 15
USERS = ["fuzz-subscribed", "fuzz-plain"]

# Statuses routes answer on purpose that the OpenAPI document does not list. Besides these, any operation may
# answer 422 if it takes a body and 404 if it has path parameters. Anything else undocumented fails the run.
# A stream answers for as long as its client listens, so a fuzzed call to it would never return; its cursor
# parsing is tested in tests/unit/test_gate_cursor.py and the stream itself in tests/integration/test_sdk_live.py.
STREAMING = {f"GET {PREFIX}/gates/stream"}
UNDOCUMENTED: dict[str, set[int]] = {
    f"POST {PREFIX}/config/plans": {201},  # 201 when something was created, 200 when all were duplicates
    f"POST {PREFIX}/config/tiers": {201},
    f"POST {PREFIX}/users": {409},
    f"POST {PREFIX}/webhooks": {409},  # a tenant's webhooks are bounded (WEBHOOKS_PER_TENANT_MAX)
}


@dataclass
class Seeded:
    app: Any
    key: str
    ids: dict[str, list[str]]  # path parameter name -> ids that exist for the tenant

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def _seed(schema: BaseSchema, auth: dict[str, str]) -> dict[str, list[str]]:
    """The plans guide's plans, the tiers guide's tiers (where their codes are free), two users and a webhook."""
    def post(path: str, body: Any = None, raw: bytes | None = None) -> Any:
        case = schema[PREFIX + path]["POST"].Case(media_type="application/json", **({} if raw else {"body": body}))
        response = case.call(headers={**auth, "Content-Type": "application/json"}, **({"data": raw} if raw else {}))
        assert response.status_code == 201, (path, response.status_code, response.text)
        return response.json()

    plans = post("/config/plans", raw=(EXAMPLES / "plans.json").read_bytes())["plans"]
    plan_ids = [p["id"] for p in plans]
    tier_ids: list[str] = []
    if schema.find_operation_by_label(f"POST {PREFIX}/config/tiers") is not None:
        taken = {p["name"] for p in plans}  # a tier's code becomes its plan's name
        tiers = [t for t in yaml.safe_load_all((EXAMPLES / "tiers.yaml").read_text()) if t["tier_code"] not in taken]
        created = post("/config/tiers", tiers)["tiers"]
        tier_ids = [t["id"] for t in created]
        plan_ids += [t["plan_id"] for t in created]
    users = [post("/users", {"external_id": USERS[0], "plan_id": plan_ids[0]}), post("/users", {"external_id": USERS[1]})]
    webhook_ids: list[str] = []
    if schema.find_operation_by_label(f"POST {PREFIX}/webhooks") is not None:
        webhook_ids.append(post("/webhooks", {"url": "http://127.0.0.1:9/hooks"})["id"])
    return {"plan_id": plan_ids, "tier_id": tier_ids, "user_id": [u["id"] for u in users], "webhook_id": webhook_ids,
            "user": USERS, "name": ["daily"]}


@pytest.fixture
def seeded(settings: Settings, store_url: str) -> Iterator[Seeded]:
    store = ControlStore(store_url)
    # Opted in to private addresses, as before strict became the default: registering a generated URL must not
    # make the API look its host up (the tests use no network).
    app = create_api(dataclasses.replace(settings, webhook_allow_private=True), store=store)
    with store.session() as session:
        _, key = session.create_tenant("fuzz")
    try:
        # Loading the document starts the app's lifespan (publisher, reply reader); it runs until shut down below.
        probe = schemathesis.openapi.from_asgi("/openapi.json", app)
        auth = {"Authorization": f"Bearer {key}"}
        yield Seeded(app, key, _seed(probe, auth))
    finally:
        asgi.shutdown_lifespans()
        store.dispose()


def load(seeded: Seeded) -> BaseSchema:
    """The app's document with a derandomized generation config and the fuzzing dictionaries.

    ``*_id`` path parameters and the body's ``plan_id``, ``user`` and ``model`` take a seeded value half the time.
    """
    dictionaries: dict[str, Any] = {
        "awkward": {"values": AWKWARD_STRINGS}, "edge_times": {"values": EDGE_TIMES},
        "edge_decimals": {"values": EDGE_DECIMALS}, "plan_ids": {"values": [*seeded.ids["plan_id"], "a\x00b"]},
        "users": {"values": USERS}, "models": {"values": MODELS}, "huge_integers": {"values": HUGE_INTEGERS},
        "hostile_cursors": {"values": HOSTILE_CURSORS}}
    parameters: dict[str, Any] = {
        "body.external_id": {"dictionary": "awkward", "probability": 0.2},
        "body.plans[*].name": {"dictionary": "awkward", "probability": 0.2},
        "body.period_start": {"dictionary": "edge_times", "probability": 0.3},
        "body.plan_id": {"dictionary": "plan_ids", "probability": 0.5},
        "body.user": {"dictionary": "users", "probability": 0.5},
        "body.model": {"dictionary": "models", "probability": 0.5},
        "query.cursor": {"dictionary": "hostile_cursors", "probability": 0.5},
        "query.limit": {"dictionary": "huge_integers", "probability": 0.2}}
    for field in INTEGER_FIELDS:
        for key in (f"body.{field}", f"body.plans[*].{field}", f"body.events[*].{field}"):
            parameters[key] = {"dictionary": "huge_integers", "probability": 0.2}
    for field in DECIMAL_FIELDS:
        for key in (f"body.{field}", f"body.plans[*].{field}"):
            parameters[key] = {"dictionary": "edge_decimals", "probability": 0.1}
    for name, ids in seeded.ids.items():
        if ids:
            dictionaries[name] = {"values": ids}
            parameters[f"path.{name}"] = {"dictionary": name, "probability": 0.5}
    config = schemathesis.Config.from_dict({
        "generation": {"deterministic": True, "database": "none", "with-security-parameters": False},
        "request-timeout": REQUEST_TIMEOUT_S,
        "dictionaries": dictionaries,
        "parameters": parameters,
        "output": {"sanitization": {"keys-to-sanitize": ["authorization"], "sensitive-markers": ["authorization"]}},
    })
    return schemathesis.openapi.from_asgi("/openapi.json", seeded.app, config=config)


def fuzz(schema: BaseSchema, test: Callable[..., None], *, max_examples: int,
         only: Callable[[APIOperation], bool] = lambda _: True,
         path_parameters: Callable[[APIOperation], dict[str, str] | None] = lambda _: None,
         extra: st.SearchStrategy[tuple[Any, ...]] = st.just(())) -> None:
    """Run ``test`` on positive and negative cases of every operation; report all the operations that fail.

    ``test`` gets the case and the values ``extra`` draws for it.
    """
    failures: list[str] = []
    operations = [op for op in (result.ok() for result in schema.get_all_operations()) if only(op)]
    assert operations, "no operation to test"
    for operation in operations:
        fixed = path_parameters(operation)
        strategy = st.one_of([operation.as_strategy(generation_mode=mode, path_parameters=fixed)
                              for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])

        # No shrinking: every step is a real request (and a publish), and the API keeps state between them, so
        # a shrunk example often no longer fails (a 409 for a user an earlier example created).
        @hypothesis.settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate], print_blob=False,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=strategy, more=extra)
        def run(case: Case, more: tuple[Any, ...]) -> None:
            test(case, *more)

        try:
            run()
        except Exception as exc:  # every operation runs; all failures are reported together
            failures.append(f"{operation.label}:\n{describe(exc)}")
    assert not failures, "\n\n".join(failures)


_DEEP = "\x00deep\x00"


def deepen(body: Any, depth: int, descend: int) -> bytes | None:
    """``body`` as JSON with one value replaced by arrays nested ``depth`` deep: the value reached by taking the
    first member ``descend`` times (an event of a batch, a plan's field), or None for a body with no member."""
    if not isinstance(body, dict | list) or not body:
        return None
    document = json.loads(json.dumps(body))
    holder, key = document, next(iter(document)) if isinstance(document, dict) else 0
    for _ in range(descend):
        inner = holder[key]
        if not isinstance(inner, dict | list) or not inner:
            break
        holder, key = inner, next(iter(inner)) if isinstance(inner, dict) else 0
    holder[key] = _DEEP
    text = json.dumps(document)
    return text.replace(json.dumps(_DEEP), "[" * depth + "]" * depth, 1).encode()


def describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):  # e.g. Hypothesis's FlakyFailure: show what failed
        return "\n".join([str(exc), *(describe(inner) for inner in exc.exceptions)])
    return str(exc)


def call(case: Case, headers: dict[str, str]) -> Response:
    try:
        return case.call(headers=headers)
    except Exception as exc:  # raised by the app: a 500 from a real server
        raise AssertionError(f"the app crashed with {type(exc).__name__}: {exc}\n"
                             f"{case.as_curl_command(headers=headers)}") from exc


def documented_status(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """The status is documented for the operation, or one it answers on purpose (see ``UNDOCUMENTED``)."""
    operation = case.operation
    codes = operation.responses.status_codes
    allowed = {int(code) for code in codes if code.isdigit()} | UNDOCUMENTED.get(operation.label, set())
    if list(operation.body):
        allowed.add(422)
    if list(operation.path_parameters):
        allowed.add(404)
    assert "default" in codes or response.status_code in allowed, (
        f"{operation.label} answered {response.status_code}, documented {sorted(codes)}, "
        f"expected one of {sorted(allowed)}: {response.text[:300]}")
    return None


def answers_401(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    assert response.status_code == 401, f"{case.operation.label} without a key: {response.status_code} {response.text}"
    assert response.headers.get("www-authenticate") == ["Bearer"], response.headers
    return None


def wait_until_checks_are_answered(schema: BaseSchema, auth: dict[str, str], timeout_s: float = 90) -> None:
    """The worker answers checks once it has its partitions; the fuzzing starts after that."""
    check = schema.find_operation_by_label(f"POST {PREFIX}/check")
    if check is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        response = check.Case(body={"user": USERS[0], "model": MODELS[0]}, media_type="application/json").call(
            headers=auth, timeout=REQUEST_TIMEOUT_S)
        if response.status_code in (200, 402):
            return
        assert response.status_code == 504 and time.monotonic() < deadline, (response.status_code, response.text)


def test_no_request_gets_a_server_error(seeded: Seeded, worker) -> None:  # type: ignore[no-untyped-def]
    schema = load(seeded)
    wait_until_checks_are_answered(schema, seeded.auth)

    answered: Counter[int] = Counter()

    def test(case: Case) -> None:
        response = call(case, seeded.auth)
        answered[response.status_code // 100 * 100] += 1
        case.validate_response(response, checks=[not_a_server_error, documented_status, content_type_conformance],
                               headers=seeded.auth)

    fuzz(schema, test, max_examples=MAX_EXAMPLES, only=lambda op: op.label not in STREAMING)
    print(f"\nfuzzed requests by status class: {dict(sorted(answered.items()))}")


def test_deeply_nested_bodies_get_no_server_error(seeded: Seeded) -> None:
    """Every body's value nested past the bound, past the decoders' stack and far past it: a 4xx, never a 5xx.

    Schemathesis generates the case; the body it would send is then nested and sent as raw JSON (its own
    serializer would recurse, too). None of these reach the processor, so no worker is needed.
    """
    schema = load(seeded)
    headers = {**seeded.auth, "Content-Type": "application/json"}
    sent: dict[str, int] = {}

    def test(case: Case, depth: int, descend: int) -> None:
        raw = deepen(case.body, depth, descend)
        if raw is None:
            return
        sent[case.operation.label] = sent.get(case.operation.label, 0) + 1
        try:
            response = case.call(headers=headers, data=raw)
        except Exception as exc:
            raise AssertionError(f"the app crashed with {type(exc).__name__} on a body nested {depth} deep") from exc
        assert response.status_code < 500, (case.operation.label, depth, descend, response.status_code,
                                             response.text[:300])
        case.validate_response(response, checks=[documented_status], headers=headers)

    fuzz(schema, test, max_examples=DEEP_MAX_EXAMPLES,
         only=lambda op: op.label not in STREAMING and bool(list(op.body)),
         extra=st.tuples(st.sampled_from(NESTING_DEPTHS), st.integers(0, 3)))
    print(f"\ndeeply nested bodies sent, per operation: {sent}")
    assert len(sent) >= 8 and min(sent.values()) >= 3, sent  # every operation with a JSON body got some


def test_an_id_with_a_nul_is_not_found_rather_than_a_crash(seeded: Seeded) -> None:
    """Schemathesis never puts NUL in a path (some servers refuse it), but uvicorn passes it on."""
    schema = load(seeded)

    def test(case: Case) -> None:
        response = call(case, seeded.auth)
        case.validate_response(response, checks=[not_a_server_error, documented_status], headers=seeded.auth)

    fuzz(schema, test, max_examples=NUL_MAX_EXAMPLES, only=lambda op: bool(list(op.path_parameters)),
         path_parameters=lambda op: {p.name: "a\x00b" for p in op.path_parameters})


def test_without_a_key_every_operation_answers_401(seeded: Seeded) -> None:
    """Real ids in the path, so a 401 is about the key, not a resource that does not exist."""
    schema = load(seeded)

    def test(case: Case) -> None:
        assert "authorization" not in {name.lower() for name in (case.headers or {})}
        response = call(case, {})
        case.validate_response(response, checks=[not_a_server_error, answers_401])

    fuzz(schema, test, max_examples=ANONYMOUS_MAX_EXAMPLES,
         path_parameters=lambda op: {p.name: seeded.ids[p.name][0] for p in op.path_parameters} or None)
