"""Admin routes: API keys."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, post
from litestar.datastructures import State
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from app.api import openapi
from app.api.auth import allow
from app.api.errors import LedgerResponse
from app.api.jobs import services_of
from app.api.schemas import CreateKeyRequest, CreateKeyResponse
from app.keys import KEY_ID_PATTERN, Role
from domain.errors import InvalidJobRequest, NotFound


class KeyNotFound(NotFound):
    """No such live key."""


class AdminController(Controller):
    """/v1/admin: only admin keys."""

    path = "/v1/admin"
    tags = ["admin"]
    guards = [allow(Role.ADMIN)]
    response_class = LedgerResponse

    @post(
        "/keys",
        status_code=HTTP_201_CREATED,
        summary="Create an API key",
        responses=openapi.errors(401, 403, 422, 429),
    )
    async def create_key(self, state: State, data: CreateKeyRequest) -> CreateKeyResponse:
        """Create a key with a role; the plaintext key is returned this once."""
        try:
            principal, key = await services_of(state).keys.create(Role(data.role), data.name)
        except ValueError as error:
            raise InvalidJobRequest(str(error), details={"field": "name"}) from None
        return CreateKeyResponse(
            key_id=principal.key_id, key=key, role=principal.role.value, name=principal.name
        )

    @delete(
        "/keys/{key_id:str}",
        status_code=HTTP_204_NO_CONTENT,
        summary="Revoke an API key",
        responses=openapi.errors(401, 403, 404, 429),
    )
    async def revoke_key(self, state: State, key_id: Annotated[str, "key id"]) -> None:
        """Revoke a key at once; requests with it answer 401 from then on."""
        # An id we never issue is not found without asking the database.
        if not KEY_ID_PATTERN.fullmatch(key_id) or not await services_of(state).keys.revoke(key_id):
            raise KeyNotFound(f"key {key_id!r} not found or already revoked")
