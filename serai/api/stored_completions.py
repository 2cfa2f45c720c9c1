"""OpenAI's stored chat completions: retrieve, list, delete, and the messages of one.

Only completions of the calling key's organization, made with a model the key may use, are
visible: another organization's, or another model's for a key limited to some, answer 404
exactly like ones that do not exist (or are past their retention), and are left out of lists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Query, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from serai.api.deps import KeyDep, Services, ServicesDep
from serai.api.errors import json_response
from serai.errors import ContentKeyMissing, NotFound
from serai.governance import stored
from serai.governance.accounts import KeyInfo
from serai.governance.crypto import ContentKeys

router = APIRouter(tags=["OpenAI"])

T = TypeVar("T")
Limit = Annotated[int, Query(ge=1, le=100)]
Order = Annotated[Literal["asc", "desc"], Query()]


def _readable_models(key: KeyInfo, services: Services) -> list[str] | None:
    """The model names whose stored completions `key` reaches (None: any): its allowed models
    by every name they are served under, since a completion is stored under the name it was
    asked for, which may be an alias."""
    if key.allowed_models is None:
        return None
    router = services.gateway.router
    served = {name for deployment in router.all() for name in deployment.names}
    return sorted({*key.allowed_models,
                   *(name for name in served if key.may_use(name, canonical=router.canonical))})


async def _read(services: ServicesDep, key: KeyInfo,
                work: Callable[[Session, ContentKeys, int, list[str] | None], T]) -> T:
    """Run `work` with the key's organization and the models whose completions it reaches."""
    if key.org_id is None:  # an operator key has no organization, so no completions
        raise NotFound("No stored chat completions: this key belongs to no organization.")
    keys = services.content_keys
    org_id = key.org_id
    models = _readable_models(key, services)

    def run() -> T:
        if keys is None:
            raise ContentKeyMissing("This server has no key to open stored completions with. "
                                    "Its operator must set SERAI_SECRET_KEY or "
                                    "SERAI_SECRET_KEY_FILE.")
        with services.database.session() as session:
            return work(session, keys, org_id, models)

    return await asyncio.to_thread(run)


def _object(completion: stored.Completion) -> dict[str, Any]:
    return {**completion.response, "metadata": completion.metadata}


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


@router.get("/v1/chat/completions")
async def list_chat_completions(
    request: Request, key: KeyDep, services: ServicesDep, limit: Limit = 20,
    after: str | None = None, model: str | None = None, order: Order = "asc",
) -> Response:
    """Lists the organization's stored chat completions; `metadata[k]=v` filters on metadata."""
    metadata = {name[len("metadata["):-1]: value for name, value in request.query_params.items()
                if name.startswith("metadata[") and name.endswith("]")}
    found, has_more = await _read(services, key, lambda s, keys, org, models: stored.page(
        session=s, keys=keys, org_id=org, models=models, limit=limit, after=after, model=model,
        metadata=metadata, order=order))
    return json_response(200, _page([_object(c) for c in found], has_more))


@router.get("/v1/chat/completions/{completion_id}")
async def get_chat_completion(completion_id: str, key: KeyDep,
                              services: ServicesDep) -> Response:
    """A stored chat completion, as it was answered, with its metadata."""
    found = await _read(services, key, lambda s, keys, org, models: stored.find(
        session=s, keys=keys, org_id=org, models=models, completion_id=completion_id))
    return json_response(200, _object(found))


@router.get("/v1/chat/completions/{completion_id}/messages")
async def get_chat_completion_messages(completion_id: str, key: KeyDep, services: ServicesDep,
                                       limit: Limit = 20, after: str | None = None,
                                       order: Order = "asc") -> Response:
    """The request messages of a stored chat completion."""
    found = await _read(services, key, lambda s, keys, org, models: stored.find(
        session=s, keys=keys, org_id=org, models=models, completion_id=completion_id))
    messages = [{"id": f"{completion_id}-{i}", **m} for i, m in enumerate(found.messages)]
    if order == "desc":
        messages.reverse()
    if after is not None:
        ids = [m["id"] for m in messages]
        if after not in ids:
            raise NotFound(f"No message {after!r} in this completion.", param="after")
        messages = messages[ids.index(after) + 1:]
    return json_response(200, _page(messages[:limit], len(messages) > limit))


@router.delete("/v1/chat/completions/{completion_id}")
async def delete_chat_completion(completion_id: str, key: KeyDep,
                                 services: ServicesDep) -> Response:
    """Deletes a stored chat completion now, before its retention ends."""
    if key.org_id is None:
        raise NotFound(f"No stored chat completion {completion_id!r}.")
    org_id, models = key.org_id, _readable_models(key, services)

    def remove() -> None:
        with services.database.session() as session:
            stored.remove(session=session, org_id=org_id, models=models,
                          completion_id=completion_id)

    await asyncio.to_thread(remove)
    return json_response(200, {"id": completion_id, "object": "chat.completion.deleted",
                               "deleted": True})
