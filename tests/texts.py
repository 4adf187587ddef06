"""Real English text for tests, from the standard library's docstrings (no downloads)."""

import importlib
import inspect
import random

MODULES = ("json", "os", "re", "inspect", "collections", "functools", "itertools", "asyncio", "threading",
           "subprocess", "argparse", "logging", "pathlib", "typing", "csv", "datetime", "decimal")


def docstrings() -> list[str]:
    out = []
    for name in MODULES:
        for _, obj in inspect.getmembers(importlib.import_module(name)):
            doc = inspect.getdoc(obj)
            if doc and len(doc.split()) > 3:
                out.append(" ".join(doc.split()))
    return sorted(set(out))


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    """Short queries (3-15 words) and passages (30-180 words), shuffled."""
    rng = random.Random(seed)
    docs = docstrings()
    out = []
    while len(out) < n:
        words = rng.choice(docs).split()
        if rng.random() < 0.5 or len(words) < 30:
            out.append(" ".join(words[: rng.randint(3, 15)]))
        else:
            out.append(" ".join(words[: rng.randint(30, 180)]))
    return out
