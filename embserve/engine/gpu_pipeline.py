"""A group's forward split in two, so that a GPU replica overlaps: `launch` pads the group, copies it to the
card and queues its forward without waiting; `Pending.result` waits for that group's end only. While one
group computes, the scheduler plans, pads and copies the next (Scheduler._pipeline).

On a GPU the copies run on a stream of their own from pinned memory, the forward on a compute stream that
waits for the copy's event, and the vectors come back through a pinned buffer and an event instead of a
blocking `.cpu()`. On a CPU there are no streams: `launch` runs the forward and `result` hands it back, so
the same scheduler code runs (and is tested) there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from embserve.api.errors import NonFiniteOutput

if TYPE_CHECKING:
    from embserve.engine.model import EmbeddingModel


class Pending(Protocol):
    def result(self) -> np.ndarray:
        """The group's float32 vectors once its forward has ended; raises as EmbeddingModel.forward does."""


class Launcher(Protocol):
    def launch(self, sequences: list[list[int]]) -> Pending:
        """Queues one group's forward and returns at once where the device allows it."""


class Done:
    """A group whose forward already ended (a CPU), or failed before it was queued."""

    def __init__(self, vectors: np.ndarray | None = None, error: BaseException | None = None) -> None:
        self.vectors, self.error = vectors, error

    def result(self) -> np.ndarray:
        if self.error is not None:
            # Not kept: an out-of-memory error's traceback holds the failed launch's tensors, which must
            # be freed before the group is split and retried.
            error, self.error = self.error, None
            raise error
        assert self.vectors is not None
        return self.vectors


class CudaPending:
    """A group queued on the compute stream: its vectors land in `host` (pinned) when `done` fires."""

    def __init__(self, done: object, host: object, keep: tuple[object, ...]) -> None:
        self.done, self.host, self.keep = done, host, keep

    def result(self) -> np.ndarray:
        self.done.synchronize()  # this group's end only: the next group may already be running
        self.keep = ()
        # A copy, so that the pinned buffer goes back to torch's host allocator now, not when the last
        # request of the group has been answered.
        return finite(self.host.numpy().copy())


class StreamLauncher:
    """Launches an EmbeddingModel's groups: on a GPU over a copy stream and a compute stream, on a CPU in place."""

    def __init__(self, model: EmbeddingModel) -> None:
        import torch

        self.model = model
        cuda = model.device == "cuda"
        self.copy_stream = torch.cuda.Stream() if cuda else None
        self.compute_stream = torch.cuda.Stream() if cuda else None

    def launch(self, sequences: list[list[int]]) -> Pending:
        if self.compute_stream is None:
            try:
                return Done(self.model.forward(sequences))
            except NonFiniteOutput as err:
                return Done(error=err)
        return self._launch_cuda(sequences)

    def _launch_cuda(self, sequences: list[list[int]]) -> Pending:
        import torch

        from embserve.engine.model import padded_inputs, pool

        model = self.model
        ids, mask = padded_inputs(sequences, model.pad_id)
        uniform = bool(mask.all())
        with torch.inference_mode():
            with torch.cuda.stream(self.copy_stream):
                ids_d = ids.pin_memory().to("cuda", non_blocking=True)
                mask_d = None if uniform else mask.pin_memory().to("cuda", non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
            with torch.cuda.stream(self.compute_stream):
                self.compute_stream.wait_event(copied)
                # Made on the copy stream, used on this one: the allocator must not reuse them before
                # this stream is done with them.
                ids_d.record_stream(self.compute_stream)
                if mask_d is not None:
                    mask_d.record_stream(self.compute_stream)
                pool_mask = torch.ones(ids_d.shape, dtype=torch.long, device="cuda") if uniform else mask_d
                hidden = model.model(input_ids=ids_d, attention_mask=mask_d).last_hidden_state
                pooled = model.dense(pool(hidden.float(), pool_mask, model.pooling))
                if model.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                host = torch.empty(pooled.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(pooled, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
        return CudaPending(done, host, (ids_d, mask_d, pooled))


def finite(vectors: np.ndarray) -> np.ndarray:
    """`vectors`, or NonFiniteOutput naming the rows that came out NaN or infinite (as forward raises it)."""
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise NonFiniteOutput(NonFiniteOutput.HINT.format(what=f"{bad.size} of {len(vectors)} inputs"),
                              rows=tuple(int(r) for r in bad), vectors=vectors)
    return vectors


def launcher_for(model: object) -> Launcher:
    """The model's own launcher where it has one (a simulated device in tests and bench), else streams."""
    own = getattr(model, "launch", None)
    if callable(own):
        return model  # type: ignore[return-value]
    return StreamLauncher(model)  # type: ignore[arg-type]

