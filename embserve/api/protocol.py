"""The API's request, response and error models: OpenAI's embeddings, and reranking in the Cohere/Jina shape and
TEI's. Data only, no logic."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

TokenIds = Annotated[list[StrictInt], Field(min_length=1)]

EmbeddingInput = Union[
    StrictStr,
    Annotated[list[StrictStr], Field(min_length=1)],
    TokenIds,
    Annotated[list[TokenIds], Field(min_length=1)],
]


class EmbeddingRequest(BaseModel):
    # OpenAI ignores fields it does not know; so do we, so that newer clients keep working.
    model_config = ConfigDict(extra="ignore")

    input: EmbeddingInput = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists "
        "(ids of the served model's tokenizer, without special tokens)."
    )
    model: StrictStr = Field(description="The served model name or one of its aliases.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(
        default=None, description="Keep the first N dimensions and re-normalize."
    )
    user: StrictStr | None = None
    truncate: bool | None = Field(
        default=None,
        description="Extension: cut inputs longer than the model's maximum instead of answering 400.",
    )
    prompt_name: StrictStr | None = Field(
        default=None,
        description="Extension (as TEI's): the name of one of the model's sentence-transformers prompts (e.g. "
        "'query'), put before every input; none: the model's default prompt, if it has one.",
    )


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class RerankRequest(BaseModel):
    """POST /v1/rerank, as Cohere's v1, Jina's, vLLM's and Infinity's rerank routes take it."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr = Field(description="A served rerank model's name or one of its aliases.")
    query: StrictStr
    documents: list[StrictStr] = Field(description="The texts to score against the query (strings).")
    top_n: StrictInt | None = Field(default=None, description="Return only the N best; none: all of them.")
    return_documents: bool = Field(default=False, description="Put each document's text in its result.")
    truncate: bool | None = Field(
        default=None, description="Extension: cut (query, document) pairs longer than the model's maximum, as "
        "the model's tokenizer would (longest first), instead of answering 400.")


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult] = Field(description="Sorted by relevance_score, highest first.")
    usage: Usage


class TEIRerankRequest(BaseModel):
    """POST /rerank, as text-embeddings-inference takes it."""

    model_config = ConfigDict(extra="ignore")

    query: StrictStr
    texts: list[StrictStr]
    model: StrictStr | None = Field(default=None, description="Extension: the rerank model; none: the one "
                                    "rerank model served (TEI serves one model).")
    truncate: bool | None = None
    raw_scores: bool = Field(default=False, description="The model's logits, without its activation.")
    return_text: bool = False


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "embserve"
    task: Literal["embed", "rerank"] = "embed"
    dimensions: int | None = Field(description="The vectors' size; null for a rerank model.")
    max_input_tokens: int
    aliases: list[str] = []


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str | None = Field(None, description="The request's X-Request-Id (the one sent, or the one the "
                                   "server made), which the server's log lines about it carry.")
