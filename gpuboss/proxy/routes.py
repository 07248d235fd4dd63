"""The gated proxy's routes: which consumer a request is for.

- ``/v1/consumers/{name}/{path}`` (any method): consumer ``name`` (for one with several models,
  the ``X-Gpuboss-Model`` header says which);
- the OpenAI-compatible routes (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
  ``/v1/audio/speech``, ``/v1/audio/transcriptions``, ``/v1/images/generations``): the consumer
  that serves the request's ``model`` (``serves`` or ``models`` in the registry), so an OpenAI
  client pointed at the boss works unchanged; ``GET /v1/models`` lists them;
- ``/v1/{kind}/{path}``: a consumer of that kind (``kinds``), one that is resident if any is.

Forwarding takes a holder token when the boss has tokens (it takes memory like a lease).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse

from gpuboss.auth import HolderDep, ReaderDep
from gpuboss.consumers.routes import ManagerDep
from gpuboss.docs import NamePath, allowed_methods, errors_doc
from gpuboss_client import BadRequest, NoConsumer, PayloadTooLarge

from .forward import Upstreams, forward

__all__ = ["OPENAI_ROUTES", "body_cap", "router"]

#: the OpenAI-compatible routes forwarded by the request's ``model``
OPENAI_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/images/generations",
)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
#: the most a proxied body may be when the boss must read it for the model (a transcription's audio)
MAX_MODEL_BODY = 64 * 1024 * 1024
#: the most a proxied body may be when it streams through
MAX_STREAMED_BODY = 16 * 1024**3


async def get_upstreams(request: Request) -> Upstreams:
    """The service's upstream HTTP client (made by the lifespan)."""
    upstreams: Upstreams = request.app.state.upstreams
    return upstreams


UpstreamsDep = Annotated[Upstreams, Depends(get_upstreams)]


#: the proxy takes bodies of any size it streams; the OpenAI routes read theirs (MAX_MODEL_BODY)
router = APIRouter(tags=["proxy"], max_body_size=MAX_STREAMED_BODY)

#: what a forwarded request may answer: gpuboss's own errors, or the consumer's answer as it is
FORWARDED = errors_doc(
    "bad_request", "unauthorized", "forbidden", "no_consumer", "consumer_not_found", "consumer_unreachable",
    "consumer_unhealthy", "acquire_timeout", "queue_full", "backend_unavailable", "insufficient_vram",
)  # fmt: skip
FORWARDED["default"] = {"description": "the consumer's own answer: status, headers and body as it sent them"}


@router.get("/v1/models", summary="The models the consumers serve (OpenAI's list)")
async def list_models(manager: ManagerDep, _: ReaderDep) -> dict[str, Any]:
    """Every model id a consumer answers to, as OpenAI's ``GET /v1/models`` lists models."""
    data = [
        {"id": model, "object": "model", "owned_by": consumer.name}
        for model, (consumer, _unit) in manager.registry.model_ids.items()
    ]
    return {"object": "list", "data": data}


async def _openai(
    request: Request, manager: ManagerDep, upstreams: UpstreamsDep, _: HolderDep
) -> StreamingResponse:
    raw = await request.body()
    if len(raw) > MAX_MODEL_BODY:  # a body sent without a length (with one: stopped before it is read)
        raise PayloadTooLarge(f"the request body is over {MAX_MODEL_BODY} bytes")
    model = _model_of(request.headers.get("content-type", ""), raw)
    found = manager.registry.model_ids.get(model)
    if found is None:
        raise NoConsumer(f"no consumer serves model {model!r}", model=model)
    consumer, unit = found
    return await forward(
        request, manager, upstreams, name=consumer.name, model=unit or None, path=request.url.path, raw=raw
    )


def _model_body(media: str) -> dict[str, Any]:
    """The OpenAPI request body of an OpenAI route: an object with a ``model`` (the rest is the
    engine's business)."""
    schema = {
        "type": "object",
        "required": ["model"],
        "properties": {"model": {"type": "string", "minLength": 1}},
    }
    return {"requestBody": {"required": True, "content": {media: {"schema": schema}}}}


for _path in OPENAI_ROUTES:
    _media = "multipart/form-data" if _path == "/v1/audio/transcriptions" else "application/json"
    router.add_api_route(
        _path, _openai, methods=["POST"], summary=f"OpenAI {_path.removeprefix('/v1/')}, by model",
        operation_id="openai_" + _path.removeprefix("/v1/").replace("/", "_"), responses=FORWARDED,
        openapi_extra=_model_body(_media),
    )  # fmt: skip


def body_cap(path: str) -> int:
    """The largest body a proxy route takes: an OpenAI route reads its body for the model."""
    return MAX_MODEL_BODY if path in OPENAI_ROUTES else MAX_STREAMED_BODY


def _model_of(content_type: str, raw: bytes) -> str:
    """The ``model`` field of a JSON body, or of a multipart form (a transcription's)."""
    if content_type.startswith("multipart/form-data"):
        head = f"Content-Type: {content_type}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "model":
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes):
                    return payload.decode(errors="replace").strip()
        raise BadRequest("the form has no model field")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, str) or not model:
        raise BadRequest("the body has no model")
    return model


async def by_name(
    name: NamePath, path: str, request: Request, manager: ManagerDep, upstreams: UpstreamsDep, _: HolderDep
) -> StreamingResponse:
    """Ensures the consumer, keeps it in use while the request runs, and streams the answer."""
    manager.units_of(name)  # ConsumerNotFound before anything waits
    model = request.headers.get("x-gpuboss-model")
    return await forward(request, manager, upstreams, name=name, model=model, path=path, raw=None)


async def by_kind(
    kind: NamePath, path: str, request: Request, manager: ManagerDep, upstreams: UpstreamsDep, _: HolderDep
) -> StreamingResponse:
    """A consumer serving ``kind`` (e.g. ``tts``): a resident one if any is, else the first."""
    serving = manager.registry.serving(kind)
    if not serving:
        _not_routed(request)
        raise NoConsumer(f"no consumer serves kind {kind!r}", kind=kind)
    resident = [c for c in serving if any(u.resident for u in manager.units_of(c.name))]
    name = (resident or serving)[0].name
    model = request.headers.get("x-gpuboss-model")
    return await forward(request, manager, upstreams, name=name, model=model, path=path, raw=None)


for _method in METHODS:  # one route per method: each its own OpenAPI operation
    router.add_api_route(
        "/v1/consumers/{name}/{path:path}", by_name, methods=[_method],
        summary="Forward to a consumer by name", operation_id=f"forward_by_name_{_method.lower()}",
        responses=FORWARDED,
    )  # fmt: skip
    router.add_api_route(
        "/v1/{kind}/{path:path}", by_kind, methods=[_method], summary="Forward to a consumer of a kind",
        operation_id=f"forward_by_kind_{_method.lower()}", responses=FORWARDED,
    )  # fmt: skip


def _not_routed(request: Request) -> None:
    """Answer a path of the API itself as if this catch-all were not there: 405 with ``Allow``
    where another route takes the path with other methods."""
    if allowed_methods(request, skip=lambda route: getattr(route, "endpoint", None) is by_kind):
        raise StarletteHTTPException(405)
