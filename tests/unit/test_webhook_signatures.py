"""Standard Webhooks signatures: the spec's published test vector, tampering, freshness and rotation."""

from __future__ import annotations

import base64
import secrets

import pytest

from ledger_sdk import webhooks
from ledger_sdk.webhooks import WebhookVerificationError, sign, verify

# The test vector of the reference implementations (standard-webhooks/standard-webhooks, libraries/*/tests).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
NOW = 1_800_000_000


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def delivery(secret: str, body: bytes = b'{"kind":"hard_block","used":1.000000000000}', *, msg_id: str = "gate-1",
             timestamp: int = NOW) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body)}


def test_sign_reproduces_the_specs_published_signature() -> None:
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    # The secret without its prefix is the same key.
    assert sign(SPEC_SECRET.removeprefix("whsec_"), SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_verify_accepts_the_specs_published_delivery_at_its_time() -> None:
    headers = {"webhook-id": SPEC_ID, "webhook-timestamp": str(SPEC_TIMESTAMP), "webhook-signature": SPEC_SIGNATURE}
    verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TIMESTAMP)
    # Header names are case-insensitive, as HTTP says.
    verify(SPEC_SECRET, {k.title(): v for k, v in headers.items()}, SPEC_BODY, now=SPEC_TIMESTAMP + 299)


def test_every_fresh_delivery_signed_with_the_secret_verifies() -> None:
    secret = new_secret()
    for n in range(50):
        body = secrets.token_bytes(n * 7)
        verify(secret, delivery(secret, body, msg_id=f"id-{n}"), body, now=NOW + n)


def flip_first(signature: str) -> str:
    """The same signature with its first base64 character changed (so its first byte differs)."""
    version, encoded = signature.split(",")
    return f"{version},{'B' if encoded[0] == 'A' else 'A'}{encoded[1:]}"


TAMPERINGS = {
    "body": lambda h, b: (h, b.replace(b"1.000000000000", b"0.000000000000")),
    "one byte appended": lambda h, b: (h, b + b" "),
    "id": lambda h, b: ({**h, "webhook-id": "gate-2"}, b),
    "timestamp": lambda h, b: ({**h, "webhook-timestamp": str(NOW + 1)}, b),
    "signature": lambda h, b: ({**h, "webhook-signature": flip_first(h["webhook-signature"])}, b),
    "other version": lambda h, b: ({**h, "webhook-signature": "v1a," + h["webhook-signature"][3:]}, b),
    "no version": lambda h, b: ({**h, "webhook-signature": h["webhook-signature"][3:]}, b),
    "not base64": lambda h, b: ({**h, "webhook-signature": "v1,!!!"}, b),
    "missing id": lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b),
    "missing timestamp": lambda h, b: ({k: v for k, v in h.items() if k != "webhook-timestamp"}, b),
    "missing signature": lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b),
    "timestamp not a number": lambda h, b: ({**h, "webhook-timestamp": "soon"}, b),
    "timestamp with a fraction": lambda h, b: ({**h, "webhook-timestamp": f"{NOW}.0"}, b),
}


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_a_tampered_delivery_is_rejected(tamper) -> None:  # type: ignore[no-untyped-def]
    secret = new_secret()
    body = b'{"kind":"hard_block","used":1.000000000000}'
    headers, changed = tamper(delivery(secret, body), body)
    with pytest.raises(WebhookVerificationError):
        verify(secret, headers, changed, now=NOW)


def test_another_endpoints_secret_is_rejected() -> None:
    body = b"{}"
    with pytest.raises(WebhookVerificationError, match="no signature matches"):
        verify(new_secret(), delivery(new_secret(), body), body, now=NOW)


@pytest.mark.parametrize(("age_s", "accepted"), [(0, True), (300, True), (301, False), (-300, True), (-301, False),
                                                 (86_400, False), (-86_400, False)])
def test_a_timestamp_outside_the_tolerance_is_rejected_either_way(age_s: int, accepted: bool) -> None:
    secret = new_secret()
    headers = delivery(secret, b"{}", timestamp=NOW - age_s)
    if accepted:
        verify(secret, headers, b"{}", now=NOW)
    else:
        with pytest.raises(WebhookVerificationError, match="too old|future"):
            verify(secret, headers, b"{}", now=NOW)
    # A wider tolerance admits what the default refused.
    verify(secret, headers, b"{}", now=NOW, tolerance_s=abs(age_s))


def test_a_stale_timestamp_is_rejected_against_the_real_clock() -> None:
    secret = new_secret()
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(secret, delivery(secret, b"{}", timestamp=SPEC_TIMESTAMP), b"{}")


def test_any_one_matching_signature_is_enough_so_secrets_can_rotate() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"n":1}'
    both = " ".join(sign(s, "gate-1", NOW, body) for s in (old, new))
    headers = {"webhook-id": "gate-1", "webhook-timestamp": str(NOW), "webhook-signature": f"v1a,xyz {both}"}
    verify(old, headers, body, now=NOW)
    verify(new, headers, body, now=NOW)
    with pytest.raises(WebhookVerificationError):
        verify(new_secret(), headers, body, now=NOW)


def test_a_malformed_secret_is_a_verification_error_not_a_crash() -> None:
    for bad in ("whsec_", "whsec_@@@", "whsec_é"):
        with pytest.raises(WebhookVerificationError):
            verify(bad, delivery(new_secret(), b"{}"), b"{}", now=NOW)


def test_the_module_exports_exactly_its_three_names() -> None:
    assert sorted(webhooks.__all__) == ["WebhookVerificationError", "sign", "verify"]
