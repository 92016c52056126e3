"""Bearer tokens beside API keys: JWTs from an OIDC issuer the tests start, checked in full."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from reasoning_agent.config import ConfigError, Settings, load_settings
from tests.conftest import StartService
from tests.fake_issuer import AUDIENCE, FakeIssuer, SigningKey
from tests.support import ALICE

pytestmark = pytest.mark.database_agnostic


@pytest.fixture
def issuer() -> Iterator[FakeIssuer]:
    issuer = FakeIssuer().start()
    yield issuer
    issuer.stop()


def oidc_env(issuer: FakeIssuer, **env: str) -> dict[str, str]:
    return {"OIDC_ISSUER": issuer.url, "OIDC_AUDIENCE": AUDIENCE, "LLM_PROVIDER": "mock", **env}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hmac_signed_with(secret: bytes, claims: dict) -> str:
    """An HS256 token whose secret is the issuer's public key: the classic confusion attack."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def test_a_tokens_principal_is_a_caller_of_its_own(
    start_service: StartService, issuer: FakeIssuer
) -> None:
    service = start_service(**oidc_env(issuer))
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        for kid in ("rsa-1", "ec-1"):  # RS256 and ES256
            made = client.post(
                "/task", json={"prompt": f"signed by {kid}"}, headers=bearer(issuer.token(kid=kid))
            )
            assert made.status_code == 200, made.text
            assert made.json()["owner"] == "oidc:alice@example.com"
        mine = client.get("/query", headers=bearer(issuer.token())).json()["items"]
        assert len(mine) == 2
        # Neither an API key nor another principal sees them, nor they the key's.
        keyed = client.post("/task", json={"prompt": "by key"}, headers={"X-API-Key": ALICE})
        assert keyed.json()["owner"] == "alice"
        assert [
            t["owner"] for t in client.get("/query", headers={"X-API-Key": ALICE}).json()["items"]
        ] == ["alice"]
        bob = bearer(issuer.token("bob@example.com"))
        assert client.get("/query", headers=bob).json()["items"] == []
        assert client.get(f"/task/{mine[0]['id']}", headers=bob).status_code == 404
        assert (
            client.get(f"/task/{keyed.json()['id']}", headers=bearer(issuer.token())).status_code
            == 404
        )

        both = client.get("/query", headers={"X-API-Key": ALICE, **bearer(issuer.token())})
        assert both.status_code == 400
        assert "not both" in both.json()["error"]["message"]

        schemes = client.get("/openapi.json", headers={"X-API-Key": ALICE}).json()
        assert set(schemes["components"]["securitySchemes"]) == {"APIKeyHeader", "BearerToken"}
        assert schemes["paths"]["/task"]["post"]["security"] == [
            {"APIKeyHeader": []},
            {"BearerToken": []},
        ]
    log = service.logs()
    assert '"key": "oidc:alice@example.com"' in log  # the access log names the principal


def test_every_failed_check_is_a_401_that_names_it(
    start_service: StartService, issuer: FakeIssuer
) -> None:
    service = start_service(**oidc_env(issuer, OIDC_REQUIRED_CLAIMS="groups=ml-team"))
    now = int(time.time())
    rogue = SigningKey("rogue", "RS256")
    impostor = SigningKey("rsa-1", "RS256")  # the issuer's kid, another key
    good = {
        "iss": issuer.url,
        "aud": AUDIENCE,
        "sub": "eve",
        "exp": now + 600,
        "groups": ["ml-team"],
    }
    cases = {
        "not-a-jwt": "not a well-formed JWT",
        jwt.encode(good, None, algorithm="none"): "algorithm 'none' is not one of RS256, ES256",
        hmac_signed_with(issuer.key("rsa-1").public_pem(), good): "algorithm 'HS256'",
        issuer.token(exp=now - 3600, groups=["ml-team"]): "it has expired (exp)",
        issuer.token(nbf=now + 3600, groups=["ml-team"]): "it is not valid yet (nbf)",
        issuer.token(
            iss="https://evil.example", groups=["ml-team"]
        ): f"its issuer (iss) is not {issuer.url}",
        issuer.token(
            aud="another-service", groups=["ml-team"]
        ): f"its audience (aud) does not include {AUDIENCE}",
        jwt.encode(good, rogue.private, algorithm="RS256", headers={"kid": "rogue"}): "kid 'rogue'",
        jwt.encode(
            good, impostor.private, algorithm="RS256", headers={"kid": "rsa-1"}
        ): "signature does not verify",
        issuer.token(
            groups=["other-team"]
        ): "its 'groups' claim does not hold the required 'ml-team'",
        issuer.token(exp=None, groups=["ml-team"]): "it lacks the 'exp' claim",
        issuer.token(sub=None, groups=["ml-team"]): "it has no 'sub' claim",
    }
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        assert (
            client.get("/query", headers=bearer(issuer.token(groups=["ml-team"]))).status_code
            == 200
        )
        for token, reason in cases.items():
            refused = client.get("/query", headers=bearer(token))
            assert refused.status_code == 401, (reason, refused.text)
            assert refused.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
            error = refused.json()["error"]
            assert error["type"] == "invalid_token"
            assert reason in error["message"], (reason, error["message"])
        missing = client.get("/query")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"] == 'ApiKey header="X-API-Key", Bearer'
    log = service.logs()
    assert "Traceback" not in log
    for token in cases:
        assert token not in log
    assert "bearer token refused: it has expired (exp)" in log


def test_keys_rotate_and_unknown_kids_cannot_flood_the_issuer(
    start_service: StartService, issuer: FakeIssuer
) -> None:
    service = start_service(**oidc_env(issuer, OIDC_JWKS_COOLDOWN_S="2"))
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        assert client.get("/query", headers=bearer(issuer.token())).status_code == 200
        fetched = issuer.jwks_fetches
        assert fetched == 1

        rogues = [SigningKey(f"forged-{n}", "ES256") for n in range(30)]
        claims = {"iss": issuer.url, "aud": AUDIENCE, "sub": "eve", "exp": int(time.time()) + 600}
        for rogue in rogues:  # each an unknown kid
            token = jwt.encode(claims, rogue.private, algorithm="ES256", headers={"kid": rogue.kid})
            assert client.get("/query", headers=bearer(token)).status_code == 401
        assert issuer.jwks_fetches - fetched <= 1  # the cooldown: one fetch at most

        issuer.keys = [SigningKey("rsa-2", "RS256"), issuer.key("ec-1")]  # rsa-1 retired
        time.sleep(2.1)  # past the cooldown
        assert client.get("/query", headers=bearer(issuer.token(kid="rsa-2"))).status_code == 200
        retired = client.get("/query", headers=bearer(issuer.token(kid="ec-1")))
        assert retired.status_code == 200  # still published
        # rsa-1's tokens were signed before the rotation; the key is gone after the fetch.
        old = issuer.keys  # mint one with the retired key, as a stolen token would be
        issuer.keys = [*old, SigningKey("rsa-1", "RS256")]
        stale = issuer.token(kid="rsa-1")
        issuer.keys = old
        gone = client.get("/query", headers=bearer(stale))
        assert gone.status_code == 401 and "kid 'rsa-1'" in gone.json()["error"]["message"]


def test_an_issuer_out_of_reach_leaves_cached_keys_working(
    start_service: StartService, issuer: FakeIssuer
) -> None:
    service = start_service(
        **oidc_env(issuer, OIDC_JWKS_COOLDOWN_S="0.5", OIDC_JWKS_REFRESH_S="0.5")
    )
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        assert client.get("/query", headers=bearer(issuer.token())).status_code == 200
        issuer.available = False
        time.sleep(0.6)  # the set is due a refetch, which fails
        assert client.get("/query", headers=bearer(issuer.token())).status_code == 200
        assert client.get("/query", headers=bearer(issuer.token(kid="ec-1"))).status_code == 200
        issuer.keys.append(SigningKey("rsa-3", "RS256"))
        time.sleep(0.6)
        unknown = client.get("/query", headers=bearer(issuer.token(kid="rsa-3")))
        assert unknown.status_code == 503, unknown.text  # it needs a fetch that cannot be made
        assert unknown.json()["error"]["type"] == "unavailable"
        assert client.get("/query", headers={"X-API-Key": ALICE}).status_code == 200
        issuer.available = True
        time.sleep(0.6)
        assert client.get("/query", headers=bearer(issuer.token(kid="rsa-3"))).status_code == 200
    assert "could not fetch the token issuer's keys, keeping 2 cached" in service.logs()


def test_without_oidc_a_bearer_header_beside_a_key_is_ignored(
    start_service: StartService,
) -> None:
    """Clients that send both (an SDK's Authorization, the service's key) keep working."""
    service = start_service(LLM_PROVIDER="mock")
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        both = client.get("/query", headers={"X-API-Key": ALICE, **bearer("sk-anything")})
        assert both.status_code == 200
        alone = client.get("/query", headers=bearer("sk-anything"))
        assert alone.status_code == 401
        assert "OIDC_ISSUER is not set" in alone.json()["error"]["message"]


def test_an_issuer_never_reached_answers_503_and_keys_still_work(
    start_service: StartService,
) -> None:
    from tests.support import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    service = start_service(OIDC_ISSUER=dead, OIDC_AUDIENCE=AUDIENCE, LLM_PROVIDER="mock")
    issuer = FakeIssuer()  # never started: its keys mint a token for the dead address
    now = int(time.time())
    token = jwt.encode(
        {"iss": dead, "aud": AUDIENCE, "sub": "x", "exp": now + 60},
        issuer.key("rsa-1").private,
        algorithm="RS256",
        headers={"kid": "rsa-1"},
    )
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        assert client.get("/query", headers=bearer(token)).status_code == 503
        assert client.get("/query", headers={"X-API-Key": ALICE}).status_code == 200


def test_a_principal_has_a_policy_like_a_key_name(
    start_service: StartService, issuer: FakeIssuer, tmp_path: Path
) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(
        "keys:\n  oidc:batch:\n    models: [mock-model]\n    token_budget: 5000/day\n"
    )
    service = start_service(**oidc_env(issuer, KEY_POLICIES_FILE=str(policies)))
    with httpx.Client(base_url=service.base_url, timeout=30) as client:
        batch = bearer(issuer.token("batch"))
        other = client.post("/task", json={"prompt": "x", "model": "gpt-4o"}, headers=batch)
        assert other.status_code == 403 and other.json()["error"]["type"] == "model_not_allowed"
        assert (
            client.post("/task", json={"prompt": "x"}, headers=bearer(issuer.token("free"))).json()[
                "reserved_tokens"
            ]
            is None
        )
        (window,) = client.get("/usage", headers=batch).json()["windows"]
        assert window["limit"] == 5000


def test_an_issuer_needs_an_audience_and_public_key_algorithms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_KEYS", ALICE)
    monkeypatch.setenv("OIDC_ISSUER", "https://issuer.example")
    with pytest.raises(ConfigError, match="OIDC_AUDIENCE: required with OIDC_ISSUER"):
        load_settings()
    monkeypatch.setenv("OIDC_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("OIDC_ALGORITHMS", "RS256,HS256")
    with pytest.raises(ConfigError, match="OIDC_ALGORITHMS: expected a comma-separated list"):
        load_settings()
    monkeypatch.setenv("OIDC_ALGORITHMS", "ES256")
    monkeypatch.setenv("OIDC_ISSUER", "file:///etc/passwd")
    with pytest.raises(ConfigError, match="OIDC_ISSUER: expected an http:// or https:// URL"):
        load_settings()
    monkeypatch.delenv("OIDC_ALGORITHMS")
    assert Settings(oidc_issuer="https://i.example", oidc_audience="a").oidc_algorithm_names == [
        "RS256",
        "ES256",
    ]
