"""Merges the work that queues while earlier work is in flight into one run when a slot frees.

Ray's @serve.batch forms the next batch as soon as the previous one starts, so under load many small
batches wait behind a running forward. The replica's batch handler hands each of their requests to a
Coalescer (one run in flight) and returns at once; the Coalescer hands the worker everything pending (up
to a cap) when the current run ends, so the next run is as full as the load allows and nothing waits
longer than the current run. A run may hand back each job's result as soon as it has it (`deliver`): a
submission is answered once all of its jobs are, without waiting for the rest of the run. The ingress
can use one too (`max_calls_in_flight`), so that requests arriving while its calls to a model are in
flight go to a replica as one call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")

Entry = tuple[list, asyncio.Future]
Deliver = Callable[[int, R], None]
_MISSING = object()


class Coalescer(Generic[J, R]):
    """`run(jobs, deliver)` returns one result per job, in order, and may call `deliver(index, result)` on
    the loop for any job before that; at most `max_in_flight()` runs at a time."""

    def __init__(self, run: Callable[[list[J], Deliver], Awaitable[list[R]]], size: Callable[[J], int],
                 max_size: Callable[[], int], max_in_flight: Callable[[], int] = lambda: 1) -> None:
        self._run = run
        self._size = size
        self._max_size = max_size
        self._max_in_flight = max_in_flight
        self._pending: list[Entry] = []
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def pending(self) -> int:
        """Submissions waiting for a slot."""
        return len(self._pending)

    def add(self, jobs: list[J]) -> asyncio.Future:
        """Queues `jobs` as one submission; the future gets their results, in order. Cancelling it
        withdraws them (or, once every caller of a run has gone, the run)."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((jobs, future))
        self._pump()
        return future

    async def submit(self, jobs: list[J]) -> list[R]:
        return await self.add(jobs)

    def _pump(self) -> None:
        while self._in_flight < max(1, self._max_in_flight()):
            taken = self._take()
            if not taken:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._dispatch(taken))
            # Once every caller of this run has gone away, nobody needs it: cancel it.
            watch = lambda _, task=task, taken=taken: (  # noqa: E731
                task.cancel() if all(f.cancelled() for _, f in taken) else None)
            for _, future in taken:
                future.add_done_callback(watch)

    def _take(self) -> list[Entry]:
        """Whole pending submissions, oldest first, up to max_size (always at least one); callers that
        went away before their turn are dropped here, so their work is never sent."""
        self._pending = [entry for entry in self._pending if not entry[1].done()]
        taken: list[Entry] = []
        total, cap = 0, self._max_size()
        while self._pending:
            size = sum(self._size(j) for j in self._pending[0][0])
            if taken and total + size > cap:
                break
            taken.append(self._pending.pop(0))
            total += size
        return taken

    async def _dispatch(self, taken: list[Entry]) -> None:
        slots = [[_MISSING] * len(jobs) for jobs, _ in taken]
        left = [len(jobs) for jobs, _ in taken]
        where = [(e, k) for e, (jobs, _) in enumerate(taken) for k in range(len(jobs))]

        def deliver(index: int, result: R) -> None:
            e, k = where[index]
            if slots[e][k] is not _MISSING:
                return
            slots[e][k] = result
            left[e] -= 1
            future = taken[e][1]
            if left[e] == 0 and not future.done():
                future.set_result(slots[e])

        try:
            try:
                results = await self._run([job for jobs, _ in taken for job in jobs], deliver)
            except asyncio.CancelledError:
                for _, future in taken:
                    future.cancel()
                raise
            except Exception as exc:  # the run failed as a whole: every caller still waiting hears why
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                return
            for index, result in enumerate(results):
                deliver(index, result)
            for (_, future), slot in zip(taken, slots):
                if not slot and not future.done():  # a submission with no jobs
                    future.set_result([])
        finally:
            self._in_flight -= 1
            self._pump()
