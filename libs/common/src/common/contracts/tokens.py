"""API token lifecycle events of the tokens service (an audit trail other services may follow).

`tokens.token.v1`, keyed by token id: a token was created, revoked, or a revoked token was
presented again (someone still holds it: worth an alert). Secrets never appear here.
"""

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from common.contracts.topic import Topic

TokenEventKind = Literal["created", "revoked", "revoked_use"]


class TokenEvent(BaseModel):
    """One thing that happened to an API token."""

    # Readers ignore fields added later in this version (additive changes only).
    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: TokenEventKind
    token_id: str = Field(min_length=1, max_length=64)
    name: str
    user_id: str = Field(description="The account the token acts for.")
    dealer_id: str | None = None
    access: Literal["read", "control"]
    device_ids: list[str] | None = Field(
        default=None, description="Set when the token is restricted to these devices."
    )
    expires_at: AwareDatetime
    actor_user_id: str | None = Field(
        default=None, description="Who created or revoked it (None for a revoked-token use)."
    )
    actor_token_id: str | None = Field(
        default=None, description="The API token the actor used, if it used one."
    )
    client_ip: str | None = Field(default=None, description="Where a revoked token came from.")
    at: AwareDatetime


TOKEN = Topic(
    name="tokens.token.v1",
    data=TokenEvent,
    event_type="tokens.token",
    key="token id",
    description="API tokens created and revoked, and uses of revoked tokens (no secrets).",
)
