"""The OpenVINO runtime of a CPU replica: the model's transformer converted in-process from the loaded Hugging
Face module, kept on disk as OpenVINO IR so that a restart skips the conversion, and compiled for this CPU at
the precision the replica's profile chose. Pooling, Dense layers and normalization stay embserve's own (model.py)
on the float32 hidden states it returns.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import queue
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embserve.engine.cpu_memory import OPENVINO_CACHE_ENTRIES

log = logging.getLogger(__name__)

# Bumped when what is written to the cache changes shape, so that an older entry is never read as a newer one.
CACHE_FORMAT = 1
_IR = "model.xml"
_WEIGHTS = "model.bin"
_MANIFEST = "manifest.json"  # written last: an entry without it is incomplete


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def choose_runtime(setting: str, device: str, weights_float32: bool, installed: bool) -> tuple[str, str]:
    """The runtime a replica's forwards run on, and why. `auto`: OpenVINO on a CPU where it is installed (about
    1.5x torch's speed at the same vectors on a MiniLM, docs/benchmarks.md), torch on a GPU. OpenVINO runs float32
    weights, at f32 or bf16 precision; float16 or bfloat16 weights stay on torch. An explicit `openvino` that
    cannot run here at all is an error; a model that then fails to convert is served by torch all the same, with
    the reason in the profile (EmbeddingModel._start_openvino)."""
    if setting == "torch":
        return "torch", "set"
    problem = None
    if device != "cpu":
        problem = f"OpenVINO runs on a CPU; this replica runs on {device}"
    elif not installed:
        problem = "the openvino package is not installed (pip install openvino)"
    elif not weights_float32:
        problem = "OpenVINO runs float32 weights (at f32 or bf16 precision); this dtype keeps torch"
    if problem is None:
        return "openvino", "set" if setting == "openvino" else "auto: a CPU, and openvino is installed"
    if setting == "openvino":
        raise ValueError(f"runtime 'openvino' is set but cannot run: {problem}; set runtime to 'auto' or 'torch'")
    return "torch", f"auto: {problem}"


def precision_hint(bf16: bool) -> str:
    """INFERENCE_PRECISION_HINT for the profile's dtype. Always explicit: OpenVINO's CPU plugin runs bf16 by
    default on a CPU that has it, which would change the vectors behind the profile's back."""
    return "bf16" if bf16 else "f32"


# The CPU plugin's cache of per-shape executors, per stream (cpu_memory.OPENVINO_CACHE_ENTRIES says why it is
# bounded). The plugin cannot report it back from a compiled model, but refuses a key it does not know or a value
# that is not a number at compile time.
RUNTIME_CACHE_KEY = "CPU_RUNTIME_CACHE_CAPACITY"


def compile_properties(precision: str, streams: int, threads: int,
                       cache_entries: int | None = OPENVINO_CACHE_ENTRIES) -> dict[str, str]:
    """One stream per forward worker, the replica's threads split among them, as torch's layout does; threads
    not pinned, since a replica shares its cores with the ingress and Ray's processes. The per-shape executor cache
    bounded to `cache_entries` per stream (None: OpenVINO's own 5,000), so that memory stays flat under
    ever-new shapes."""
    properties = {
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": str(max(1, streams)),
        "INFERENCE_NUM_THREADS": str(max(1, threads)),
        "ENABLE_CPU_PINNING": "NO",
    }
    if cache_entries is not None:
        properties[RUNTIME_CACHE_KEY] = str(cache_entries)
    return properties


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embserve" / "openvino"


def _file_stamp(path: Path) -> list[Any]:
    # ctime and inode as well as size and mtime: a copy that keeps sizes and mtimes (rsync -a, tar, cp -p) of
    # another fine-tune into the same path still gets new ones.
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def cache_key(source: str, revision: str | None, versions: dict[str, str], commit: str | None = None) -> str:
    """What a converted model depends on: a local folder's files (name, size, times, inode), so that a changed
    folder converts again; for a hub id, the commit its files were resolved to (`commit`), so that a push to the
    branch converts again; the revision asked for; and the versions that convert it."""
    files: list[Any] = []
    folder = Path(source)
    if folder.is_dir():
        files = [_file_stamp(p) for p in sorted(folder.iterdir()) if p.is_file()]
    blob = json.dumps({"format": CACHE_FORMAT, "source": os.path.abspath(source) if folder.is_dir() else source,
                       "revision": revision, "commit": commit, "files": files, "versions": versions},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class CorruptCache(Exception):
    """A cache entry that is incomplete or whose files are not what was written."""


def read_cached(entry: Path) -> Any | None:
    """The converted model of a cache entry, or None where there is none. Raises CorruptCache where the entry's
    files do not match its manifest or OpenVINO cannot read them."""
    import openvino as ov

    if not entry.exists():
        return None
    try:  # entries are renamed into place whole (write_cached): one without its manifest was damaged since
        manifest = json.loads((entry / _MANIFEST).read_text())
        for name in (_IR, _WEIGHTS):
            if _digest(entry / name) != manifest["digests"][name]:
                raise CorruptCache(f"{name} does not match its digest")
        return ov.Core().read_model(str(entry / _IR))
    except CorruptCache:
        raise
    except Exception as exc:  # unreadable JSON, a missing file, IR that OpenVINO refuses
        raise CorruptCache(f"{type(exc).__name__}: {exc}") from None


def write_cached(entry: Path, model: Any) -> None:
    """Saves a converted model as a complete entry or not at all: written in a temporary folder beside it and
    renamed into place, so that replicas starting together never read a half-written one."""
    import openvino as ov

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    try:
        ov.save_model(model, str(tmp / _IR), compress_to_fp16=False)
        digests = {name: _digest(tmp / name) for name in (_IR, _WEIGHTS)}
        (tmp / _MANIFEST).write_text(json.dumps({"digests": digests}))
        try:
            tmp.rename(entry)
        except OSError:  # another replica got there first: its entry is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(module: Any, example: dict[str, Any]) -> Any:
    """OpenVINO's model of a transformer that maps (input_ids, attention_mask) to its last hidden state, traced
    with an example whose rows differ in length (so that the mask's path is traced), with the batch and the
    sequence dimensions left dynamic. `check_conversion` is what tells whether the trace generalizes."""
    import openvino as ov
    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # The trace warns of every Python branch on a shape in transformers' mask code; the dynamic-shape tests
    # (tests/unit/test_openvino.py) are what shows that the converted model is right for any batch and length.
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        model = ov.convert_model(LastHidden(module).eval(), example_input=example)
    traced = {str(w.message).split(".")[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)}
    if traced:
        log.info("the trace froze %d Python value(s) (check_conversion tests the result): %s", len(traced),
                 "; ".join(sorted(traced))[:500])
    static = [str(port.get_partial_shape()) for port in model.inputs if not port.get_partial_shape().is_dynamic]
    if static:
        raise ValueError(f"the converted model has static input shapes {static}; it needs any batch and length")
    return model


def example_inputs(vocab_size: int, pad_id: int) -> dict[str, Any]:
    """Two rows, the second one token shorter and padded: the trace then carries a real attention mask."""
    import torch

    token = 1000 % vocab_size
    ids = torch.full((2, 8), token, dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    ids[1, -1], mask[1, -1] = pad_id, 0
    return {"input_ids": ids, "attention_mask": mask}


INPUTS = ("input_ids", "attention_mask")
# Hidden states of the converted model against torch's, in float32, relative to their scale: MiniLM's differ by
# 2e-6; a conversion that froze a shape or a value into the graph differs by whole units.
CHECK_TOLERANCE = 1e-4


class ConversionMismatch(ValueError):
    """The converted model does not compute what the torch module computes."""


def check_conversion(model: Any, module: Any, vocab_size: int, pad_id: int) -> None:
    """Runs the converted model at f32 on a shape the trace never saw (3 rows of 5, 13 and 17 tokens, padded) and
    compares its hidden states at the real tokens with the torch module's. A conversion that froze a shape or a
    value of the trace into the graph (Python branches on sizes, `.item()`) fails here, before it is cached or
    served, and the model stays on torch."""
    import openvino as ov
    import torch

    names = {name for port in model.inputs for name in port.get_names()}
    if not set(INPUTS) <= names:
        raise ConversionMismatch(f"the converted model's inputs are {sorted(names)}, not {list(INPUTS)}")
    rng = np.random.default_rng(0)
    lengths = [5, 13, 17]
    ids = np.full((3, max(lengths)), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(1000, min(vocab_size, 20000), n)
        mask[row, :n] = 1
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = np.asarray(compiled({"input_ids": ids, "attention_mask": mask})[0], dtype=np.float32)
    with torch.no_grad():
        expected = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
                          ).last_hidden_state.float().numpy()
    real = mask.astype(bool)
    if got.shape != expected.shape:
        raise ConversionMismatch(f"the converted model gives hidden states of shape {got.shape}, torch {expected.shape}")
    error = float(np.abs(got[real] - expected[real]).max())
    if error > CHECK_TOLERANCE * max(1.0, float(np.abs(expected[real]).max())):
        raise ConversionMismatch(f"the converted model's hidden states differ from torch's by {error:.3g} on a "
                                 "shape the trace did not see")


@dataclass(frozen=True)
class Loaded:
    """How the converted model was had: from the cache, or converted now (and whether it was then cached)."""

    how: str


def load_model(entry: Path | None, convert_now: Callable[[], Any]) -> tuple[Any, Loaded]:
    """The converted model from the cache entry, else `convert_now()`, cached for the next start. A corrupt entry
    is removed and converted again; a cache that cannot be written only costs the next start its conversion."""
    if entry is not None:
        try:
            cached = read_cached(entry)
            if cached is not None:
                return cached, Loaded(f"cached IR {entry}")
        except CorruptCache as why:
            log.warning("OpenVINO cache entry %s is corrupt (%s): converting again", entry, why)
            shutil.rmtree(entry, ignore_errors=True)
    model = convert_now()
    if entry is None:
        return model, Loaded("converted (no cache)")
    try:
        write_cached(entry, model)
    except Exception as exc:  # noqa: BLE001 - OSError, or OpenVINO's RuntimeError on a full disk: the model is good
        log.warning("could not cache the converted model in %s: %s", entry, exc)
        return model, Loaded(f"converted (cache not writable: {exc})")
    if (entry / _MANIFEST).is_file():
        return model, Loaded(f"converted, cached as {entry}")
    return model, Loaded(f"converted (not cached: {entry} could not be put in place)")


class OpenVinoEncoder:
    """A compiled model and one infer request per forward that may run at once; `hidden` is safe to call from
    that many threads together (each takes a request of its own)."""

    def __init__(self, model: Any, precision: str, streams: int, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        self.properties = compile_properties(precision, streams, threads)  # what it was compiled with
        self.compiled = core.compile_model(model, "CPU", self.properties)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)  # "f32", "bf16"
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, streams)):
            self._requests.put(self.compiled.create_infer_request())

    def hidden(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The last hidden state [n, length, width] in float32, for int64 ids and mask [n, length]."""
        request = self._requests.get()
        try:
            request.infer({"input_ids": ids, "attention_mask": mask})  # by name, never by position
            return np.array(request.get_output_tensor(0).data, dtype=np.float32)  # a copy: the request is reused
        finally:
            self._requests.put(request)


def openvino_version() -> str:
    import openvino as ov

    return str(ov.get_version())


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
