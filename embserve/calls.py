"""Several small requests to one model in one call to its replicas.

A call from the ingress to a replica costs about as much CPU as the forward of a short query: the handle's
router, a Ray actor task, pickling both ways, the replica's request wrapper and admission (docs/benchmarks.md,
"CPU per request by process"). So the ingress keeps at most `calls` calls in flight per model; small
requests that arrive while that many are out wait here, and go together in the next call that a returning
one frees. A lone request never waits: with a call free it goes at once, alone.

Each request is still answered, failed and timed on its own. What a shared call cannot do is stop one
departed request's inputs: they are computed with the others unless every request of the call is gone (then
the call is cancelled). So only small requests share calls (`small`), and a large one goes alone, as
before, with its work cancelled when its client leaves.

Plain asyncio, no Ray: `send` is whatever starts a call (a Serve handle's `.remote`) and returns an
awaitable with `.cancel()`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from embserve.errors import Overloaded


# Calls in flight per replica of a model, by default: enough that a replica's forward workers always have
# the next call's inputs queued while one call's answers travel back (bench.ab, docs/benchmarks.md).
CALLS_PER_REPLICA = 4
# Requests that share calls: a few inputs of modest size. A larger one goes alone, so that its work stops
# when its client leaves; these cost at most a few forwards when computed for nobody.
SMALL_INPUTS = 16
SMALL_CHARS = 16_384


def shares_calls(job: Any) -> bool:
    return len(job) <= SMALL_INPUTS and job.chars <= SMALL_CHARS


def calls_in_flight(setting: int | None, options: dict[str, Any]) -> tuple[int, str]:
    """How many calls one ingress replica keeps in flight to a model whose deployment has `options`, and
    why: the setting where given; else CALLS_PER_REPLICA per replica of a fixed-size deployment, and 0 (a
    call per request) where Serve autoscales it, since its autoscaler counts calls, not requests."""
    if setting is not None:
        return setting, "set"
    replicas = options.get("num_replicas", 1)
    if options.get("autoscaling_config") or not isinstance(replicas, int):
        return 0, "auto: the replicas are autoscaled, and Serve's autoscaler counts calls, not requests"
    return CALLS_PER_REPLICA * replicas, f"auto: {CALLS_PER_REPLICA} per replica, {replicas} replica(s)"


class Call(Protocol):
    """A call in flight: a Serve DeploymentResponse, say."""

    def __await__(self) -> Any: ...

    def cancel(self) -> None: ...


class Job(Protocol):
    waited_s: float

    def __len__(self) -> int: ...


@dataclass(eq=False)
class _Entry:
    job: Any
    future: asyncio.Future
    queued_at: float
    call: _Flight | None = None
    gone: bool = False


@dataclass(eq=False)
class _Flight:
    entries: list[_Entry]
    response: Call | None = None
    left: int = field(init=False)

    def __post_init__(self) -> None:
        self.left = len(self.entries)


class Coalescer:
    """One model's calls from one ingress replica: at most `calls` in flight (a callable, so that the
    settings can change it live), each of at most `max_inputs` inputs; at most `max_waiting` requests
    wait here (-1: no limit), more get Overloaded at once."""

    def __init__(self, send: Callable[[list[Any]], Call], calls: Callable[[], int], max_inputs: Callable[[], int],
                 max_waiting: int = -1) -> None:
        self._send = send
        self._calls = calls
        self._max_inputs = max_inputs
        self.max_waiting = max_waiting
        self._waiting: deque[_Entry] = deque()
        self._waiting_inputs = 0
        self.in_flight = 0
        self.sent_calls = 0  # calls started, and the requests they carried: what coalescing saved
        self.sent_requests = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> tuple[Awaitable[Any], Callable[[], None]]:
        """The request's answer, to await, and how to give it up (its caller left, or timed out)."""
        if 0 <= self.max_waiting <= len(self._waiting):
            raise Overloaded("the embedding replicas' queues are full; retry shortly")
        entry = _Entry(job, asyncio.get_running_loop().create_future(), time.perf_counter())
        # However the caller gives up (its own cancel, a timeout, its HTTP client leaving), its future is
        # cancelled, and this hears of it.
        entry.future.add_done_callback(lambda future: self._give_up(entry) if future.cancelled() else None)
        self._waiting.append(entry)
        self._waiting_inputs += len(job)
        self._pump()
        return entry.future, entry.future.cancel

    def _pump(self) -> None:
        """Starts calls, oldest requests first, while a slot is free and requests wait, or while the waiting
        requests fill a quarter of a call: then the replica gets them now, whatever is in flight, so that it
        plans its forwards over them (a replica plans only over what it holds) and few wait here."""
        while self._waiting and (self.in_flight < max(1, self._calls())
                                 or self._waiting_inputs >= max(1, self._max_inputs() // 4)):
            limit = max(1, self._max_inputs())
            taken: list[_Entry] = []
            size = 0
            while self._waiting and (not taken or size + len(self._waiting[0].job) <= limit):
                entry = self._waiting.popleft()
                self._waiting_inputs -= len(entry.job)
                if entry.future.done():  # given up, and its callback not run yet
                    entry.gone = True
                    continue
                size += len(entry.job)
                taken.append(entry)
            if not taken:
                continue
            flight = _Flight(taken)
            now = time.perf_counter()
            for entry in taken:
                entry.call = flight
                entry.job.waited_s = now - entry.queued_at
            self.in_flight += 1
            self.sent_calls += 1
            self.sent_requests += len(taken)
            asyncio.ensure_future(self._run(flight))

    async def _run(self, flight: _Flight) -> None:
        try:
            flight.response = self._send([entry.job for entry in flight.entries])
            if flight.left == 0:  # everyone left between taking and sending
                flight.response.cancel()
            results: Sequence[Any] = await flight.response
        except asyncio.CancelledError:  # the call was cancelled (everyone left), or this ingress is stopping
            for entry in flight.entries:
                entry.future.cancel()
            raise
        except Exception as exc:  # every request of the call hears of it, as its own call would
            for entry in flight.entries:
                if not entry.future.done():
                    entry.future.set_exception(exc)
        else:
            for entry, result in zip(flight.entries, results, strict=True):
                if not entry.future.done():
                    entry.future.set_result(result)
        finally:
            self.in_flight -= 1
            self._pump()

    def _give_up(self, entry: _Entry) -> None:
        if entry.call is None:  # still waiting here: it never leaves
            if not entry.gone:
                entry.gone = True
                self._waiting.remove(entry)
                self._waiting_inputs -= len(entry.job)
            return
        if entry.gone:
            return
        entry.gone = True
        flight = entry.call
        flight.left -= 1
        if flight.left == 0 and flight.response is not None:  # nobody is left to hear it: stop its work
            flight.response.cancel()
