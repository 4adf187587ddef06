"""Short requests that reach the ingress in the same turn of its event loop share one call to a model's replicas.

A call from one Serve deployment to another costs 1.9-3.8 ms of CPU on a 2-core box, whatever it carries: more than
half of what a short text's forward costs (docs/benchmarks.md, "Serve's deployment-to-deployment call"). Under load
several requests are parsed in one turn of the ingress's loop; `SharedCalls` sends what one turn gathered as one call
(`send_many`), and a request that is alone in its turn as it always went (`send_one`). Nothing waits for company: the
call leaves at the end of the turn that queued its first request.

Each request still gets its own answer (errors travel as values), its own timeout and its own cancellation. A call
is cancelled at the replica once every request in it has been cancelled (its caller went away or timed out); until
then the others still want it. An exception of the call itself (a replica that died under it, back-pressure) reaches
every request in it, and each is retried or answered on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


# Requests of at most this many characters share calls; longer ones go alone. A call costs about what a short text's
# forward does, so sharing pays there (short texts, same run: 1.17x); a long text's forward dwarfs it, and
# requests that come back together from one call make the replica's forwards smaller (the bench's mixed corpus, with
# 138-token passages: 0.92x when every request shared). 256 characters is about 64 tokens of English.
SHARED_MAX_CHARS = 256


class _Call:
    """One call in flight: its requests' futures, and how many of them still want the answer."""

    def __init__(self, futures: list[asyncio.Future]) -> None:
        self.futures = futures
        self.wanted = len(futures)
        self.cancel: Callable[[], Any] = lambda: None

    def gone(self, future: asyncio.Future) -> None:
        """A request's future is done; once every one was cancelled, the call is cancelled too."""
        if future.cancelled():
            self.wanted -= 1
            if self.wanted == 0:
                self.cancel()


class SharedCalls:
    """`call(job)` queues a job for the call this turn of the loop will send, and returns its answer's future and
    how to cancel it. `send_one(job)` and `send_many(jobs)` start a call and return an awaitable with a
    `cancel()` (a Serve DeploymentResponse); `send_many`'s answer is one result per job, in order."""

    def __init__(self, send_one: Callable[[Any], Any], send_many: Callable[[Sequence[Any]], Any]) -> None:
        self.send_one = send_one
        self.send_many = send_many
        self._queued: list[tuple[Any, asyncio.Future]] = []
        self._answering: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    def call(self, job: Any) -> tuple[Awaitable[Any], Callable[[], Any]]:
        if job.chars > SHARED_MAX_CHARS:  # alone, at once
            response = self.send_one(job)
            return response, response.cancel
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queued.append((job, future))
        if len(self._queued) == 1:  # the first of this turn: send at its end, with whatever joined it
            loop.call_soon(self._send)
        return future, future.cancel

    def _send(self) -> None:
        queued, self._queued = self._queued, []
        queued = [(job, future) for job, future in queued if not future.cancelled()]
        if not queued:
            return
        jobs = [job for job, _ in queued]
        call = _Call([future for _, future in queued])
        try:
            response = self.send_one(jobs[0]) if len(jobs) == 1 else self.send_many(jobs)
        except Exception as exc:  # noqa: BLE001 - raised where a request awaits, never lost in a loop callback
            for future in call.futures:
                future.set_exception(exc)
            return
        call.cancel = response.cancel
        for future in call.futures:
            future.add_done_callback(call.gone)
        task = asyncio.ensure_future(self._answer(response, call.futures, many=len(jobs) > 1))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    @staticmethod
    async def _answer(response: Awaitable[Any], futures: list[asyncio.Future], many: bool) -> None:
        try:
            results = await response
        except asyncio.CancelledError:  # every request went away, and the call with them
            return
        except Exception as exc:  # noqa: BLE001 - each request handles it (a retry, an error answer)
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, result in zip(futures, results if many else [results]):
            if not future.done():
                future.set_result(result)


def room_for(capacity: int | None, holding: int, jobs: int) -> int:
    """How many of a shared call's `jobs` a replica takes while it holds `holding` requests: all where it has no
    bound (`capacity` None), else up to `capacity` in all; the rest are refused as Serve refuses a call."""
    if capacity is None:
        return jobs
    return max(0, min(jobs, capacity - holding))


def capacity_of(max_ongoing_requests: int, max_queued_requests: int) -> int | None:
    """Requests one replica may hold before more are refused: Serve's two bounds, counted in requests
    (a shared call counts once in Serve's); None where the queue is unbounded (-1)."""
    return None if max_queued_requests < 0 else max_ongoing_requests + max_queued_requests
