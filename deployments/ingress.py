"""The FastAPI ingress: validates and normalizes requests, routes by `model`, maps every error once."""


import asyncio
import hmac
import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from embserve.engine import EmbedJob
from embserve.encode import apply_dimensions
from embserve.errors import (EmbservError, InvalidRequest, ModelNotFound, Overloaded, PayloadTooLarge,
                             RequestTimeout, Unauthorized, Unavailable)
from embserve.inputs import Limits, normalize_input
from embserve.model import ModelInfo
from embserve.protocol import EmbeddingRequest, EmbeddingResponse, ErrorResponse, ModelList
from embserve.responses import embeddings_body, model_card
from embserve.settings import Settings
from embserve.stats import IngressReporter
from deployments.metrics import MetricsShipper, get_metrics_actor

log = logging.getLogger("ray.serve")

ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          413: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}

app = FastAPI(title="embserve", version="0.1.0",
              description="OpenAI-compatible text embeddings on Ray Serve.")


def error_response(err: EmbservError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.to_body(), status_code=err.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if loc and loc[0] == "input":
        return ("'input' must be a non-empty string, a non-empty list of strings, a non-empty list of "
                "token ids, or a non-empty list of non-empty token-id lists"), "input"
    where = ".".join(loc) if loc else "body"
    return f"invalid value for '{where}': {first.get('msg', 'invalid request')}", (loc[0] if loc else None)


@app.exception_handler(EmbservError)
async def _embserv_error(request: Request, exc: EmbservError) -> JSONResponse:
    request.state.error_kind = type(exc).__name__
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return error_response(exc, headers)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    request.state.error_kind = "InvalidRequest"
    message, param = _validation_message(exc)
    return error_response(InvalidRequest(message, param=param))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug or an infrastructure failure: still OpenAI's shape, and logged with its traceback."""
    log.exception("unexpected error on %s", request.url.path)
    request.state.error_kind = type(exc).__name__
    body = {"error": {"message": f"internal error ({type(exc).__name__})", "type": "server_error",
                      "param": None, "code": None}}
    return JSONResponse(body, status_code=500)


@app.middleware("http")
async def _account(request: Request, call_next):
    """Every embedding request is counted with its status and latency, rejected ones included."""
    if request.url.path != "/v1/embeddings":
        return await call_next(request)
    started = time.perf_counter()
    try:
        _check_key(request)  # before the body is read: without a key, even malformed JSON is a 401
    except Unauthorized as err:
        request.state.error_kind = "Unauthorized"
        response = error_response(err)
    else:
        response = await _limit_body(request, call_next)
    seconds = time.perf_counter() - started
    response.headers["x-embserve-total-ms"] = f"{seconds * 1000:.2f}"
    kind = getattr(request.state, "error_kind", None) or ("PayloadTooLarge" if response.status_code == 413 else None)
    request.app.state.reporter.record_request(response.status_code, seconds,
                                              kind if response.status_code >= 400 else None)
    return response


async def _limit_body(request: Request, call_next):
    """413 before the body is parsed, whether or not the client sent Content-Length."""
    limit = request.app.state.max_body_bytes
    declared = request.headers.get("content-length")
    too_large = PayloadTooLarge(f"request body larger than {limit} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return error_response(too_large)
    if request.method in ("POST", "PUT"):
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return error_response(too_large)
        request._body = b"".join(chunks)  # starlette re-reads the cached body for the route
    return await call_next(request)


def _check_key(request: Request, open_when: bool = False) -> None:
    keys: list[bytes] = request.app.state.keys
    if not keys or open_when:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    # Compare with every key, constant time each, so timing says nothing about which one matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    if scheme.lower() != "bearer" or not matched:
        raise Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")


async def require_key(request: Request) -> None:
    _check_key(request)


async def require_key_for_metrics(request: Request) -> None:
    _check_key(request, open_when=request.app.state.metrics_public)


KEYED = [Depends(require_key)]


class ModelRoute:
    def __init__(self, name: str, handle: DeploymentHandle) -> None:
        self.name = name
        self.handle = handle
        self.info: ModelInfo | None = None

    async def model_info(self) -> ModelInfo:
        if self.info is None:
            self.info = await self.handle.info.remote()
        return self.info


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, settings: Settings, *embedders: DeploymentHandle) -> None:
        self.settings = settings
        self.limits = Limits(settings.max_inputs_per_request, settings.max_input_chars)
        self.routes: dict[str, ModelRoute] = {}
        self.models: list[ModelRoute] = []
        for spec, handle in zip(settings.model_specs(), embedders):
            route = ModelRoute(spec.name, handle)
            self.models.append(route)
            for name in (spec.name, *spec.aliases):
                self.routes[name] = route
        self.created = int(time.time())
        app.state.keys = [k.encode() for k in settings.api_keys()]
        app.state.metrics_public = settings.metrics_public
        app.state.max_body_bytes = settings.max_body_bytes
        self.app_name = serve.get_replica_context().app_name
        self.reporter = IngressReporter()
        app.state.reporter = self.reporter
        self.shipper = MetricsShipper(self.app_name, self.reporter)

    def _route(self, model: str) -> ModelRoute:
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(f"the model '{model}' does not exist; GET /v1/models lists the served models",
                                param="model")
        return route

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)  # key: in _account
    async def embeddings(self, body: EmbeddingRequest) -> Response:
        self.shipper.start()
        route = self._route(body.model)
        normalized = normalize_input(body, self.limits)
        info = await route.model_info()
        if body.dimensions is not None and not 1 <= body.dimensions <= info.dimensions:
            raise InvalidRequest(f"dimensions must be between 1 and {info.dimensions} for this model, "
                                 f"got {body.dimensions}", param="dimensions")
        truncate = self.settings.truncate if body.truncate is None else body.truncate
        job = EmbedJob(texts=normalized.texts, token_ids=normalized.token_ids, truncate=truncate)
        result = await self._call(route, job)
        if result.error is not None:
            raise result.error
        vectors = apply_dimensions(result.vectors, body.dimensions)
        content = embeddings_body(vectors, route.name, result.prompt_tokens, body.encoding_format)
        headers = {
            "x-embserve-queue-ms": f"{result.queue_s * 1000:.2f}",
            "x-embserve-tokenize-ms": f"{result.tokenize_s * 1000:.2f}",
            "x-embserve-inference-ms": f"{result.forward_s * 1000:.2f}",
            "x-embserve-prompt-tokens": str(result.prompt_tokens),
        }
        return Response(content=content, media_type="application/json", headers=headers)

    async def _call(self, route: ModelRoute, job: EmbedJob) -> Any:
        """One call to the model's replicas; a replica that dies under it gets one retry elsewhere."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        for attempt in (1, 2):
            call = route.handle.embed.remote(job)
            try:
                return await asyncio.wait_for(call, timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                call.cancel()
                raise RequestTimeout(f"no answer within {self.settings.request_timeout_s} s") from None
            except BackPressureError:
                raise Overloaded("the embedding replicas' queues are full; retry shortly") from None
            except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                log.warning("replica of %s failed under a request (attempt %d): %s", route.name, attempt,
                            type(exc).__name__)
        raise Unavailable(f"the replicas of '{route.name}' are restarting; retry shortly")

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=KEYED)
    async def list_models(self) -> dict[str, Any]:
        infos = await asyncio.gather(*(r.model_info() for r in self.models))
        return {"object": "list", "data": [model_card(i, self.created) for i in infos]}

    @app.get("/v1/models/{model_id}", responses=ERRORS, dependencies=KEYED)
    async def get_model(self, model_id: str) -> dict[str, Any]:
        return model_card(await self._route(model_id).model_info(), self.created)

    @app.get("/health", responses=ERRORS)
    async def health(self) -> dict[str, Any]:
        """200 only when every model answers a real forward."""
        try:
            await asyncio.wait_for(asyncio.gather(*(r.handle.check_health.remote() for r in self.models)),
                                   timeout=self.settings.health_timeout_s)
        except Exception as exc:
            raise Unavailable(f"a model is not answering: {type(exc).__name__}") from None
        return {"status": "ok", "models": [r.name for r in self.models]}

    @app.get("/v1/performance", responses=ERRORS, dependencies=KEYED)
    async def performance(self) -> dict[str, Any]:
        return await self._metrics_call("snapshot")

    @app.post("/v1/performance/reset", responses=ERRORS, dependencies=KEYED)
    async def performance_reset(self) -> dict[str, Any]:
        await self._metrics_call("reset")
        return {"status": "reset"}

    @app.get("/metrics", responses=ERRORS, dependencies=[Depends(require_key_for_metrics)])
    async def metrics(self) -> Response:
        text = await self._metrics_call("prometheus")
        return Response(content=text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _metrics_call(self, method: str) -> Any:
        await self.shipper.flush()
        try:
            return await asyncio.wait_for(getattr(get_metrics_actor(self.app_name), method).remote(), 10)
        except Exception as exc:
            raise Unavailable(f"metrics are unavailable right now ({type(exc).__name__}); serving is not "
                              "affected") from None
