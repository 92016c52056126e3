"""A fake OpenID Connect issuer on loopback: a discovery document and a JWKS of real RSA and
EC keys, rotated at will, and tokens minted with them."""

from __future__ import annotations

import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.loopback import LoopbackServer

AUDIENCE = "reasoning-agent"


class SigningKey:
    """A private key with its `kid` and algorithm, and the public JWK the issuer shows."""

    def __init__(self, kid: str, algorithm: str) -> None:
        self.kid, self.algorithm = kid, algorithm
        if algorithm.startswith("ES"):
            self.private: Any = ec.generate_private_key(ec.SECP256R1())
            self.jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk.update(kid=kid, use="sig", alg=algorithm)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class FakeIssuer:
    """Serves `/.well-known/openid-configuration` and `/jwks`; counts the key-set fetches."""

    def __init__(self) -> None:
        self.keys = [SigningKey("rsa-1", "RS256"), SigningKey("ec-1", "ES256")]
        self.jwks_fetches = 0
        self.available = True  # False: 503 for every document
        app = Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self._discovery),
                Route("/jwks", self._jwks),
            ]
        )
        self._http = LoopbackServer(app)
        self.url = f"http://127.0.0.1:{self._http.port}"

    def start(self) -> FakeIssuer:
        self._http.start()
        return self

    def stop(self) -> None:
        self._http.stop()

    def key(self, kid: str) -> SigningKey:
        return next(key for key in self.keys if key.kid == kid)

    def token(self, sub: str = "alice@example.com", *, kid: str = "rsa-1", **claims: Any) -> str:
        """A token as the issuer would mint it; `claims` add to or replace the usual ones
        (a None value drops that claim)."""
        now = int(time.time())
        body = {"iss": self.url, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600}
        body.update(claims)
        body = {name: value for name, value in body.items() if value is not None}
        key = self.key(kid)
        return jwt.encode(body, key.private, algorithm=key.algorithm, headers={"kid": kid})

    async def _discovery(self, _: Request) -> Response:
        if not self.available:
            return Response(status_code=503)
        return JSONResponse({"issuer": self.url, "jwks_uri": f"{self.url}/jwks"})

    async def _jwks(self, _: Request) -> Response:
        self.jwks_fetches += 1
        if not self.available:
            return Response(status_code=503)
        return JSONResponse({"keys": [key.jwk for key in self.keys]})
