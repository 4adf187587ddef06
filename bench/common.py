"""What several benches share: the checkout's root, the served model's name, the machine's description,
signal handling that lets a run's `finally` stop what it started, and writing a run's JSON."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "all-MiniLM-L6-v2"  # the bundled model, as serve_config.yaml serves it


def interrupt(signum: int, _frame: Any) -> None:
    """A signal handler that raises KeyboardInterrupt, so that SIGTERM unwinds through the `finally`s."""
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """SIGTERM and SIGINT unwind the run. A shell without job control starts background jobs with SIGINT
    ignored; Ctrl-C and kill -INT should still stop a run cleanly."""
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def offline_env() -> None:
    """No downloads, and no tokenizer threads fighting the forwards for the cores."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def git(*args: str, cwd: Path = ROOT) -> str:
    """A git command's output in `cwd` ('' where git fails)."""
    done = subprocess.run(["git", *args], check=False, cwd=cwd, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def short_commit(rev: str = "HEAD", cwd: Path = ROOT) -> str:
    return git("rev-parse", "--short", rev, cwd=cwd)


def machine() -> dict[str, Any]:
    """The box, the library versions and the commit a run's figures belong to."""
    import ray
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "transformers": transformers.__version__, "os": platform.platform(),
            "commit": short_commit(),
            "uncommitted_server_changes": bool(git("status", "--porcelain", "--", "embserve", "deployments")),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_at_start": os.getloadavg()}


def write_json(path: Path, data: Any) -> None:
    """A run's figures as indented JSON at `path`, its folder made where missing; what JSON cannot hold as
    itself (a Path, a datetime) is written as its str."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
