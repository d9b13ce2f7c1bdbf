"""HTTP routes of the tokens service (thin: validation, then one use case each)."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from common.auth import CurrentPrincipal, Principal
from common.http import problem_response
from tokens import handlers, token_handlers
from tokens.domain import MAX_TOKEN_DAYS
from tokens.handlers import Context, ThrottledError

router = APIRouter(prefix="/api/v1")

Email = Annotated[str, Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
Limit = Annotated[int, Query(ge=1, le=500)]
Cursor = Annotated[str | None, Query(max_length=512)]
DeviceId = Annotated[str, Field(min_length=1, max_length=64)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(_Body):
    """`POST /auth/login`."""

    email: Annotated[str, Field(min_length=1, max_length=320)]
    password: Annotated[str, Field(min_length=1, max_length=1024)]


class UserBody(_Body):
    """`POST /users`."""

    email: Email
    password: Annotated[str, Field(min_length=8, max_length=1024)]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    role: Literal["admin", "dealer", "customer"]
    dealer_id: Annotated[str | None, Field(max_length=64)] = None


class DealerBody(_Body):
    """`POST /dealers`."""

    name: Annotated[str, Field(min_length=1, max_length=200)]


class TokenBody(_Body):
    """`POST /tokens`."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    user_id: Annotated[str, Field(min_length=1, max_length=64)]
    access: Literal["read", "control"]
    device_ids: Annotated[list[DeviceId] | None, Field(min_length=1, max_length=1000)] = None
    expires_in_days: Annotated[int, Field(ge=1, le=MAX_TOKEN_DAYS)]


def _ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def _client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


@router.post("/auth/login", tags=["auth"])
async def login(body: LoginBody, request: Request) -> Any:
    """Exchange email and password for a short-lived session token."""
    ctx = _ctx(request)
    try:
        token = await handlers.login(
            ctx, email=body.email, password=body.password, client_ip=_client_ip(request)
        )
    except ThrottledError as exc:
        response = problem_response(429, "Too many requests", str(exc))
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response
    return {"access_token": token, "token_type": "bearer", "expires_in": ctx.settings.session_ttl_s}


@router.get("/me", tags=["auth"])
async def me(caller: CurrentPrincipal) -> dict[str, Any]:
    """The caller as the platform sees it."""
    return _me(caller)


def _me(caller: Principal) -> dict[str, Any]:
    return {
        "user_id": caller.user_id,
        "email": caller.email,
        "role": caller.role,
        "dealer_id": caller.dealer_id,
        "customer_id": caller.customer_id,
        "access": caller.access,
        "device_ids": sorted(caller.device_ids) if caller.device_ids is not None else None,
        "token_id": caller.token_id,
    }


@router.get("/users", tags=["accounts"])
async def list_users(
    request: Request,
    caller: CurrentPrincipal,
    q: Annotated[str | None, Query(max_length=320)] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """Accounts in the caller's scope."""
    return await handlers.list_users(_ctx(request), caller, q=q, cursor=cursor, limit=limit)


@router.post("/users", status_code=201, tags=["accounts"])
async def create_user(body: UserBody, request: Request, caller: CurrentPrincipal) -> Any:
    """Create an account in the caller's scope."""
    return await handlers.create_user(
        _ctx(request), caller, email=body.email, password=body.password, name=body.name,
        role=body.role, dealer_id=body.dealer_id,
    )  # fmt: skip


@router.get("/dealers", tags=["accounts"])
async def list_dealers(
    request: Request, caller: CurrentPrincipal, limit: Limit = 50, cursor: Cursor = None
) -> dict[str, Any]:
    """Every dealer (admins only)."""
    return await handlers.list_dealers(_ctx(request), caller, cursor=cursor, limit=limit)


@router.post("/dealers", status_code=201, tags=["accounts"])
async def create_dealer(body: DealerBody, request: Request, caller: CurrentPrincipal) -> Any:
    """Create a dealer (admins only)."""
    return await handlers.create_dealer(_ctx(request), caller, name=body.name)


@router.post("/tokens", status_code=201, tags=["tokens"])
async def create_token(body: TokenBody, request: Request, caller: CurrentPrincipal) -> Any:
    """Issue an API token; the secret is shown in this answer only."""
    return await token_handlers.create_token(
        _ctx(request), caller, name=body.name, user_id=body.user_id, access=body.access,
        device_ids=body.device_ids, expires_in_days=body.expires_in_days,
    )  # fmt: skip


@router.get("/tokens", tags=["tokens"])
async def list_tokens(
    request: Request, caller: CurrentPrincipal, limit: Limit = 50, cursor: Cursor = None
) -> dict[str, Any]:
    """Tokens in the caller's scope, without secrets."""
    return await token_handlers.list_tokens(_ctx(request), caller, cursor=cursor, limit=limit)


@router.delete("/tokens/{token_id}", status_code=204, tags=["tokens"])
async def revoke_token(token_id: str, request: Request, caller: CurrentPrincipal) -> Response:
    """Revoke a token; it stops working within a second."""
    await token_handlers.revoke_token(_ctx(request), caller, token_id=token_id)
    return Response(status_code=204)


def jwks_router() -> APIRouter:
    """The public keys, at the root (services) and under /api/v1 (through the gateway)."""
    router = APIRouter(tags=["keys"])

    async def jwks(request: Request) -> JSONResponse:
        ctx = _ctx(request)
        return JSONResponse(ctx.keys.jwks(), headers={"Cache-Control": "public, max-age=30"})

    router.add_api_route("/.well-known/jwks.json", jwks, methods=["GET"])
    router.add_api_route("/api/v1/.well-known/jwks.json", jwks, methods=["GET"])
    return router
