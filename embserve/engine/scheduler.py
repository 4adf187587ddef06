"""A replica's one scheduler: requests are tokenized when they are admitted and queue here as inputs; each
forward worker takes the next group from one plan over everything pending (the group that holds the
oldest input; on a GPU with the warm-up's cost line, the group that costs least per input, the oldest's
again once an input has waited PASSED_OVER_TAKES takes), and each request is answered as soon as its own
inputs are done.

One lock guards the queue; forward workers are plain threads that take a group, run it, and hand its
vectors back. On a GPU the one worker is pipelined (`_pipeline`): it keeps two groups launched, and plans
and answers while the card computes; with the warm-up's cost line it takes the next group just before the
card would run out of work, so that the group holds what arrived meanwhile. Nothing else decides what runs
next. A group that runs out of GPU memory is split and run again here, and the budget that plans later
groups lowered (`_run`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embserve.api.contracts import EmbedJob, EmbedResult, RerankJob
from embserve.api.errors import Cancelled, EmbservError, NonFiniteOutput, OutOfMemory, Unavailable
from embserve.engine.batching import next_group, padded_size
from embserve.engine.forward_cost import ForwardCost
from embserve.metrics.events import Admitted, Answered, Forward
from embserve.settings import BatchingConfig, default_group_cost_tokens

if TYPE_CHECKING:  # the ingress imports this module for EmbedJob, and must not import torch
    from embserve.engine.model import EmbeddingModel

log = logging.getLogger(__name__)

# How many of the oldest pending inputs one plan looks at: enough to fill any group a budget allows,
# few enough that planning stays well under a millisecond behind a 2048-input request.
PLAN_WINDOW = 512
# Groups a pipelined worker keeps queued on the device: one computing, the next queued behind it, so the
# card never waits while the host answers the first and plans the one after.
PIPELINE_DEPTH = 2
# The pipelined worker takes the next group this long at least before the card's predicted end of work:
# waking a thread, planning, padding and copying a group never take less on a host, whatever was measured.
LEAD_FLOOR_S = 0.0005
# ... and at least this many times the host's measured time from deciding to take a group to its launch (an
# average), so that a slower than average take still launches before the card runs dry.
LEAD_MARGIN = 2.0
HOST_TIME_WEIGHT = 0.2  # of the newest take in that average
# With a cost line the next group is the one that costs least per input, so an input may be passed over while
# its length waits for company; once this many takes have passed since it arrived, the group holding the
# oldest input is taken again, until no input that old is pending.
PASSED_OVER_TAKES = 8


@dataclass(eq=False)
class Arrival:
    """A job as the replica got it: what it counts for in an admission (Ray's batch_size_fn), when it came (its
    wait for a batch counts as queueing), and whether its caller went away (its inputs still pending are then
    dropped, never computed). A plain job given to `admit` arrives when admitted, and stays wanted."""

    job: EmbedJob | RerankJob
    weight: int = 1
    received: float = 0.0
    cancelled: bool = False


@dataclass(eq=False)
class Request:
    arrival: Arrival
    seqs: list[list[int]]
    reply: Callable[[EmbedResult], None]
    admitted_at: float  # time.perf_counter() when the replica got it
    tokenize_s: float
    vectors: list[np.ndarray | None] = field(default_factory=list)
    left: int = 0
    started_at: float | None = None
    error: EmbservError | None = None

    def result(self, now: float) -> EmbedResult:
        started = self.started_at or now
        if self.error is not None:
            return EmbedResult(None, error=self.error, queue_s=started - self.admitted_at, tokenize_s=self.tokenize_s)
        vectors = np.stack(self.vectors) if self.vectors else np.zeros((0, 0))
        return EmbedResult(vectors.astype(np.float32, copy=False), sum(map(len, self.seqs)),
                           queue_s=started - self.admitted_at, tokenize_s=self.tokenize_s, forward_s=now - started)


@dataclass(frozen=True)
class ForwardLayout:
    """How a replica spends its CPU threads: `workers` forwards at once, each on `threads_per_forward`."""

    workers: int
    threads_per_forward: int

    @property
    def threads(self) -> int:
        return self.workers * self.threads_per_forward


@dataclass
class Launched:
    """A group queued on the device by the pipelined worker, until its vectors are back."""

    taken: list[tuple[Request, int]]
    seqs: list[list[int]]
    pending: object  # embserve.engine.gpu_pipeline.Pending
    launched: float  # when its launch began (its requests' start)
    queued: float  # when its launch returned: the device may start it from here
    cost_s: float  # its forward's time by the cost line; 0.0 without one


class CardClock:
    """When the device runs out of launched work, by the warm-up's cost line, and how long before that the
    pipelined worker must take its next group: twice the host's measured take-to-launch time (a running
    average), at least LEAD_FLOOR_S. Without a cost line it predicts nothing and costs nothing."""

    def __init__(self, cost: ForwardCost | None) -> None:
        self.cost = cost
        self.busy_until = 0.0
        self.host_s = LEAD_FLOOR_S / LEAD_MARGIN

    def take_by(self) -> float:
        return self.busy_until - max(LEAD_FLOOR_S, LEAD_MARGIN * self.host_s)

    def launched(self, seqs: list[list[int]], due: float, queued: float) -> float:
        """A group was queued at `queued`, taken when it was `due`: its predicted seconds on the device."""
        if self.cost is None:
            return 0.0
        self.host_s += HOST_TIME_WEIGHT * (queued - due - self.host_s)
        cost_s = self.cost.seconds(padded_size(list(map(len, seqs)), range(len(seqs))))
        self.busy_until = max(queued, self.busy_until) + cost_s
        return cost_s

    def landed(self, end: float, inflight: "deque[Launched]") -> None:
        """What the device really did moves the prediction for the groups queued behind the one that ended."""
        self.busy_until = end
        for group in inflight:
            self.busy_until = max(self.busy_until, group.queued) + group.cost_s


def forward_layout(device: str, threads: int, workers: int | None = None) -> ForwardLayout:
    """Split a replica's `threads` among concurrent forwards. `workers` None: one single-thread forward
    per thread on a CPU, so that no forward waits at an OpenMP barrier for a thread the OS descheduled
    (docs/benchmarks.md); one forward at a time on a GPU, which one forward already fills."""
    threads = max(1, threads)
    if workers is None:
        workers = 1 if device == "cuda" else threads
    return ForwardLayout(workers=max(1, workers), threads_per_forward=max(1, threads // max(1, workers)))


class Scheduler:
    """Owns the replica's model, tokenizer and queue. `admit` may be called from any thread; `report`
    hears of every admission, forward and answer (from the thread where it happened)."""

    def __init__(self, model: EmbeddingModel, layout: ForwardLayout, config: Callable[[], BatchingConfig],
                 max_batch_tokens: int, report: Callable[[object], None] = lambda _: None,
                 group_cost_tokens: int | None = None, tolerance_wall: bool = True,
                 pipelined: bool | None = None, forward_cost: ForwardCost | None = None) -> None:
        self.model = model
        self.tokenizer = model.request_tokenizer()
        self.config = config
        self.max_batch_tokens = max_batch_tokens
        # Padded tokens a forward has proved too many for the card's memory: halved at each out-of-memory,
        # for the replica's life, and a cap on whatever budget the settings or user_config give.
        self.memory_cap: int | None = None
        self.group_cost_tokens = group_cost_tokens if group_cost_tokens is not None else (
            default_group_cost_tokens(model.device))
        # False: the length tolerance is a preference, not a wall; the group cost alone weighs padding
        # against one more forward (a GPU replica whose warm-up measured what a forward costs).
        self.tolerance_wall = tolerance_wall
        # What a forward costs on this device (the warm-up's line on a GPU): the pipelined worker predicts
        # from it when the card runs out of launched work. None: it takes the next group at once.
        self.forward_cost = forward_cost
        self._take_times: deque[float] = deque(maxlen=PASSED_OVER_TAKES)  # the latest takes, with a cost line
        self.report = report
        self._pending: list[tuple[Request, int]] = []  # (request, input index), in admission order
        self.admitted = 0  # requests admitted since the start, counted live (the metrics ship every 0.5 s)
        self._wake = threading.Condition()
        self._closed = False
        self.threads_seen: set[int] = set()  # torch threads per forward, as each worker reads them back
        # One worker on a GPU overlaps: it plans, pads and copies the next group while the card computes
        # (embserve/engine/gpu_pipeline.py). None: so on a GPU with one forward worker.
        self.pipelined = (model.device == "cuda" and layout.workers == 1) if pipelined is None else pipelined
        target = self._pipeline if self.pipelined else self._work
        ready = threading.Barrier(layout.workers + 1)
        self._workers = [threading.Thread(target=target, args=(layout.threads_per_forward, ready),
                                          name=f"{FORWARD_THREAD}{k}", daemon=True) for k in range(layout.workers)]
        for worker in self._workers:
            worker.start()
        ready.wait()  # every worker has set its threads before the first request

    @property
    def pending(self) -> int:
        return len(self._pending)

    def admit(self, jobs: Sequence[Arrival | EmbedJob | RerankJob],
              replies: list[Callable[[EmbedResult], None]]) -> None:
        """Tokenizes every job's inputs in one tokenizer call (the model's request tokenizer: texts or token
        ids, or a reranker's pairs) and queues them. A job that fails its checks (too long, bad token ids) is
        answered at once and alone; the others queue."""
        arrivals = [job if isinstance(job, Arrival) else Arrival(job) for job in jobs]
        t0 = time.perf_counter()
        prepared = list(zip(arrivals, self.tokenizer.prepare([a.job for a in arrivals]), replies))
        tokenize_s = time.perf_counter() - t0
        self.report(Admitted(len(arrivals), sum(len(a.job) for a in arrivals), tokenize_s, self.model.info.task))
        now = time.perf_counter()
        with self._wake:
            self.admitted += len(arrivals)
            for arrival, seqs, reply in prepared:
                if isinstance(seqs, EmbservError) or not seqs:
                    error = seqs if isinstance(seqs, EmbservError) else None
                    request = Request(arrival, [], reply, arrival.received or now, tokenize_s, error=error)
                    self._answer(request, now)
                    continue
                request = Request(arrival, seqs, reply, arrival.received or now, tokenize_s,
                                  vectors=[None] * len(seqs), left=len(seqs))
                self._pending.extend((request, i) for i in range(len(seqs)))
            self._wake.notify_all()

    def close(self) -> None:
        """Stops the workers once their forwards end; what is still pending is answered as unavailable."""
        with self._wake:
            self._closed = True
            dropped = {request for request, _ in self._pending}
            self._pending.clear()
            self._wake.notify_all()
        for request in dropped:
            request.error = Unavailable("the replica is shutting down")
            self._answer(request, time.perf_counter())
        for worker in self._workers:
            worker.join()

    def _take(self) -> list[tuple[Request, int]]:
        """Under the lock: the next group, taken out of the queue. Inputs of requests whose caller went away
        are dropped first; each such request is answered (nobody hears it) and counted."""
        gone = {request for request, _ in self._pending if request.arrival.cancelled}
        if gone:
            self._pending = [item for item in self._pending if item[0] not in gone]
            for request in gone:
                request.error = Cancelled("the client went away before its inputs ran")
                self._answer(request, time.perf_counter())
        if not self._pending:
            return []
        cfg = self.config()
        window = self._pending[:PLAN_WINDOW]
        if not cfg.enable_dynamic_batching:  # every request on its own: plan the oldest one's inputs only
            window = [item for item in window if item[0] is window[0][0]]
        group = next_group([len(r.seqs[i]) for r, i in window], max_batch_tokens=self._budget(cfg),
                           max_inputs=cfg.max_batch_size, oldest_first=self._oldest_first(window[0][0]),
                           group_by_length=cfg.enable_length_grouping,
                           tolerance=cfg.length_group_tolerance if self.tolerance_wall else 1.0,
                           min_group_size=cfg.min_batch_size,
                           group_cost_tokens=self.group_cost_tokens if cfg.group_cost_tokens is None
                           else cfg.group_cost_tokens)
        taken = [window[k] for k in group]
        chosen = set(map(id, taken))
        self._pending = [item for item in self._pending if id(item) not in chosen]
        return taken

    def _oldest_first(self, oldest: Request) -> bool:
        """Under the lock, at a take: whether the group holding the oldest input must be the one taken.
        Always, without a cost line; with one, only once PASSED_OVER_TAKES takes have passed since the oldest
        pending input arrived (else the planner takes the group that costs least per input)."""
        if self.forward_cost is None:
            return True
        times = self._take_times
        overdue = len(times) == times.maxlen and oldest.admitted_at <= times[0]
        times.append(time.perf_counter())
        return overdue

    def _budget(self, cfg: BatchingConfig) -> int:
        budget = cfg.max_batch_tokens or self.max_batch_tokens
        return budget if self.memory_cap is None else min(budget, self.memory_cap)

    def _fills_a_group(self, cfg: BatchingConfig) -> bool:
        """Under the lock: whether what is pending is already more than one group may hold, so that waiting
        longer could not make the next group larger."""
        if len(self._pending) >= (cfg.max_batch_size or PLAN_WINDOW):
            return True
        return sum(len(request.seqs[i]) for request, i in self._pending) >= self._budget(cfg)

    def _await_next_group(self, take_at: float) -> float:
        """Under the lock, while groups are in flight: waits until what is pending fills a group, `take_at`
        comes, or the scheduler closes. Returns when the take was due: `take_at` where the wait ran out
        (the thread's lateness in waking counts as the host's time), else now."""
        cfg = self.config()
        waited = False
        while cfg.enable_dynamic_batching and not self._closed and not self._fills_a_group(cfg):
            now = time.perf_counter()
            if now >= take_at:
                return take_at if waited else now
            self._wake.wait(take_at - now)
            waited = True
        return time.perf_counter()

    def _start_thread(self, threads: int, ready: threading.Barrier) -> None:
        import torch

        name_os_thread(threading.current_thread().name)
        torch.set_num_threads(threads)
        self.threads_seen.add(torch.get_num_threads())
        ready.wait()

    def _work(self, threads: int, ready: threading.Barrier) -> None:
        self._start_thread(threads, ready)
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                taken = self._take()
            if taken:
                self._forward(taken)

    def _pipeline(self, threads: int, ready: threading.Barrier) -> None:
        """One worker that keeps up to PIPELINE_DEPTH groups launched: it takes and launches the next group,
        then waits for the oldest one's end only, answers it, and goes round again, so that planning,
        padding, copying and answering all happen while the device computes. Groups end in the order they
        were taken. A group whose launch or result fails (out of memory) runs again through `_run`.

        With a cost line (`forward_cost`), a group is not taken while another computes as soon as anything
        is pending: the worker waits until the pending inputs fill a group, or until the launched work's
        predicted end is one lead time away (`CardClock`), so that a forward's fixed cost is paid for what
        arrived meanwhile too. Nothing waits with nothing in flight: a lone request on an idle device is
        launched at once."""
        from embserve.engine.gpu_pipeline import launcher_for

        self._start_thread(threads, ready)
        launcher = launcher_for(self.model)
        inflight: deque[Launched] = deque()
        clock = CardClock(self.forward_cost)
        last_end = 0.0
        while True:
            with self._wake:
                while not self._pending and not self._closed and not inflight:
                    self._wake.wait()
                if self._closed and not inflight:
                    return
                due = time.perf_counter()
                if inflight and self.forward_cost is not None:
                    due = self._await_next_group(clock.take_by())
                taken = self._take() if self._pending and not self._closed else []
            if taken:
                inflight.append(self._launch(launcher, taken, due, clock))
            if inflight and (len(inflight) >= PIPELINE_DEPTH or not taken):
                done = inflight.popleft()
                rows = self._run(done.seqs, done.pending.result)  # type: ignore[attr-defined]
                end = time.perf_counter()
                clock.landed(end, inflight)
                # Its time on the device: from its launch, or from the end of the one queued before it.
                self._finish(done.taken, done.seqs, rows, end - max(done.launched, last_end))
                last_end = end

    def _launch(self, launcher, taken: list[tuple[Request, int]], due: float, clock: "CardClock") -> Launched:
        """Pad, copy and queue one group on the device; its launch time starts its requests' forward time."""
        from embserve.engine.gpu_pipeline import Done

        seqs = [request.seqs[i] for request, i in taken]
        launched = time.perf_counter()
        for request, _ in taken:
            request.started_at = request.started_at or launched
        try:
            pending = launcher.launch(seqs)
        except Exception as exc:  # noqa: BLE001 - raised again by result(), in order, and handled there
            pending = Done(error=exc)
        queued = time.perf_counter()
        cost_s = 0.0
        if not isinstance(pending, Done):  # Done: nothing was queued on the device
            cost_s = clock.launched(seqs, due, queued)
        return Launched(taken, seqs, pending, launched, queued, cost_s)

    def _forward(self, taken: list[tuple[Request, int]]) -> None:
        started = time.perf_counter()
        seqs = [request.seqs[i] for request, i in taken]
        for request, _ in taken:
            request.started_at = request.started_at or started
        rows = self._run(seqs)
        self._finish(taken, seqs, rows, time.perf_counter() - started)

    def _finish(self, taken: list[tuple[Request, int]], seqs: list[list[int]],
                rows: list[np.ndarray | EmbservError], seconds: float) -> None:
        """Reports a forward, hands each row to its request, and answers those whose inputs are all done."""
        lengths = list(map(len, seqs))
        self.report(Forward(len(seqs), sum(lengths), padded_size(lengths, range(len(seqs))), seconds))
        done = time.perf_counter()
        with self._wake:
            finished = []
            failed = set()
            for row, (request, i) in zip(rows, taken):
                if isinstance(row, NonFiniteOutput):  # its message names the request's own input
                    row = NonFiniteOutput(NonFiniteOutput.HINT.format(what=f"input[{i}]"), param="input")
                if isinstance(row, EmbservError):
                    request.error = request.error or row
                    failed.add(request)
                else:
                    request.vectors[i] = row
                request.left -= 1
                if request.left == 0:
                    finished.append(request)
            if failed:  # their other inputs are not worth computing
                for request, _ in self._pending:
                    if request in failed and request.left:
                        request.left -= 1
                        if request.left == 0:
                            finished.append(request)
                self._pending = [item for item in self._pending if item[0] not in failed]
        for request in finished:
            self._answer(request, done)

    def _run(self, seqs: list[list[int]],
             result: Callable[[], np.ndarray] | None = None) -> list[np.ndarray | EmbservError]:
        """Each input's vector or error: of `result` (a launched group's) where given, else of a forward run
        here. A group that runs out of GPU memory is split in halves, each run again (down to single
        inputs), and the replica's budget lowered; an input that fails alone gets OutOfMemory, and the rest
        of its group is still answered."""
        import torch

        try:
            return list(result() if result is not None else self.model.forward(seqs))
        except torch.cuda.OutOfMemoryError:
            # No `as`: the exception's traceback holds the failed forward's frames and with them its
            # activations; it is dropped when this block ends, before the cache is freed and halves retried.
            pass
        except NonFiniteOutput as err:  # only the inputs whose vectors are not finite fail
            bad = set(err.rows)
            return [err if row in bad else vector for row, vector in enumerate(err.vectors)]
        except Exception as exc:  # a failed forward fails only the requests that had inputs in it
            log.exception("forward of %d inputs failed", len(seqs))
            return [Unavailable(f"the model failed on this batch: {exc}")] * len(seqs)
        release_gpu_cache()
        if len(seqs) == 1:
            log.warning("out of GPU memory for one input of %d tokens", len(seqs[0]))
            return [OutOfMemory(f"out of GPU memory for one input of {len(seqs[0])} tokens; retry later, or "
                                "send it shorter (or with truncate)", param="input")]
        self._lower_budget(padded_size(list(map(len, seqs)), range(len(seqs))))
        half = len(seqs) // 2
        return self._run(seqs[:half]) + self._run(seqs[half:])

    def _lower_budget(self, failed_tokens: int) -> None:
        """Caps the planning budget at half a group that ran out of memory, once per lowering, logged."""
        with self._wake:
            old = self.memory_cap if self.memory_cap is not None else (
                self.config().max_batch_tokens or self.max_batch_tokens)
            new = max(1, failed_tokens // 2)
            if new >= old:  # another worker lowered it already, or the group was over the budget anyway
                return
            self.memory_cap = new
        log.warning("out of GPU memory at %d padded tokens: max_batch_tokens lowered from %d to %d for this "
                    "replica's life", failed_tokens, old, new)

    def _answer(self, request: Request, now: float) -> None:
        result = request.result(now)
        self.report(Answered(result.queue_s, type(result.error).__name__ if result.error else None))
        request.reply(result)


# What a replica's threads are called where the OS shows them (15 characters at most, the OS's limit), so that
# its CPU can be split by thread (bench.procs): the forward workers, the replica's event loop, and its helpers
# (ThreadPoolExecutor adds "_N" to the prefix).
FORWARD_THREAD = "forward-"
LOOP_THREAD = "replica-loop"
HELPER_THREAD = "replica-hlp"


def name_os_thread(name: str) -> None:
    """Gives the calling thread `name` where the OS shows it (`top -H`, /proc/PID/task/TID/comm, py-spy), so
    that a forward worker can be told from Ray's threads; Linux only, and nothing happens elsewhere."""
    try:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[:15])
    except OSError:
        pass


def release_gpu_cache() -> None:
    """Hands the CUDA caching allocator's free blocks back, so that a retry finds them unfragmented;
    nothing to do where CUDA was never used (a CPU replica, a test)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def embed_jobs(scheduler: Scheduler, jobs: list[EmbedJob]) -> list[EmbedResult]:
    """Admits `jobs` and waits for their answers: the scheduler in-process (tests, bench)."""
    import concurrent.futures

    futures: list[concurrent.futures.Future] = [concurrent.futures.Future() for _ in jobs]
    scheduler.admit(jobs, [f.set_result for f in futures])
    return [f.result() for f in futures]
