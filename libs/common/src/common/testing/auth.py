"""Internal tokens for tests of services that sit behind the API gateway.

A test signs its own ES256 key and hands the service a verifier with the matching static JWKS,
so a service's tests need neither the tokens service nor nginx.
"""

import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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

    @contextlib.contextmanager
    def serve_jwks(self) -> Iterator[str]:
        """Serve the public keys over HTTP on loopback, as the tokens service serves its own.

        For service processes started by a test or a benchmark (`<SVC>_JWKS_URL`); yields the URL.
        """
        body = json.dumps(self.jwks).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
        finally:
            server.shutdown()
            server.server_close()

    def verifier(self) -> InternalTokenVerifier:
        """A verifier that accepts this issuer's tokens."""
        return InternalTokenVerifier(jwks=self.jwks)

    def token(self, principal: Principal, *, ttl_s: int = 300) -> str:
        """A signed internal token for `principal`."""
        return sign_internal_token(principal, private_key=self._key, kid=self.kid, ttl_s=ttl_s)

    def headers(self, principal: Principal) -> dict[str, str]:
        """Request headers as the API gateway would forward them."""
        return {INTERNAL_TOKEN_HEADER: self.token(principal)}
