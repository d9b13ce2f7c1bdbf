"""Accounts, API tokens and who may issue what: plain types and rules, no I/O.

The scope rules for devices are the platform's (`common.auth`); the rules here decide which
accounts a caller sees and manages, and that a token never grants more than its issuer.
"""

import base64
import hashlib
import hmac
import secrets
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from common.auth import Access, DeviceOwnership, Principal, can_read_device

UserRole = Literal["admin", "dealer", "customer"]

TOKEN_PREFIX = "agk_"  # noqa: S105 - the public prefix, not a secret
TOKEN_SECRET_BYTES = 32
_BODY_CHARS = 43  # base64url of 32 bytes, unpadded
_CHECKSUM_CHARS = 6  # base64url of a 4-byte CRC32, unpadded
TOKEN_LENGTH = len(TOKEN_PREFIX) + _BODY_CHARS + _CHECKSUM_CHARS
MAX_TOKEN_DAYS = 365


@dataclass(frozen=True)
class Account:
    """A user as scope rules need it."""

    id: str
    email: str
    role: UserRole
    dealer_id: str | None

    def principal(self) -> Principal:
        """The account signed in (full access of its role, no device restriction)."""
        return Principal(
            user_id=self.id,
            email=self.email,
            role=self.role,
            dealer_id=self.dealer_id,
            customer_id=self.id if self.role == "customer" else None,
            access="control",
        )


@dataclass(frozen=True)
class TokenGrant:
    """What an API token grants: its account, narrowed."""

    token_id: str
    account: Account
    access: Access
    device_ids: frozenset[str] | None

    def principal(self) -> Principal:
        """The principal of a request that carries this token."""
        base = self.account.principal()
        return base.model_copy(
            update={"access": self.access, "device_ids": self.device_ids, "token_id": self.token_id}
        )


class ScopeError(Exception):
    """The caller may not do this; `status` is the answer (403, or 404 to hide existence)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# ------------------------------------------------------------------ token format


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _checksum(body: str) -> str:
    return _b64(zlib.crc32((TOKEN_PREFIX + body).encode()).to_bytes(4, "big"))


def new_token_secret() -> str:
    """`agk_` + 32 random bytes (base64url) + CRC32 of both (base64url), like GitHub's tokens."""
    body = _b64(secrets.token_bytes(TOKEN_SECRET_BYTES))
    return TOKEN_PREFIX + body + _checksum(body)


def looks_like_api_token(value: str) -> bool:
    """Offline check a secret scanner can run too: prefix, length and checksum."""
    if len(value) != TOKEN_LENGTH or not value.startswith(TOKEN_PREFIX):
        return False
    body = value[len(TOKEN_PREFIX) : len(TOKEN_PREFIX) + _BODY_CHARS]
    given = value[-_CHECKSUM_CHARS:]
    return hmac.compare_digest(given, _checksum(body))


def hash_token(secret: str, key: bytes) -> str:
    """The only form of a token the database keeps: HMAC-SHA256 with the service's key."""
    return hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()


def token_expiry(now: datetime, days: int) -> datetime:
    """When a token issued `now` for `days` expires; days must be 1..365."""
    if not 1 <= days <= MAX_TOKEN_DAYS:
        raise ValueError(f"expires_in_days must be between 1 and {MAX_TOKEN_DAYS}")
    return now + timedelta(days=days)


# ------------------------------------------------------------------ accounts in scope


def can_see_account(caller: Principal, account: Account) -> bool:
    """Admins see everyone, dealer staff their dealer's accounts, customers themselves."""
    if caller.is_admin:
        return True
    if caller.role == "dealer":
        return account.dealer_id is not None and account.dealer_id == caller.dealer_id
    return account.id == caller.user_id


def check_account_creation(caller: Principal, *, role: UserRole, dealer_id: str | None) -> None:
    """May `caller` create an account with this role in this dealer? Raises `ScopeError`."""
    if caller.via_api_token:
        # An account made by a token could sign in and issue tokens: no way around that rule.
        raise ScopeError(403, "API tokens cannot create accounts; sign in to do this")
    if caller.access != "control":
        raise ScopeError(403, "this token is read-only")
    if caller.is_admin:
        return
    if caller.role != "dealer":
        raise ScopeError(403, "only admins and dealer staff create accounts")
    if role == "admin":
        raise ScopeError(403, "only admins create admin accounts")
    if dealer_id != caller.dealer_id:
        raise ScopeError(403, "dealer staff create accounts of their own dealer only")


# ------------------------------------------------------------------ token requests


def check_token_request(
    issuer: Principal,
    *,
    account: Account | None,
    access: Access,
    device_ids: Iterable[str] | None,
    devices: dict[str, DeviceOwnership],
) -> TokenGrant:
    """The grant a token request may have, or `ScopeError` (403).

    `account` is None when the requested user does not exist; `devices` holds what is known
    of the requested devices (a missing one is unknown). A token never exceeds its issuer: the
    account must be in the issuer's scope, the access at most the issuer's, and every device
    visible to the issuer and to the account.
    """
    if issuer.via_api_token:
        raise ScopeError(403, "API tokens cannot create tokens; sign in to do this")
    if account is None or not can_see_account(issuer, account):
        raise ScopeError(403, "the account is not in your scope")
    if access == "control" and issuer.access != "control":
        raise ScopeError(403, "you cannot grant control access")
    holder = account.principal()
    restricted: frozenset[str] | None = None
    if device_ids is not None:
        restricted = frozenset(device_ids)
        for device_id in sorted(restricted):
            device = devices.get(device_id)
            if device is None or not (
                can_read_device(issuer, device) and can_read_device(holder, device)
            ):
                raise ScopeError(403, f"device {device_id} is not in scope")
    elif issuer.device_ids is not None:
        raise ScopeError(403, "a device-restricted caller must restrict the token too")
    return TokenGrant(token_id="", account=account, access=access, device_ids=restricted)
