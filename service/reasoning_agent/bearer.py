"""Bearer tokens: JWTs from one OpenID Connect issuer (a company's, or the cluster's own for
service-account tokens), verified with the keys the issuer publishes.

The key set comes from the issuer's discovery document (or OIDC_JWKS_URL) through PyJWT's
PyJWKClient and is cached here: a token signed with an unknown key fetches it again, but at
most once per OIDC_JWKS_COOLDOWN_S whatever the outcome, so forged `kid`s cannot make the
service flood the issuer; a set older than OIDC_JWKS_REFRESH_S is fetched again when next
used. A fetch that fails keeps the cached keys working.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK, PyJWKClient

from reasoning_agent.config import Settings

__all__ = ["PRINCIPAL_PREFIX", "BearerVerifier", "IssuerUnavailable", "TokenRefused"]

log = logging.getLogger(__name__)

# A token's caller is named `oidc:<claim>`: never a key name, which cannot hold a colon.
PRINCIPAL_PREFIX = "oidc:"
_MAX_NAME = 64  # what a task's owner column holds


class TokenRefused(Exception):
    """The token failed a check; the message says which (and never holds the token)."""


class IssuerUnavailable(Exception):
    """The token needs a key the issuer could not be asked for now."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Source:
    """Where the keys come from, and how to ask."""

    issuer: str
    jwks_url: str | None
    ca_file: Path | None
    token_file: Path | None
    timeout_s: float = 5.0

    def headers(self) -> dict[str, str]:
        # Read at each fetch: a projected service-account token is rotated in place.
        if self.token_file is None:
            return {}
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.ca_file is None:
            return None
        context = ssl.create_default_context(cafile=str(self.ca_file))
        # A cluster CA made without a keyUsage extension fails Python 3.13's strict checks;
        # the chain and the host name are verified all the same.
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
        return context


class KeySet:
    """The issuer's signing keys by `kid`, fetched again only as the module docstring says."""

    def __init__(self, source: _Source, *, cooldown_s: float, refresh_s: float) -> None:
        self._source = source
        self._cooldown_s = cooldown_s
        self._refresh_s = refresh_s
        self._keys: dict[str | None, PyJWK] = {}
        self._fetched_at: float | None = None  # the last fetch that worked
        self._tried_at: float | None = None  # the last fetch, whatever came of it
        self._failed = False
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> PyJWK:
        """The key that signed a token with this `kid`."""
        now = time.monotonic()
        if self._fetched_at is None or now - self._fetched_at >= self._refresh_s:
            await self._fetch()
        found = self._find(kid)
        if found is None:
            await self._fetch()
            found = self._find(kid)
        if found is not None:
            return found
        if self._failed:
            raise IssuerUnavailable("the token issuer's keys cannot be fetched now")
        raise TokenRefused(f"its signing key (kid {kid!r}) is not one the issuer publishes")

    def _find(self, kid: str | None) -> PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))  # a lone key needs no name
        return self._keys.get(kid)

    async def _fetch(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._tried_at is not None and now - self._tried_at < self._cooldown_s:
                return  # asked lately (perhaps by the request that held the lock)
            self._tried_at = now
            try:
                keys = await asyncio.to_thread(self._fetch_now)
            except Exception as exc:
                self._failed = True
                log.warning(
                    "could not fetch the token issuer's keys, keeping %d cached: %s",
                    len(self._keys),
                    exc,
                )
                return
            self._keys, self._fetched_at, self._failed = keys, time.monotonic(), False

    def _fetch_now(self) -> dict[str | None, PyJWK]:
        source = self._source
        url = source.jwks_url or _discover(source)
        client = PyJWKClient(
            url,
            cache_jwk_set=False,
            headers=source.headers(),
            timeout=source.timeout_s,
            ssl_context=source.ssl_context(),
        )
        usable = [key for key in client.get_jwk_set().keys if key.public_key_use in ("sig", None)]
        return {key.key_id: key for key in usable}


def _discover(source: _Source) -> str:
    """The `jwks_uri` of the issuer's discovery document."""
    url = f"{source.issuer.rstrip('/')}/.well-known/openid-configuration"
    # Settings allow only http(s) issuers, so no file: or custom scheme reaches urllib.
    request = urllib.request.Request(url, headers=source.headers())  # noqa: S310
    context = source.ssl_context()
    with urllib.request.urlopen(  # noqa: S310
        request, timeout=source.timeout_s, context=context
    ) as answer:
        document: Any = json.load(answer)
    jwks_uri = document.get("jwks_uri") if isinstance(document, dict) else None
    if not isinstance(jwks_uri, str):
        raise ValueError(f"{url} names no jwks_uri; set OIDC_JWKS_URL")
    return jwks_uri


class BearerVerifier:
    """Turns a bearer token into the name of its caller, or says why not."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        algorithms: list[str],
        leeway_s: float,
        required_claims: dict[str, str],
        principal_claim: str,
        keys: KeySet,
    ) -> None:
        self.issuer = issuer
        self._audience = audience
        self._algorithms = algorithms
        self._leeway_s = leeway_s
        self._required = required_claims
        self._principal_claim = principal_claim
        self.keys = keys

    @classmethod
    def from_settings(cls, settings: Settings) -> BearerVerifier | None:
        """None when OIDC_ISSUER is unset: bearer tokens are not accepted."""
        if settings.oidc_issuer is None:
            return None
        assert settings.oidc_audience is not None  # Settings insists on it
        source = _Source(
            issuer=settings.oidc_issuer,
            jwks_url=settings.oidc_jwks_url,
            ca_file=settings.oidc_ca_file,
            token_file=settings.oidc_fetch_token_file,
        )
        return cls(
            issuer=settings.oidc_issuer,
            audience=settings.oidc_audience,
            algorithms=settings.oidc_algorithm_names,
            leeway_s=settings.oidc_leeway_s,
            required_claims=settings.oidc_claims,
            principal_claim=settings.oidc_principal_claim,
            keys=KeySet(
                source,
                cooldown_s=settings.oidc_jwks_cooldown_s,
                refresh_s=settings.oidc_jwks_refresh_s,
            ),
        )

    async def principal(self, token: str) -> str:
        """The caller's name (`oidc:` and its principal claim); TokenRefused or
        IssuerUnavailable when there is none."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise TokenRefused("it is not a well-formed JWT") from None
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:  # never the token's choice: `none`, HS256...
            raise TokenRefused(
                f"its algorithm {algorithm!r} is not one of {', '.join(self._algorithms)}"
            )
        kid = header.get("kid")
        key = await self.keys.key(kid if isinstance(kid, str) else None)
        claims = self._verified(token, key)
        for claim, wanted in self._required.items():
            value = claims.get(claim)
            held = value if isinstance(value, list) else [value]
            if wanted not in [str(v).lower() if isinstance(v, bool) else str(v) for v in held]:
                raise TokenRefused(f"its {claim!r} claim does not hold the required {wanted!r}")
        principal = claims.get(self._principal_claim)
        if not isinstance(principal, str) or not principal:
            raise TokenRefused(f"it has no {self._principal_claim!r} claim to name its caller")
        name = f"{PRINCIPAL_PREFIX}{principal}"
        if len(name) > _MAX_NAME:
            raise TokenRefused(
                f"its {self._principal_claim!r} claim is longer than "
                f"{_MAX_NAME - len(PRINCIPAL_PREFIX)} characters"
            )
        return name

    def _verified(self, token: str, key: PyJWK) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self.issuer,
                leeway=self._leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused("it has expired (exp)") from None
        except jwt.ImmatureSignatureError:
            raise TokenRefused("it is not valid yet (nbf)") from None
        except jwt.InvalidIssuerError:
            raise TokenRefused(f"its issuer (iss) is not {self.issuer}") from None
        except jwt.InvalidAudienceError:
            raise TokenRefused(f"its audience (aud) does not include {self._audience}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRefused(f"it lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused("its signature does not verify") from None
        except jwt.PyJWTError as exc:  # a key of another type, a malformed claim
            raise TokenRefused(f"it does not verify: {exc.__class__.__name__}") from None
        return claims
