"""The floor app of `python -m bench serve-floor` (bench/studies/serve_floor.py): the design's shape with no model, a
FastAPI ingress deployment calling a replica deployment that hands back a fixed vector per text. Serve imports it
(`bench.studies.serve_floor_app:build_app`); FastAPI reads the route's annotations from this module's globals, so
its names are imported here, at the top, and this module has no `from __future__ import annotations`."""

import base64
import json
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

DIMENSIONS = 384  # the bundled model's

api = FastAPI()


@serve.deployment(name="Embedder", max_ongoing_requests=256)
class Embedder:
    """The replica: `@serve.batch` as embserve's admits, and a fixed vector per text for a model."""

    def __init__(self) -> None:
        self.vector = np.random.default_rng(0).standard_normal(DIMENSIONS).astype(np.float32)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def embed(self, texts: list[list[str]]) -> list[np.ndarray]:
        return [np.tile(self.vector, (len(t), 1)) for t in texts]


@serve.deployment(name="Ingress", max_ongoing_requests=512)
@serve.ingress(api)
class Ingress:
    """The ingress: one FastAPI route that reads the body as JSON and answers OpenAI's shape in base64. Without
    an embedder it makes the vectors itself: the same app in one deployment, one hop fewer."""

    def __init__(self, embedder: Any = None) -> None:
        self.embedder = embedder
        self.vector = np.random.default_rng(0).standard_normal(DIMENSIONS).astype(np.float32)

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        body = json.loads(await request.body())
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        if self.embedder is None:
            vectors = np.tile(self.vector, (len(texts), 1))
        else:
            vectors = await self.embedder.embed.remote(texts)
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.tobytes()).decode()}
                for i, v in enumerate(vectors)]
        tokens = sum(len(t.split()) for t in texts)
        return JSONResponse({"object": "list", "data": data, "model": body.get("model", ""),
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    # The bench resets and reads these around each window; the floor keeps no figures.
    @api.get("/v1/performance")
    async def performance(self) -> dict[str, Any]:
        return {}

    @api.post("/v1/performance/reset")
    async def reset(self) -> dict[str, Any]:
        return {}


def build_app(args: dict[str, Any]) -> Any:
    """`serve run`'s import path: the floor's ingress bound to its replica, or alone (`one_deployment: true`)."""
    return Ingress.bind() if args.get("one_deployment") else Ingress.bind(Embedder.bind())
