"""Settings of the tokens service (environment prefix `TOKENS_`)."""

from typing import ClassVar

from pydantic import Field, SecretStr

from common.settings import DatabaseSettings, service_config


class TokensSettings(DatabaseSettings):
    """Everything the tokens service reads from its environment.

    The first admin may also come from `AUTOGEN_ADMIN_EMAIL` / `AUTOGEN_ADMIN_PASSWORD` (the
    shared prefix). Every secret below has a development default that the settings base
    refuses outside development and test.
    """

    model_config = service_config("TOKENS_")
    service_name: ClassVar[str] = "tokens"

    http_port: int = 8101

    database_url: SecretStr = SecretStr(
        "postgresql+asyncpg://tokens:tokens-dev@127.0.0.1:55432/tokens"
    )

    admin_email: str = "admin@autogen.local"
    admin_password: SecretStr = SecretStr("admin-dev-password")

    # Keyed hash of API token secrets: a stolen table cannot be brute-forced offline.
    token_hash_key: SecretStr = SecretStr("tokens-hash-key-dev")
    # Encrypts the ES256 private keys stored in the database.
    key_encryption_secret: SecretStr = SecretStr("tokens-key-encryption-dev")

    session_ttl_s: int = Field(default=3600, ge=60, le=86400)
    internal_token_ttl_s: int = Field(default=60, ge=10, le=600)
    # Signing keys: a new key every `key_rotation_days`; published `key_publish_lead_s`
    # before it signs anything, so every verifier's JWKS refresh has seen it.
    key_rotation_days: int = Field(default=30, ge=1, le=365)
    key_publish_lead_s: int = Field(default=120, ge=0, le=3600)
    key_check_interval_s: float = Field(default=60.0, gt=0)

    # Verification caches: Redis (shared, invalidated on revoke) and in-process (each
    # worker re-checks Redis after this long, so a revocation is seen within it).
    verify_cache_ttl_s: int = Field(default=60, ge=1, le=3600)
    local_cache_ttl_s: float = Field(default=0.5, ge=0, lt=1.0)
    last_used_flush_interval_s: float = Field(default=5.0, gt=0)
    revoked_use_audit_interval_s: int = Field(default=10, ge=1)

    # Login throttling (per email and per client address, in a sliding window).
    login_window_s: int = Field(default=900, ge=1)
    login_max_failures_per_email: int = Field(default=5, ge=1)
    login_max_failures_per_ip: int = Field(default=50, ge=1)

    @property
    def jwks_path(self) -> str:
        """Where the service publishes its public keys."""
        return "/.well-known/jwks.json"
