"""The fenced code blocks of README.md and docs/, for the tests that run the examples as they are written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fenced_blocks(path: str, language: str) -> list[str]:
    """The bodies of the ```<language> blocks of the file at `path` (from the repository's root), in order."""
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / path).read_text(), re.S)


def the_block(path: str, language: str, marker: str) -> str:
    """The one ```<language> block of `path` that contains `marker`; more or fewer than one fails the test."""
    blocks = [b for b in fenced_blocks(path, language) if marker in b]
    assert len(blocks) == 1, f"{path}: {len(blocks)} {language} blocks contain {marker!r}"
    return blocks[0]
