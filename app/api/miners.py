"""The miner registry: admins register and retire miners; each miner manages and reads itself.

A miner also registers here the Ed25519 keys that sign its completions' receipts
(app/receipts.py); the keys are read from the miner's own events, never from a view.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.datastructures import State
from litestar.openapi.spec import Example
from litestar.params import Body, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from app.api import openapi
from app.api.auth import allow
from app.api.errors import LedgerResponse, strict_validation_error
from app.api.jobs import decode_cursor, encode_cursor, services_of
from app.api.schemas import (
    MinerCapabilities,
    MinerListResponse,
    MinerResponse,
    MinerStatsResponse,
    ReceiptKeyListResponse,
    ReceiptKeyResponse,
    RegisterMinerRequest,
    RegisterMinerResponse,
    RegisterReceiptKeyRequest,
)
from app.keys import MAX_NAME_LENGTH, Principal, Role
from app.receipts import InvalidReceipt, decode_public_key, encode_public_key, key_id_of
from app.services import Services
from domain.errors import InvalidJobRequest, MinerNotFound
from domain.gpus import normalize_gpu_type
from domain.miners import Capabilities, Miner, miner_aggregate_id_of
from domain.pricing import MONEY_QUANTUM, to_money
from projections.miners import MinerStats, MinerView, view_of_written

MAX_PAGE = 100
MAX_PRICE_PER_HOUR = Decimal(1_000_000)
_STRICT_REGISTER = msgspec.json.Decoder(RegisterMinerRequest)
_STRICT_CAPABILITIES = msgspec.json.Decoder(MinerCapabilities)
_STRICT_RECEIPT_KEY = msgspec.json.Decoder(RegisterReceiptKeyRequest)
T = TypeVar("T")


def invalid(field: str, message: str) -> InvalidJobRequest:
    """A 422 naming the field, shaped like the schema's own validation errors."""
    return InvalidJobRequest(
        f"invalid request: {field}: {message}",
        details={"errors": [{"field": field, "message": message}]},
    )


def decode_strictly(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode a body with exact types ("2" is not 2), as the ledger records it."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as error:
        raise strict_validation_error(error) from None


def checked_text(value: str, field: str) -> str:
    """Text a person reads back (names, locations): not blank, no control characters."""
    if not value.strip():
        raise invalid(field, "must not be blank")
    if not value.isprintable():
        raise invalid(field, "must not contain control characters")
    return value


def to_capabilities(data: MinerCapabilities) -> Capabilities:
    """Check what the schema cannot (price, GPU name, text) and build the domain's value."""
    price = data.price_per_hour
    if not price.is_finite() or not Decimal(0) <= price <= MAX_PRICE_PER_HOUR:
        raise invalid("price_per_hour", f"must be a decimal number from 0 to {MAX_PRICE_PER_HOUR}")
    if price.quantize(MONEY_QUANTUM) != price:
        raise invalid("price_per_hour", "must have at most 6 decimal places")
    gpu_type = normalize_gpu_type(data.gpu_type)
    if not gpu_type:
        raise invalid("gpu_type", "must name a GPU model, e.g. a100")
    return Capabilities(
        gpu_type=gpu_type,
        gpu_count=data.gpu_count,
        vram_gb=data.vram_gb,
        location=checked_text(data.location, "location"),
        price_per_hour=to_money(price) if price else Decimal(0),  # no "-0"
        max_concurrent=data.max_concurrent,
    )


def miner_view(view: MinerView) -> MinerResponse:
    """The public shape of a miner."""
    return MinerResponse(
        miner_id=view.miner_id,
        name=view.name,
        status=view.status,
        gpu_type=view.gpu_type,
        gpu_count=view.gpu_count,
        vram_gb=view.vram_gb,
        location=view.location,
        price_per_hour=view.price_per_hour,
        max_concurrent=view.max_concurrent,
        inflight=view.inflight,
        reported_inflight=view.reported_inflight,
        gpus=view.gpus,
        last_heartbeat_at=view.last_heartbeat_at,
        registered_at=view.registered_at,
        updated_at=view.updated_at,
    )


def stats_view(stats: MinerStats) -> MinerStatsResponse:
    """The public shape of a miner's job record."""
    return MinerStatsResponse(
        miner_id=stats.miner_id,
        total_jobs=stats.finished_jobs,
        completed_jobs=stats.completed_jobs,
        failed_jobs=stats.failed_jobs,
        timed_out_jobs=stats.timed_out_jobs,
        success_rate=stats.success_rate,
        average_completion_time=stats.average_completion_time,
        earnings=to_money(stats.earnings),
        earnings_per_gpu_hour=stats.earnings_per_gpu_hour,
        gpu_seconds=stats.gpu_seconds,
    )


def receipt_key_view(miner: Miner, key_id: str) -> ReceiptKeyResponse:
    """The public shape of one of a miner's receipt keys."""
    return ReceiptKeyResponse(
        key_id=key_id,
        public_key=miner.registered_keys[key_id],
        status="revoked" if key_id in miner.revoked_keys else "active",
    )


def require_access(principal: Principal, miner_id: str) -> None:
    """Admins and auditors reach every miner; a miner key only its own, others are not found."""
    miner_aggregate_id_of(miner_id)  # a malformed id is not found without asking the database
    if principal.role is Role.MINER and principal.subject != miner_id:
        raise MinerNotFound(f"miner {miner_id!r} not found", details={"miner_id": miner_id})


async def load_view(services: Services, miner_id: str) -> MinerView:
    """The miner as the views show it; not there is not found."""
    view = await services.miners.get(miner_id, services.settings.lease_seconds)
    if view is None:
        raise MinerNotFound(f"miner {miner_id!r} not found", details={"miner_id": miner_id})
    return view


async def view_after_write(services: Services, miner: Miner, position: int) -> MinerView:
    """The miner's view once the views include this write (or, if they lag, with it applied)."""
    await services.views.wait_for(position, services.settings.view_wait_seconds)
    seen = await services.miners.get(miner.miner_id, services.settings.lease_seconds)
    return view_of_written(miner, seen)


async def change(
    services: Services, miner_id: str, command: Callable[[Miner], None]
) -> tuple[Miner, int]:
    """Run a command on the miner's latest version; returns the changed miner and log position."""
    changed: list[Miner] = []

    def run(miner: Miner) -> None:
        command(miner)
        changed.append(miner)  # the last attempt is the one that was saved

    position = await services.run(services.ledger.change_miner, miner_id, run)
    return changed[-1], position


MINER_READERS = (Role.ADMIN, Role.AUDITOR, Role.MINER)
MINER_WRITERS = (Role.ADMIN, Role.MINER)


class MinerController(Controller):
    """/v1/miners: admins manage all miners, auditors read them, a miner key acts on itself."""

    path = "/v1/miners"
    tags = ["miners"]
    response_class = LedgerResponse

    @post(
        "/",
        guards=[allow(Role.ADMIN)],
        status_code=HTTP_201_CREATED,
        summary="Register a miner",
        responses={
            201: openapi.response(
                RegisterMinerResponse, "the miner and its API key", openapi.MINER_REGISTERED
            ),
            **openapi.errors(401, 403, 413, 422, 429),
        },
    )
    async def register(
        self,
        request: Request[Principal, Any, Any],
        state: State,
        data: Annotated[
            RegisterMinerRequest,
            Body(examples=[Example(summary="an 8-GPU machine", value=openapi.REGISTER_MINER)]),
        ],
    ) -> Response[RegisterMinerResponse]:
        """Register a miner and issue its key (shown this once); offline until its first beat."""
        services = services_of(state)
        data = decode_strictly(_STRICT_REGISTER, await request.body())
        name = checked_text(data.name, "name")
        capabilities = to_capabilities(data)
        miner, position = await services.run(services.ledger.register_miner, name, capabilities)
        principal, key = await services.keys.create(
            Role.MINER, f"miner {name}"[:MAX_NAME_LENGTH], subject=miner.miner_id
        )
        view = await view_after_write(services, miner, position)
        body = RegisterMinerResponse(
            miner_id=miner.miner_id,
            api_key=key,
            key_id=principal.key_id,
            status=view.status,
            name=view.name,
            gpu_type=view.gpu_type,
            gpu_count=view.gpu_count,
            vram_gb=view.vram_gb,
            location=view.location,
            price_per_hour=view.price_per_hour,
            max_concurrent=view.max_concurrent,
        )
        return LedgerResponse(body, status_code=HTTP_201_CREATED)

    @get(
        "/",
        guards=[allow(Role.ADMIN, Role.AUDITOR)],
        summary="List miners",
        responses={
            200: openapi.response(MinerListResponse, "a page of miners", openapi.MINERS_LISTED),
            **openapi.errors(401, 403, 422, 429),
        },
    )
    async def list_miners(
        self,
        state: State,
        limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 20,
        cursor: Annotated[str | None, Parameter(max_length=200)] = None,
        include_deregistered: bool = False,
    ) -> MinerListResponse:
        """Miners, newest registration first; deregistered ones only when asked for."""
        services = services_of(state)
        page = await services.miners.page(
            limit=limit,
            cursor_seq=decode_cursor(cursor),
            lease_seconds=services.settings.lease_seconds,
            include_deregistered=include_deregistered,
        )
        return MinerListResponse(
            miners=[miner_view(view) for view in page.rows],
            total=page.total,
            has_more=page.has_more,
            next_cursor=encode_cursor(page.rows[-1].seq) if page.has_more else None,
        )

    @get(
        "/me",
        guards=[allow(Role.MINER)],
        summary="The calling miner",
        responses={
            200: openapi.response(MinerResponse, "the miner the key belongs to", openapi.MINER),
            **openapi.errors(401, 403, 404, 429),
        },
    )
    async def me(self, request: Request[Principal, Any, Any], state: State) -> MinerResponse:
        """The miner this key belongs to: how an agent started with only its key learns its id."""
        miner_id = request.user.subject
        require_access(request.user, miner_id)
        return miner_view(await load_view(services_of(state), miner_id))

    @get(
        "/{miner_id:str}",
        guards=[allow(*MINER_READERS)],
        summary="A miner",
        responses={
            200: openapi.response(MinerResponse, "the miner", openapi.MINER),
            **openapi.errors(401, 403, 404, 429),
        },
    )
    async def miner(
        self, request: Request[Principal, Any, Any], state: State, miner_id: str
    ) -> MinerResponse:
        """What the miner offers, whether it is online, and the jobs it holds."""
        require_access(request.user, miner_id)
        return miner_view(await load_view(services_of(state), miner_id))

    @put(
        "/{miner_id:str}",
        guards=[allow(*MINER_WRITERS)],
        summary="Replace a miner's capabilities",
        responses={
            200: openapi.response(MinerResponse, "the miner with its new capabilities"),
            **openapi.errors(401, 403, 404, 409, 413, 422, 429),
        },
    )
    async def update(
        self,
        request: Request[Principal, Any, Any],
        state: State,
        miner_id: str,
        data: MinerCapabilities,
    ) -> MinerResponse:
        """Replace what the miner offers; omitted optional fields take their defaults."""
        require_access(request.user, miner_id)
        services = services_of(state)
        capabilities = to_capabilities(decode_strictly(_STRICT_CAPABILITIES, await request.body()))
        miner, position = await change(
            services, miner_id, lambda miner: miner.update_capabilities(capabilities)
        )
        return miner_view(await view_after_write(services, miner, position))

    @delete(
        "/{miner_id:str}",
        guards=[allow(*MINER_WRITERS)],
        status_code=HTTP_200_OK,
        summary="Deregister a miner",
        responses={
            200: openapi.response(MinerResponse, "the miner, now deregistered"),
            **openapi.errors(401, 403, 404, 409, 429),
        },
    )
    async def deregister(
        self, request: Request[Principal, Any, Any], state: State, miner_id: str
    ) -> MinerResponse:
        """Retire a miner for good: it gets no new work and the scheduler requeues what it holds.

        Its API keys stay valid, so its agent can still read that it was deregistered;
        revoke them through /v1/admin/keys.
        """
        require_access(request.user, miner_id)
        services = services_of(state)
        reason = f"deregistered by {request.user.name}"
        miner, position = await change(services, miner_id, lambda miner: miner.deregister(reason))
        return miner_view(await view_after_write(services, miner, position))

    @get(
        "/{miner_id:str}/stats",
        guards=[allow(*MINER_READERS)],
        summary="A miner's job record",
        responses={
            200: openapi.response(MinerStatsResponse, "the miner's stats", openapi.MINER_STATS),
            **openapi.errors(401, 403, 404, 429),
        },
    )
    async def stats(
        self, request: Request[Principal, Any, Any], state: State, miner_id: str
    ) -> MinerStatsResponse:
        """Jobs finished on the miner by outcome, success rate, completion time and earnings."""
        require_access(request.user, miner_id)
        services = services_of(state)
        await load_view(services, miner_id)
        found = await services.miners.stats(miner_id)
        return stats_view(found or MinerStats(miner_id=miner_id))

    @post(
        "/{miner_id:str}/keys",
        guards=[allow(*MINER_WRITERS)],
        status_code=HTTP_201_CREATED,
        summary="Register a receipt key",
        responses={
            201: openapi.response(
                ReceiptKeyResponse, "the key, now trusted for receipts", openapi.RECEIPT_KEY
            ),
            200: openapi.response(
                ReceiptKeyResponse, "the key was already active; nothing changed"
            ),
            **openapi.errors(401, 403, 404, 409, 413, 422, 429),
        },
    )
    async def register_key(
        self,
        request: Request[Principal, Any, Any],
        state: State,
        miner_id: str,
        data: Annotated[
            RegisterReceiptKeyRequest,
            Body(examples=[Example(summary="an Ed25519 key", value=openapi.REGISTER_RECEIPT_KEY)]),
        ],
    ) -> Response[ReceiptKeyResponse]:
        """Trust an Ed25519 public key for the miner's receipts; from then on they are required.

        Registering an active key again changes nothing (200); a revoked key never comes
        back (409): make a new one.
        """
        require_access(request.user, miner_id)
        services = services_of(state)
        body = decode_strictly(_STRICT_RECEIPT_KEY, await request.body())
        try:
            raw = decode_public_key(body.public_key)
        except InvalidReceipt as why:
            raise invalid("public_key", str(why)) from None
        key_id, public_key = key_id_of(raw), encode_public_key(raw)
        created: list[bool] = []

        def register(miner: Miner) -> None:
            created.append(key_id not in miner.keys)  # the last attempt is the one saved
            miner.register_key(key_id, public_key)

        miner, _ = await change(services, miner_id, register)
        status = HTTP_201_CREATED if created[-1] else HTTP_200_OK
        return LedgerResponse(receipt_key_view(miner, key_id), status_code=status)

    @get(
        "/{miner_id:str}/keys",
        guards=[allow(*MINER_READERS)],
        summary="A miner's receipt keys",
        responses={
            200: openapi.response(
                ReceiptKeyListResponse, "every key, oldest first", openapi.RECEIPT_KEYS
            ),
            **openapi.errors(401, 403, 404, 429),
        },
    )
    async def keys(
        self, request: Request[Principal, Any, Any], state: State, miner_id: str
    ) -> ReceiptKeyListResponse:
        """Every receipt key the miner registered, active or revoked, from its own events."""
        require_access(request.user, miner_id)
        services = services_of(state)
        miner = await services.run(services.ledger.miner, miner_id)
        return ReceiptKeyListResponse(
            keys=[receipt_key_view(miner, key_id) for key_id in miner.registered_keys]
        )

    @delete(
        "/{miner_id:str}/keys/{key_id:str}",
        guards=[allow(*MINER_WRITERS)],
        status_code=HTTP_200_OK,
        summary="Revoke a receipt key",
        responses={
            200: openapi.response(
                ReceiptKeyResponse, "the key, now revoked", openapi.RECEIPT_KEY_REVOKED
            ),
            **openapi.errors(401, 403, 404, 429),
        },
    )
    async def revoke_key(
        self, request: Request[Principal, Any, Any], state: State, miner_id: str, key_id: str
    ) -> ReceiptKeyResponse:
        """Refuse the key's receipts from now on, for good; revoking it again changes nothing.

        Completions already recorded keep their receipts: they were valid when accepted.
        """
        require_access(request.user, miner_id)
        services = services_of(state)
        reason = f"revoked by {request.user.name}"
        miner, _ = await change(services, miner_id, lambda miner: miner.revoke_key(key_id, reason))
        return receipt_key_view(miner, key_id)
