"""Internal tokens for tests of services that sit behind the API gateway.

A test signs its own ES256 key and hands the service a verifier with the matching static JWKS,
so a service's tests need neither the tokens service nor nginx.
"""

import json
import uuid
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from common.auth import INTERNAL_TOKEN_HEADER, InternalTokenVerifier, Principal, sign_internal_token


class TestIssuer:
    """Signs internal tokens with a throwaway key; `verifier()` trusts exactly that key."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.kid = f"test-{uuid.uuid4().hex[:8]}"
        self._key = ec.generate_private_key(ec.SECP256R1())

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWK set."""
        jwk = json.loads(ECAlgorithm.to_jwk(self._key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "ES256"})
        return {"keys": [jwk]}

    def verifier(self) -> InternalTokenVerifier:
        """A verifier that accepts this issuer's tokens."""
        return InternalTokenVerifier(jwks=self.jwks)

    def token(self, principal: Principal, *, ttl_s: int = 300) -> str:
        """A signed internal token for `principal`."""
        return sign_internal_token(principal, private_key=self._key, kid=self.kid, ttl_s=ttl_s)

    def headers(self, principal: Principal) -> dict[str, str]:
        """Request headers as the API gateway would forward them."""
        return {INTERNAL_TOKEN_HEADER: self.token(principal)}
