"""Benchmark text built from the standard library's own docstrings: queries, passages, long documents.

Real English that every machine has, no downloads. The same seed on the same Python gives the same texts.
Passages are trimmed to fit the model's maximum length (so that they never answer 400); documents are
kept longer than that on purpose (they are sent with truncate=true).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import statistics
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

# Pure-Python modules with plenty of prose; any that fail to import are skipped.
MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "email.utils", "enum", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "http.server",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "logging.handlers",
    "mailbox", "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib",
    "pickle", "pkgutil", "platform", "poplib", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "weakref", "xml.dom.minidom", "zipfile",
)

QUERY_WORDS = (3, 15)
PASSAGE_WORDS = (30, 180)
SHORT_PASSAGE_WORDS = 34  # about 50 tokens of this corpus's prose
DOCUMENT_WORDS = (260, 600)
LONG_TOKENS = 256  # documents must be longer than this many tokens (the bundled model's maximum)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_STOPWORDS = frozenset("a an and are as at be by for from if in is it of on or that the this to with".split())
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[.,;:!?]?$")


def _is_prose(paragraph: str) -> bool:
    """Mostly plain words, no doctest or code listing."""
    if ">>>" in paragraph or "::" in paragraph or "{" in paragraph:
        return False
    words = paragraph.split()
    return len(words) >= 3 and sum(bool(_WORD.match(w)) for w in words) / len(words) >= 0.8


def _paragraphs(doc: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc) if _is_prose(p)]


def _members(module: Any) -> list[Any]:
    """The module, its public objects defined there, and their methods, in name order."""
    out = [module]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        out.append(obj)
        if inspect.isclass(obj):
            out.extend(m for n, m in sorted(vars(obj).items()) if not n.startswith("_") and callable(m))
    return out


def module_texts(modules: tuple[str, ...] = MODULES) -> dict[str, list[str]]:
    """Prose paragraphs of each module's docstrings, in a stable order."""
    texts: dict[str, list[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            seen: set[str] = set()
            paragraphs = []
            for obj in _members(module):
                doc = inspect.getdoc(obj) if not isinstance(obj, str) else None
                for p in _paragraphs(doc or ""):
                    if p not in seen:
                        seen.add(p)
                        paragraphs.append(p)
            if paragraphs:
                texts[name] = paragraphs
    return texts


@dataclass(frozen=True)
class Corpus:
    """Three kinds of text and their token counts (special tokens included, as the server counts them)."""

    seed: int
    queries: list[str]
    passages: list[str]
    documents: list[str]
    query_tokens: list[int]
    passage_tokens: list[int]
    document_tokens: list[int]

    def kind(self, name: str) -> list[str]:
        return {"queries": self.queries, "passages": self.passages, "documents": self.documents}[name]

    def mixed(self, n: int, seed: int | None = None, query_share: float = 0.5) -> list[str]:
        """Queries and passages, shuffled: what a search service sees (indexing and querying at once)."""
        rng = random.Random(self.seed if seed is None else seed)
        return [rng.choice(self.queries) if rng.random() < query_share else rng.choice(self.passages)
                for _ in range(n)]

    def short(self, n: int, seed: int | None = None, query_share: float = 0.5) -> list[str]:
        """Queries and passage heads (their first SHORT_PASSAGE_WORDS words, about 50 tokens), shuffled: the short
        texts a search service mostly sees, where the cost of a request around its forward shows most."""
        rng = random.Random(self.seed if seed is None else seed)
        heads = [" ".join(p.split()[:SHORT_PASSAGE_WORDS]) for p in self.passages]
        queries = [q for q, tokens in zip(self.queries, self.query_tokens) if 10 <= tokens <= 20]
        return [rng.choice(queries) if rng.random() < query_share else rng.choice(heads) for _ in range(n)]

    def stats(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, texts, tokens in (("queries", self.queries, self.query_tokens),
                                    ("passages", self.passages, self.passage_tokens),
                                    ("documents", self.documents, self.document_tokens)):
            words = [len(t.split()) for t in texts]
            out[name] = {"count": len(texts), "words_min": min(words), "words_max": max(words),
                         "tokens_min": min(tokens), "tokens_mean": round(statistics.fmean(tokens), 1),
                         "tokens_max": max(tokens)}
        return out


def bundled_token_counter() -> Callable[[list[str]], list[int]]:
    """Token counts (with [CLS]/[SEP]) from the bundled model's own tokenizer, loaded from disk."""
    from transformers import AutoTokenizer

    from embserve.engine.model import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("bundled"))

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]]

    return count


def _window(rng: random.Random, paragraphs: list[str], words: int) -> str | None:
    """`words` consecutive words of a module's prose, starting at a paragraph."""
    stream_start = rng.randrange(len(paragraphs))
    collected: list[str] = []
    for p in paragraphs[stream_start:]:
        collected.extend(p.split())
        if len(collected) >= words:
            return " ".join(collected[:words])
    return None


def _query(rng: random.Random, paragraph: str) -> str | None:
    sentence = _SENTENCE_END.split(paragraph)[0]
    words = sentence.split()
    if len(words) < QUERY_WORDS[0]:
        return None
    k = rng.randint(QUERY_WORDS[0], min(QUERY_WORDS[1], len(words)))
    # A query does not stop on "the" or "if": extend to the next content word, else cut back to one.
    while k < min(QUERY_WORDS[1], len(words)) and words[k - 1].lower() in _STOPWORDS:
        k += 1
    while k > QUERY_WORDS[0] and words[k - 1].lower() in _STOPWORDS:
        k -= 1
    query = [w.strip(".,;:()`'\"") for w in words[:k]]
    query = [w for w in query if w]
    return " ".join(query) if len(query) >= QUERY_WORDS[0] else None


def build_corpus(seed: int = 0, n_queries: int = 1000, n_passages: int = 1000, n_documents: int = 200,
                 max_tokens: int = LONG_TOKENS, count_tokens: Callable[[list[str]], list[int]] | None = None,
                 modules: tuple[str, ...] = MODULES) -> Corpus:
    count = count_tokens or bundled_token_counter()
    rng = random.Random(seed)
    texts = module_texts(modules)
    names = sorted(texts)
    all_paragraphs = [p for name in names for p in texts[name]]
    long_modules = [n for n in names if sum(len(p.split()) for p in texts[n]) >= DOCUMENT_WORDS[1] * 2]

    queries: set[str] = set()
    for _ in range(n_queries * 20):
        if len(queries) >= n_queries:
            break
        q = _query(rng, rng.choice(all_paragraphs))
        if q:
            queries.add(q)

    passages: list[str] = []
    for _ in range(n_passages * 20):
        if len(passages) >= n_passages:
            break
        text = _window(rng, texts[rng.choice(names)], rng.randint(*PASSAGE_WORDS))
        if text:
            passages.append(text)
    # Trim passages that the tokenizer finds longer than the model's maximum (code-ish words split a lot).
    tokens = count(passages)
    for i, n in enumerate(tokens):
        while n > max_tokens and len(passages[i].split()) > PASSAGE_WORDS[0]:
            words = passages[i].split()
            passages[i] = " ".join(words[: max(PASSAGE_WORDS[0], int(len(words) * max_tokens / n) - 1)])
            n = count([passages[i]])[0]
        tokens[i] = n
    passages = [p for p, n in zip(passages, tokens) if n <= max_tokens]

    documents: list[str] = []
    for _ in range(n_documents * 20):
        if len(documents) >= n_documents or not long_modules:
            break
        text = _window(rng, texts[rng.choice(long_modules)], rng.randint(*DOCUMENT_WORDS))
        if text:
            documents.append(text)
    doc_tokens = count(documents)
    documents = [d for d, n in zip(documents, doc_tokens) if n > max_tokens]

    query_list = sorted(queries)
    rng.shuffle(query_list)
    return Corpus(seed=seed, queries=query_list, passages=passages, documents=documents,
                  query_tokens=count(query_list), passage_tokens=count(passages),
                  document_tokens=[n for n in doc_tokens if n > max_tokens])


def load_or_build(cache: Path | None, seed: int = 0, **kwargs: Any) -> Corpus:
    """The corpus from `cache` when it was built with this seed, else built (and cached when asked)."""
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("seed") == seed:
            return Corpus(**data)
    corpus = build_corpus(seed, **kwargs)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(asdict(corpus)))
    return corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None, help="JSON file to write (and reuse)")
    parser.add_argument("--show", type=int, default=3, help="examples of each kind to print")


def run(args: argparse.Namespace) -> None:
    corpus = load_or_build(args.cache, args.seed)
    print(json.dumps(corpus.stats(), indent=2))
    for name in ("queries", "passages", "documents"):
        for text in corpus.kind(name)[: args.show]:
            print(f"[{name}] {text[:160]}{'...' if len(text) > 160 else ''}")


def main(argv: list[str] | None = None) -> int:
    from bench.cli import module_main

    return module_main("corpus", argv)


if __name__ == "__main__":
    raise SystemExit(main())
