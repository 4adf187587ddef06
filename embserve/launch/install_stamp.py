"""run.sh's install stamp: whether the venv already holds this pyproject.toml's packages with the extras asked.

Standard library only: run.sh runs this file with the venv's Python before the package is installed
(`python embserve/launch/install_stamp.py check|record VENV [EXTRA ...]`; `check` exits 0 when nothing
needs installing).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

STAMP = ".embserve-installed.json"


def fingerprint(pyproject: bytes, python: str) -> str:
    """What an install depends on: the project's declared packages and the interpreter."""
    return hashlib.sha256(pyproject + b"\0" + python.encode()).hexdigest()


def read(venv: Path) -> dict | None:
    try:
        stamp = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def satisfied(stamp: dict | None, current: str, extras: Iterable[str]) -> bool:
    """True when the last install was of this fingerprint and covered every extra asked (`test` after `test`,
    or serving's none after `test`)."""
    return bool(stamp) and stamp.get("fingerprint") == current and set(extras) <= set(stamp.get("extras", ()))


def updated(stamp: dict | None, current: str, extras: Iterable[str]) -> dict:
    """The stamp after installing `extras` at `current`: extras installed earlier at the same fingerprint stay."""
    kept = set(stamp.get("extras", ())) if stamp and stamp.get("fingerprint") == current else set()
    return {"fingerprint": current, "extras": sorted(kept | set(extras))}


def main(argv: Sequence[str]) -> int:
    action, venv, extras = argv[0], Path(argv[1]), [e for e in argv[2:] if e]
    root = Path(__file__).resolve().parents[2]
    current = fingerprint((root / "pyproject.toml").read_bytes(), sys.version)
    stamp = read(venv)
    if action == "check":
        return 0 if satisfied(stamp, current, extras) else 1
    if action == "record":
        (venv / STAMP).write_text(json.dumps(updated(stamp, current, extras)) + "\n")
        return 0
    print(f"usage: {argv and sys.argv[0]} check|record VENV [EXTRA ...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
