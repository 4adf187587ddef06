"""Merges the batches that queue while the model is busy into one run when it is free.

Ray's @serve.batch forms the next batch as soon as the previous one starts, so under load many small
batches wait behind a running forward. With `max_concurrent_batches` > 1 they all reach the handler;
the Coalescer holds them and hands the worker everything pending (up to a cap) at once, so the next
run is as full as the load allows and no batch waits longer than the current forward.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")


class Coalescer(Generic[J, R]):
    def __init__(self, run: Callable[[list[J]], Awaitable[list[R]]], size: Callable[[J], int],
                 max_size: Callable[[], int]) -> None:
        self._run = run
        self._size = size
        self._max_size = max_size
        self._pending: list[tuple[list[J], asyncio.Future]] = []
        self._draining = False

    async def submit(self, jobs: list[J]) -> list[R]:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((jobs, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    def _take(self) -> list[tuple[list[J], asyncio.Future]]:
        """Whole pending batches, oldest first, up to max_size (always at least one)."""
        taken, total, cap = [], 0, self._max_size()
        while self._pending:
            size = sum(self._size(j) for j in self._pending[0][0])
            if taken and total + size > cap:
                break
            taken.append(self._pending.pop(0))
            total += size
        return taken

    async def _drain(self) -> None:
        try:
            while self._pending:
                taken = self._take()
                jobs = [job for batch, _ in taken for job in batch]
                try:
                    results = await self._run(jobs)
                except Exception as exc:  # the run failed as a whole: every caller in it hears why
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for batch, future in taken:
                    if not future.done():
                        future.set_result(results[start : start + len(batch)])
                    start += len(batch)
        finally:
            self._draining = False
