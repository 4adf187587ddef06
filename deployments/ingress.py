"""The FastAPI ingress: validates and normalizes requests, routes by `model` and its task, maps every error once."""


import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.metrics import MetricsShipper, ensure_metrics_actor, get_metrics_actor
from embserve.api.calls import SharedCalls
from embserve.api.contracts import EmbedJob, EmbedResult, ModelInfo, RerankJob
from embserve.api.encode import apply_dimensions
from embserve.api.errors import (
    EmbservError,
    error_body,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    Unavailable,
)
from embserve.api.inputs import Limits, check_prompt_name, check_rerank_input, normalize_input
from embserve.api.protocol import (
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelList,
    RerankRequest,
    RerankResponse,
    TEIRank,
    TEIRerankRequest,
)
from embserve.api.responses import embeddings_body, model_card, rerank_body, tei_rerank_body
from embserve.engine.layout import INGRESS_MAX_ONGOING_REQUESTS
from embserve.engine.rerank import activate
from embserve.launch import serve_env
from embserve.metrics.stats import IngressReporter
from embserve.settings import Settings

log = logging.getLogger("ray.serve")

ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          413: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}

app = FastAPI(title="embserve", version="0.1.0",
              description="OpenAI-compatible text embeddings, and cross-encoder reranking, on Ray Serve.")
# The routes that serve a model: Accounting checks their key and body size and counts them.
SERVING_PATHS = frozenset({"/v1/embeddings", "/v1/rerank", "/v2/rerank", "/rerank"})
ROUTE_OF_TASK = {"embed": "POST /v1/embeddings", "rerank": "POST /v1/rerank (or TEI's POST /rerank)"}
REQUEST_ID_HEADER = "x-request-id"


def request_id(headers: Headers) -> str:
    """The request's id: the X-Request-Id it came with, or the one Serve (or HAProxy) gave it on the way in,
    which Serve also sends back in the response's X-Request-ID."""
    return headers.get(REQUEST_ID_HEADER, "")


def error_response(err: EmbservError, rid: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error's answer, with the request's id in the body, and one log line that names both."""
    answered(err.status, err.type, err.message)
    return JSONResponse(err.to_body(rid), status_code=err.status, headers=headers)


def answered(status: int, kind: str, message: str) -> None:
    """A failed request's log line: what the user was told. Serve puts the request's id in the line (its
    request context, which is also the one a replica's lines about the request carry)."""
    log.log(logging.WARNING if status >= 500 else logging.INFO, "answered %d %s: %s", status, kind, message)


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


def embserv_error_response(exc: EmbservError, state: dict[str, Any], rid: str) -> JSONResponse:
    """A known failure's answer; `state` (the request's) learns its kind for the request counts."""
    state["error_kind"] = type(exc).__name__
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return error_response(exc, rid, headers)


def unexpected_response(exc: Exception, state: dict[str, Any], path: str, rid: str) -> JSONResponse:
    """A bug or an infrastructure failure: still OpenAI's shape, and logged with its traceback."""
    log.exception("unexpected error on %s", path)
    state["error_kind"] = type(exc).__name__
    body = error_body(f"internal error ({type(exc).__name__})", "server_error", request_id=rid)
    return JSONResponse(body, status_code=500)


@app.exception_handler(EmbservError)
async def _embserv_error(request: Request, exc: EmbservError) -> JSONResponse:
    return embserv_error_response(exc, request.scope.setdefault("state", {}), request_id(request.headers))


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    request.state.error_kind = "InvalidRequest"
    message, param = _validation_message(exc)
    return error_response(InvalidRequest(message, param=param), request_id(request.headers))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    rid = request_id(request.headers)
    answered(exc.status_code, kind, str(exc.detail))
    return JSONResponse(error_body(str(exc.detail), kind, request_id=rid), status_code=exc.status_code)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_response(exc, request.scope.setdefault("state", {}), request.url.path,
                               request_id(request.headers))


class Accounting:
    """Counts every embedding request with its status and latency, rejected ones included, and checks the
    key and the body size before the route parses anything.

    A plain ASGI middleware: Starlette's `@app.middleware("http")` runs a task group and memory streams per
    request, which was an eighth of the ingress's CPU (measured with py-spy)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in SERVING_PATHS:
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        owner = scope["app"].state
        state = scope.setdefault("state", {})  # the dict behind request.state: the error handlers fill it
        status = 500

        async def send_timed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed = f"{(time.perf_counter() - started) * 1000:.2f}".encode()
                message["headers"] = [*message.get("headers", ()), (b"x-embserve-total-ms", elapsed)]
            await send(message)

        try:
            headers = Headers(scope=scope)
            error = _check_key(headers, owner.keys)  # before the body: no key, no parsing
            body = None
            if error is None:
                body, error = await _read_limited(headers, receive, owner.max_body_bytes)
            ingress = getattr(owner, "ingress", None)
            parsed = fast_request(scope, headers, body) if error is None and ingress is not None else None
            if error is not None:
                state["error_kind"] = type(error).__name__
                await error_response(error, request_id(headers))(scope, receive, send_timed)
            elif parsed is not None:
                await (await ingress.answer_fast(parsed, scope, headers))(scope, receive, send_timed)
            else:
                await self.app(scope, _replay(body, receive), send_timed)
        except Exception as exc:  # answered by Starlette's outermost handler (_unexpected) as a 500
            state.setdefault("error_kind", type(exc).__name__)
            raise
        finally:
            kind = state.get("error_kind") if status >= 400 else None
            owner.reporter.record_request(status, time.perf_counter() - started, kind)


def json_content(headers: Headers) -> bool:
    """Whether the body is declared JSON as clients send it (`application/json`, any parameters)."""
    return headers.get("content-type", "").partition(";")[0].strip().lower() == "application/json"


def fast_request(scope: Scope, headers: Headers, body: bytes | None) -> EmbeddingRequest | None:
    """A POST /v1/embeddings whose JSON body validates: the route's own code answers it without FastAPI's
    request machinery (routing, dependencies, a second parse: a sixth of the ingress's CPU on short texts).
    Anything else, an invalid body included, returns None and takes FastAPI's path, so that every error
    message is the one FastAPI's validation gives."""
    if scope["method"] != "POST" or scope["path"] != "/v1/embeddings" or not body or not json_content(headers):
        return None
    try:
        return EmbeddingRequest.model_validate_json(body)
    except ValidationError:
        return None


def timing_headers(result: EmbedResult) -> dict[str, str]:
    return {
        "x-embserve-queue-ms": f"{result.queue_s * 1000:.2f}",
        "x-embserve-tokenize-ms": f"{result.tokenize_s * 1000:.2f}",
        "x-embserve-inference-ms": f"{result.forward_s * 1000:.2f}",
        "x-embserve-prompt-tokens": str(result.prompt_tokens),
    }


async def _read_limited(headers: Headers, receive: Receive, limit: int) -> tuple[bytes, EmbservError | None]:
    """The whole body, or a 413 as soon as it passes the limit, whether or not Content-Length was sent."""
    too_large = PayloadTooLarge(f"request body larger than {limit} bytes")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return b"", too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left: the route will see an empty body
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return b"", too_large
        if not message.get("more_body", False):
            break
    return b"".join(chunks), None


def _replay(body: bytes | None, receive: Receive) -> Receive:
    """The body already read, as one message; then the real channel (for disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body or b"", "more_body": False}
        return await receive()

    return replay


app.add_middleware(Accounting)


def _check_key(headers: Headers, keys: list[bytes], open_when: bool = False) -> Unauthorized | None:
    if not keys or open_when:
        return None
    scheme, _, token = headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    # Compare with every key, constant time each, so timing says nothing about which one matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    if scheme.lower() != "bearer" or not matched:
        return Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")
    return None


# FastAPI's own scheme, so that /openapi.json lists it and /docs asks for the key and sends it. It only
# reads the header (auto_error=False: never FastAPI's 403); _check_key decides, in constant time.
bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="An API key: `Authorization: Bearer <key>`. Needed only when keys are set.")
Credentials = HTTPAuthorizationCredentials | None


async def require_key(request: Request, _: Credentials = Security(bearer)) -> None:
    error = _check_key(request.headers, request.app.state.keys)
    if error is not None:
        raise error


async def require_key_for_metrics(request: Request, _: Credentials = Security(bearer)) -> None:
    error = _check_key(request.headers, request.app.state.keys, open_when=request.app.state.metrics_public)
    if error is not None:
        raise error


KEYED = [Depends(require_key)]


class ModelRoute:
    """One model's replicas, as the ingress calls them: requests of one turn of the loop share a call
    (embserve.api.calls) where the replicas say they may (`Embedder.shares_calls`), else one call each."""

    def __init__(self, name: str, handle: DeploymentHandle, task: str = "embed") -> None:
        self.name = name
        self.handle = handle
        self.task = task
        self.info: ModelInfo | None = None
        self.shared: SharedCalls | None = None  # set with the model's info, once the replicas said yes

    async def model_info(self) -> ModelInfo:
        if self.info is None:
            info, shares = await asyncio.gather(self.handle.info.remote(), self.handle.shares_calls.remote())
            if shares and self.shared is None:
                self.shared = SharedCalls(self.handle.embed.remote, self.handle.embed_many.remote)
            self.info = info
        return self.info

    def call(self, job: EmbedJob) -> tuple[Awaitable[EmbedResult], Callable[[], Any]]:
        """The call for one request, and how to cancel it."""
        if self.shared is not None:
            return self.shared.call(job)
        response = self.handle.embed.remote(job)
        return response, response.cancel


@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
@serve.ingress(app)
class Ingress:
    async def __init__(self, settings: Settings, *embedders: DeploymentHandle) -> None:
        self.settings = settings
        self.limits = Limits(settings.max_inputs_per_request, settings.max_input_chars)
        self.routes: dict[str, ModelRoute] = {}
        self.models: list[ModelRoute] = []
        for spec, handle in zip(settings.model_specs(), embedders):
            route = ModelRoute(spec.name, handle, spec.task)
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
        app.state.ingress = self  # Accounting's fast path calls `answer_fast`
        # The metrics actor is up before the first request: its start-up does not land on the first traffic.
        await ensure_metrics_actor(self.app_name)
        self.shipper = MetricsShipper(self.app_name, self.reporter)
        self.shipper.start()
        serve_env.flush_warnings_at_once()

    def _route(self, model: str, task: str | None = None) -> ModelRoute:
        """The model's route; a model of another task than the route's `task` is a 400 saying where it is served."""
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(f"the model '{model}' does not exist; GET /v1/models lists the served models",
                                param="model")
        if task is not None and route.task != task:
            raise InvalidRequest(f"the model '{model}' is a {route.task} model, served at {ROUTE_OF_TASK[route.task]}; "
                                 f"this route serves {task} models", param="model", code="wrong_model_task")
        return route

    def _only_reranker(self) -> ModelRoute:
        """TEI's /rerank names no model: the one rerank model served, if there is exactly one."""
        rerankers = [r for r in self.models if r.task == "rerank"]
        if len(rerankers) != 1:
            raise (ModelNotFound("no rerank model is served; GET /v1/models lists the served models", param="model")
                   if not rerankers else
                   InvalidRequest("several rerank models are served (" + ", ".join(r.name for r in rerankers)
                                  + "): name one in 'model'", param="model"))
        return rerankers[0]

    # The key is checked in Accounting, before the body is read; the route only declares the scheme, in
    # its OpenAPI description, and adds no dependency to the hot path.
    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS,
              openapi_extra={"security": [{bearer.scheme_name: []}]})
    async def embeddings(self, body: EmbeddingRequest) -> Response:
        return await self.embed(body)

    async def answer_fast(self, body: EmbeddingRequest, scope: Scope, headers: Headers) -> Response:
        """`embed`'s answer for Accounting's fast path, with the errors answered as FastAPI's handlers do."""
        try:
            return await self.embed(body)
        except EmbservError as exc:
            return embserv_error_response(exc, scope.setdefault("state", {}), request_id(headers))
        except Exception as exc:
            return unexpected_response(exc, scope.setdefault("state", {}), scope["path"], request_id(headers))

    async def embed(self, body: EmbeddingRequest) -> Response:
        """POST /v1/embeddings: a validated request's vectors, from the model's replicas."""
        route = self._route(body.model, "embed")
        normalized = normalize_input(body, self.limits)
        info = await route.model_info()
        if body.dimensions is not None and not 1 <= body.dimensions <= info.dimensions:
            raise InvalidRequest(f"dimensions must be between 1 and {info.dimensions} for this model, "
                                 f"got {body.dimensions}", param="dimensions")
        check_prompt_name(body.prompt_name, info.prompts)
        truncate = self.settings.truncate if body.truncate is None else body.truncate
        job = EmbedJob(texts=normalized.texts, token_ids=normalized.token_ids, truncate=truncate,
                       prompt_name=body.prompt_name)
        result = await self._call(route, job)
        if result.error is not None:
            raise result.error
        vectors = apply_dimensions(result.vectors, body.dimensions)
        content = embeddings_body(vectors, route.name, result.prompt_tokens, body.encoding_format)
        return Response(content=content, media_type="application/json", headers=timing_headers(result))

    @app.post("/v1/rerank", response_model=RerankResponse, responses=ERRORS,
              openapi_extra={"security": [{bearer.scheme_name: []}]})
    @app.post("/v2/rerank", response_model=RerankResponse, responses=ERRORS, include_in_schema=False)
    async def rerank(self, body: RerankRequest) -> Response:
        """Cohere's (v1 and v2), Jina's and vLLM's rerank: results sorted by relevance_score, highest first."""
        route = self._route(body.model, "rerank")
        if body.top_n is not None and body.top_n < 1:
            raise InvalidRequest(f"top_n must be at least 1, got {body.top_n}", param="top_n")
        result, info = await self._rerank(route, body.query, body.documents, body.truncate, "documents")
        scores = activate(result.vectors, info.activation or "identity")
        content = rerank_body(scores, body.documents, route.name, result.prompt_tokens, body.top_n,
                              body.return_documents)
        return Response(content=content, media_type="application/json", headers=timing_headers(result))

    @app.post("/rerank", response_model=list[TEIRank], responses=ERRORS,
              openapi_extra={"security": [{bearer.scheme_name: []}]})
    async def tei_rerank(self, body: TEIRerankRequest) -> Response:
        """text-embeddings-inference's rerank: `raw_scores` gives the logits, without the model's activation."""
        route = self._route(body.model, "rerank") if body.model is not None else self._only_reranker()
        result, info = await self._rerank(route, body.query, body.texts, body.truncate, "texts")
        scores = result.vectors if body.raw_scores else activate(result.vectors, info.activation or "identity")
        content = tei_rerank_body(scores, body.texts, body.return_text)
        return Response(content=content, media_type="application/json", headers=timing_headers(result))

    async def _rerank(self, route: ModelRoute, query: str, documents: list[str], truncate: bool | None,
                      field: str) -> tuple[EmbedResult, ModelInfo]:
        """Each (query, document) pair's logit, from the reranker's replicas, with the model's card."""
        check_rerank_input(query, documents, self.limits, field)
        info = await route.model_info()
        job = RerankJob(query, list(documents), self.settings.truncate if truncate is None else truncate, field)
        result = await self._call(route, job)
        if result.error is not None:
            raise result.error
        return result, info

    async def _call(self, route: ModelRoute, job: EmbedJob | RerankJob) -> Any:
        """One call to the model's replicas; a replica that dies under it gets one retry elsewhere."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        for attempt in (1, 2):
            call, cancel = route.call(job)
            try:
                return await asyncio.wait_for(call, timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                cancel()
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
