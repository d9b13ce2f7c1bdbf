"""Who is calling, and what they may touch: the internal JWT, `Principal` and scope checks.

The API gateway asks the tokens service to verify each request's bearer (`/auth/verify`) and
forwards the answer, a short-lived ES256 JWT, in the `X-Internal-Token` header. Every service
verifies that JWT itself against the tokens service's JWKS and gets a `Principal`; nothing
trusts a bare header. Scope rules live here once, so every service applies the same ones:

- admin: everything; dealer staff: their dealer's devices; customer: their dealer's devices
  whose customer email is theirs; a service principal (internal calls): everything;
- an API token narrows its account: `read` access never changes state, and a token restricted
  to devices sees only those devices.
"""

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
import jwt
from fastapi import Depends, Request
from jwt import PyJWK, PyJWKSet
from pydantic import BaseModel, ConfigDict, Field

from common.http import ProblemError

INTERNAL_TOKEN_HEADER = "X-Internal-Token"  # noqa: S105 - a header name, not a secret
INTERNAL_ISSUER = "autogen-tokens"
INTERNAL_AUDIENCE = "autogen-internal"
INTERNAL_ALGORITHM = "ES256"
PRINCIPAL_CLAIM = "agf"

Role = Literal["admin", "dealer", "customer", "service"]
Access = Literal["read", "control"]


class Principal(BaseModel):
    """The caller of one request, as the tokens service vouched for it."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    email: str | None = None
    role: Role
    dealer_id: str | None = None
    customer_id: str | None = None
    access: Access = "control"
    device_ids: frozenset[str] | None = Field(
        default=None, description="Set for a device-restricted API token: only these devices."
    )
    token_id: str | None = Field(default=None, description="The API token used, if any.")

    @property
    def is_admin(self) -> bool:
        """Platform administrator (or a service acting for the platform)."""
        return self.role in ("admin", "service")

    @property
    def via_api_token(self) -> bool:
        """True when the request carried an API token rather than a signed-in session."""
        return self.token_id is not None


@dataclass(frozen=True)
class DeviceOwnership:
    """What scope checks need to know about a device."""

    device_id: str
    dealer_id: str
    customer_email: str | None = None


def can_read_device(principal: Principal, device: DeviceOwnership) -> bool:
    """May `principal` see `device`? (Anything it may not see must answer 404.)"""
    if principal.device_ids is not None and device.device_id not in principal.device_ids:
        return False
    if principal.is_admin:
        return True
    if principal.dealer_id is None or principal.dealer_id != device.dealer_id:
        return False
    if principal.role == "customer":
        return _same_email(principal.email, device.customer_email)
    return principal.role == "dealer"


def can_control_device(principal: Principal, device: DeviceOwnership) -> bool:
    """May `principal` send commands to `device`? Implies it may read it."""
    return principal.access == "control" and can_read_device(principal, device)


def can_act_for_dealer(principal: Principal, dealer_id: str) -> bool:
    """May `principal` manage things of `dealer_id` (dealer staff of it, or an admin)?"""
    if principal.is_admin:
        return True
    return principal.role == "dealer" and principal.dealer_id == dealer_id


def require_control(principal: Principal) -> None:
    """403 unless the principal may change state (a `read` token may not)."""
    if principal.access != "control":
        raise ProblemError(403, "Forbidden", "this token is read-only")


def require_admin(principal: Principal) -> None:
    """403 unless the caller is a platform admin."""
    if not principal.is_admin:
        raise ProblemError(403, "Forbidden", "only platform admins may do this")


def _same_email(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip().lower() == b.strip().lower()


# ------------------------------------------------------------------ the internal JWT


def principal_claims(principal: Principal) -> dict[str, Any]:
    """The claims that carry `principal` (the tokens service signs them)."""
    body = principal.model_dump(mode="json", exclude_none=True)
    if principal.device_ids is not None:
        body["device_ids"] = sorted(principal.device_ids)
    return {"sub": principal.user_id, PRINCIPAL_CLAIM: body}


def sign_internal_token(
    principal: Principal, *, private_key: Any, kid: str, ttl_s: int = 60
) -> str:
    """An internal JWT for `principal` (the tokens service's answer to `/auth/verify`)."""
    now = int(time.time())
    claims = {
        **principal_claims(principal),
        "iss": INTERNAL_ISSUER,
        "aud": INTERNAL_AUDIENCE,
        "iat": now,
        "exp": now + ttl_s,
    }
    return jwt.encode(claims, private_key, algorithm=INTERNAL_ALGORITHM, headers={"kid": kid})


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """Read a `Principal` back from verified claims."""
    return Principal.model_validate(claims[PRINCIPAL_CLAIM])


class AuthError(Exception):
    """The internal token is missing, malformed, expired or not signed by a known key."""


_RETRY_AFTER_FAILURE_S = 1.0


class InternalTokenVerifier:
    """Verifies internal JWTs against the tokens service's keys (JWKS, refreshed on rotation)."""

    def __init__(
        self,
        *,
        jwks_url: str | None = None,
        jwks: Mapping[str, Any] | None = None,
        refresh_interval_s: float = 30.0,
        leeway_s: float = 5.0,
        cache_ttl_s: float = 30.0,
        cache_size: int = 4096,
    ) -> None:
        if jwks_url is None and jwks is None:
            raise ValueError("give jwks_url or a static jwks")
        self._jwks_url = jwks_url
        self._keys: dict[str, PyJWK] = _index(jwks) if jwks is not None else {}
        self._refresh_interval_s = refresh_interval_s
        self._leeway_s = leeway_s
        self._fetched_at = float("-inf")
        self._failed_at = float("-inf")
        # One fetch at a time: requests arriving during a fetch wait for its keys instead of
        # seeing "fetched just now", skipping the fetch and answering 401.
        self._refreshing = asyncio.Lock()
        # Verified tokens, by the whole token, until min(its exp, cache_ttl_s from now): the
        # tokens service reuses an internal JWT for half its life, and an ES256 check is the
        # biggest fixed cost of a request. 0 turns it off.
        self._cache_ttl_s = cache_ttl_s
        self._cache_size = cache_size
        self._verified: dict[str, tuple[Principal, float]] = {}

    async def verify(self, token: str) -> Principal:
        """The principal in `token`; raises `AuthError` for anything not valid."""
        cached = self._verified.get(token)
        if cached is not None:
            if time.time() < cached[1]:
                return cached[0]
            del self._verified[token]
        principal, expires_at = await self._verify(token)
        if self._cache_ttl_s > 0:
            if len(self._verified) >= self._cache_size:
                del self._verified[next(iter(self._verified))]  # the oldest entry
            self._verified[token] = (principal, min(expires_at, time.time() + self._cache_ttl_s))
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise AuthError("malformed internal token") from exc
        if not isinstance(kid, str):
            raise AuthError("internal token has no key id")
        key = await self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[INTERNAL_ALGORITHM],
                audience=INTERNAL_AUDIENCE,
                issuer=INTERNAL_ISSUER,
                leeway=self._leeway_s,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
            return principal_from_claims(claims), float(claims["exp"])
        except (jwt.PyJWTError, KeyError, ValueError) as exc:
            raise AuthError(f"invalid internal token: {exc}") from exc

    async def _key(self, kid: str) -> PyJWK:
        # An unknown kid means the keys rotated (or none were fetched yet): refetch, but not
        # more than once a while, so forged kids cannot make us hammer the tokens service.
        if kid not in self._keys and self._jwks_url is not None:
            async with self._refreshing:
                if kid not in self._keys and self._may_refresh():
                    await self.refresh()
        if kid not in self._keys:
            raise AuthError("internal token signed by an unknown key")
        return self._keys[kid]

    def _may_refresh(self) -> bool:
        now = time.monotonic()
        # After a failed fetch (tokens service down) retry soon, not after the full interval.
        return (
            now - self._fetched_at >= self._refresh_interval_s
            and now - self._failed_at >= _RETRY_AFTER_FAILURE_S
        )

    async def refresh(self) -> None:
        """Fetch the JWKS now (errors propagate: the caller answers 503, not 401)."""
        if self._jwks_url is None:
            return
        try:
            async with httpx.AsyncClient(timeout=3.0) as client:
                response = await client.get(self._jwks_url)
                response.raise_for_status()
            keys = _index(response.json())
        except Exception:
            self._failed_at = time.monotonic()
            raise
        self._keys = keys
        self._fetched_at = time.monotonic()


def _index(jwks: Mapping[str, Any]) -> dict[str, PyJWK]:
    keyset = PyJWKSet.from_dict(dict(jwks))
    return {key.key_id: key for key in keyset.keys if key.key_id}


# ------------------------------------------------------------------ FastAPI


async def current_principal(request: Request) -> Principal:
    """Dependency: the verified caller; 401 problem+json without a valid internal token.

    The app's lifespan puts an `InternalTokenVerifier` on `app.state.verifier`.
    """
    token = request.headers.get(INTERNAL_TOKEN_HEADER)
    if not token:
        raise ProblemError(401, "Unauthorized", "missing credentials")
    verifier: InternalTokenVerifier = request.app.state.verifier
    try:
        return await verifier.verify(token)
    except AuthError as exc:
        raise ProblemError(401, "Unauthorized", str(exc)) from exc


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
