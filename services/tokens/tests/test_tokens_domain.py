"""Token format and the rule that a token never grants more than its issuer (property-based)."""

import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.auth import DeviceOwnership, Principal, can_control_device, can_read_device
from tokens import domain
from tokens.domain import Account, ScopeError

# ------------------------------------------------------------------ token format


def test_secret_has_prefix_32_random_bytes_and_a_checksum() -> None:
    secret = domain.new_token_secret()
    assert secret.startswith("agk_")
    assert len(secret) == domain.TOKEN_LENGTH == 4 + 43 + 6
    assert domain.looks_like_api_token(secret)
    assert domain.new_token_secret() != secret


def test_checksum_catches_a_typo_or_a_truncation() -> None:
    secret = domain.new_token_secret()
    flipped = secret[:10] + ("A" if secret[10] != "A" else "B") + secret[11:]
    assert not domain.looks_like_api_token(flipped)
    assert not domain.looks_like_api_token(secret[:-1])
    assert not domain.looks_like_api_token("ghp_" + secret[4:])


def test_checksum_is_crc32_of_prefix_and_body_so_scanners_can_verify_offline() -> None:
    import base64

    secret = domain.new_token_secret()
    body, checksum = secret[4:-6], secret[-6:]
    crc = zlib.crc32(("agk_" + body).encode()).to_bytes(4, "big")
    assert base64.urlsafe_b64encode(crc).rstrip(b"=").decode() == checksum


def test_only_a_keyed_hash_is_stored() -> None:
    secret = domain.new_token_secret()
    first = domain.hash_token(secret, b"key-one")
    assert first == domain.hash_token(secret, b"key-one")
    assert first != domain.hash_token(secret, b"key-two")
    assert secret not in first


@pytest.mark.parametrize("days", [0, 366, -1])
def test_expiry_is_required_within_a_year(days: int) -> None:
    from datetime import UTC, datetime

    with pytest.raises(ValueError, match="between 1 and 365"):
        domain.token_expiry(datetime.now(UTC), days)


# ------------------------------------------------------------------ never wider than the issuer

DEALERS = ["d-a", "d-b"]
ACCOUNTS = [
    Account("admin", "admin@x.example", "admin", None),
    Account("staff-a", "staff@a.example", "dealer", "d-a"),
    Account("staff-b", "staff@b.example", "dealer", "d-b"),
    Account("cust-a1", "one@a-customer.example", "customer", "d-a"),
    Account("cust-a2", "two@a-customer.example", "customer", "d-a"),
    Account("cust-b1", "one@b-customer.example", "customer", "d-b"),
]
EMAILS = [a.email for a in ACCOUNTS if a.role == "customer"] + [None, "ONE@A-CUSTOMER.example"]
DEVICE_IDS = [f"dev-{n}" for n in range(8)]


@st.composite
def worlds(draw: st.DrawFn) -> dict[str, DeviceOwnership]:
    """Devices with random owners (some devices unknown to the projection)."""
    world = {}
    for device_id in DEVICE_IDS:
        if draw(st.booleans()) or device_id == "dev-0":
            world[device_id] = DeviceOwnership(
                device_id=device_id,
                dealer_id=draw(st.sampled_from(DEALERS)),
                customer_email=draw(st.sampled_from(EMAILS)),
            )
    return world


@st.composite
def issuers(draw: st.DrawFn) -> Principal:
    """A signed-in account, or an API token of one (narrowed at random)."""
    account = draw(st.sampled_from(ACCOUNTS))
    principal = account.principal()
    if draw(st.booleans()):
        devices = draw(st.none() | st.frozensets(st.sampled_from(DEVICE_IDS), min_size=1))
        principal = principal.model_copy(
            update={
                "token_id": "tok-1",
                "access": draw(st.sampled_from(["read", "control"])),
                "device_ids": devices,
            }
        )
    return principal


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(
    world=worlds(),
    issuer=issuers(),
    account=st.sampled_from(ACCOUNTS) | st.none(),
    access=st.sampled_from(["read", "control"]),
    device_ids=st.none() | st.lists(st.sampled_from([*DEVICE_IDS, "dev-x"]), min_size=1),
)
def test_no_token_request_yields_a_token_wider_than_its_issuer(
    world: dict[str, DeviceOwnership],
    issuer: Principal,
    account: Account | None,
    access: str,
    device_ids: list[str] | None,
) -> None:
    try:
        grant = domain.check_token_request(
            issuer,
            account=account,
            access=access,  # type: ignore[arg-type]
            device_ids=device_ids,
            devices=world,
        )
    except ScopeError as refused:
        refusal_status = refused.status
        assert refusal_status == 403
        return
    token = grant.principal()
    assert not issuer.via_api_token, "an API token issued a token"
    assert account is not None
    for device in [*world.values(), DeviceOwnership("dev-x", "d-a", None)]:
        if can_read_device(token, device):
            assert can_read_device(issuer, device), f"token reads {device} the issuer cannot"
            assert can_read_device(account.principal(), device), "token exceeds its account"
        if can_control_device(token, device):
            assert can_control_device(issuer, device), f"token controls {device} beyond issuer"
    assert token.access == "read" or issuer.access == "control"
    assert token.user_id == account.id
    # The token's account is one the issuer manages.
    assert domain.can_see_account(issuer, account)


def test_a_dealer_cannot_issue_for_another_dealers_customer() -> None:
    staff_a = ACCOUNTS[1].principal()
    with pytest.raises(ScopeError):
        domain.check_token_request(
            staff_a, account=ACCOUNTS[5], access="read", device_ids=None, devices={}
        )


def test_a_customer_token_cannot_cover_another_customers_device() -> None:
    staff_a = ACCOUNTS[1].principal()
    other = DeviceOwnership("dev-1", "d-a", "two@a-customer.example")
    with pytest.raises(ScopeError, match="dev-1"):
        domain.check_token_request(
            staff_a,
            account=ACCOUNTS[3],
            access="control",
            device_ids=["dev-1"],
            devices={"dev-1": other},
        )
