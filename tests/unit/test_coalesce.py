"""The Coalescer: batches that queue while a run is busy go together into the next run."""

from __future__ import annotations

import asyncio

import pytest

from embserve.coalesce import Coalescer


class Recorder:
    """A run function that records each call and can be held until released."""

    def __init__(self, fail_on: set[str] | None = None, early: set[str] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_on = fail_on or set()
        self.early = early or set()  # jobs delivered ("X!") before the gate, as the engine does

    async def run(self, jobs: list[str], deliver) -> list[str]:
        self.calls.append(list(jobs))
        for index, job in enumerate(jobs):
            if job in self.early:
                deliver(index, job.upper() + "!")
        await self.gate.wait()
        if self.fail_on & set(jobs):
            raise RuntimeError(f"run failed on {sorted(self.fail_on & set(jobs))}")
        return [job.upper() for job in jobs]


def _coalescer(rec: Recorder, cap: int = 100) -> Coalescer[str, str]:
    return Coalescer(rec.run, size=lambda job: 1, max_size=lambda: cap)


async def _held_run(rec: Recorder, co: Coalescer[str, str]) -> asyncio.Task:
    """Submits ["a"] with the gate closed: its run starts and is held until `rec.gate.set()`."""
    rec.gate.clear()
    first = asyncio.create_task(co.submit(["a"]))
    await asyncio.sleep(0)
    return first


def test_a_lone_batch_runs_and_gets_its_results():
    async def main():
        rec = Recorder()
        out = await _coalescer(rec).submit(["a", "b"])
        return rec, out

    rec, out = asyncio.run(main())
    assert out == ["A", "B"]
    assert rec.calls == [["a", "b"]]


def test_batches_queued_during_a_run_go_together_into_the_next_run():
    async def main():
        rec = Recorder()
        co = _coalescer(rec)
        first = await _held_run(rec, co)
        await asyncio.sleep(0)
        assert rec.calls == [["a"]], "the first run started and is held"
        later = [asyncio.create_task(co.submit(batch)) for batch in (["b", "c"], ["d"], ["e", "f"])]
        await asyncio.sleep(0)
        rec.gate.set()
        return rec, await first, await asyncio.gather(*later)

    rec, first, later = asyncio.run(main())
    assert rec.calls == [["a"], ["b", "c", "d", "e", "f"]]
    assert first == ["A"]
    assert later == [["B", "C"], ["D"], ["E", "F"]], "each caller gets exactly its own results, in order"


def test_a_run_takes_whole_batches_up_to_the_cap():
    async def main():
        rec = Recorder()
        co = _coalescer(rec, cap=3)
        first = await _held_run(rec, co)
        await asyncio.sleep(0)
        later = [asyncio.create_task(co.submit(b)) for b in (["b", "c"], ["d"], ["e", "f", "g", "h"], ["i"])]
        await asyncio.sleep(0)
        rec.gate.set()
        await first
        return rec, await asyncio.gather(*later)

    rec, later = asyncio.run(main())
    # b,c + d fill the cap of 3; the 4-job batch exceeds the cap alone but still runs, by itself.
    assert rec.calls == [["a"], ["b", "c", "d"], ["e", "f", "g", "h"], ["i"]]
    assert later == [["B", "C"], ["D"], ["E", "F", "G", "H"], ["I"]]


def test_a_failed_run_fails_only_its_callers_and_later_batches_still_run():
    async def main():
        rec = Recorder(fail_on={"boom"})
        co = _coalescer(rec, cap=2)
        first = await _held_run(rec, co)
        await asyncio.sleep(0)
        doomed = [asyncio.create_task(co.submit(b)) for b in (["boom"], ["x"])]
        survivor = asyncio.create_task(co.submit(["y", "z"]))
        await asyncio.sleep(0)
        rec.gate.set()
        results = await asyncio.gather(first, *doomed, survivor, return_exceptions=True)
        return rec, results

    rec, (first, boom, x, survivor) = asyncio.run(main())
    assert first == ["A"]
    assert isinstance(boom, RuntimeError) and isinstance(x, RuntimeError), "both callers of the failed run hear why"
    assert "boom" in str(x)
    assert survivor == ["Y", "Z"]
    assert rec.calls == [["a"], ["boom", "x"], ["y", "z"]]


def test_submitting_after_a_drain_finished_starts_a_new_one():
    async def main():
        rec = Recorder()
        co = _coalescer(rec)
        one = await co.submit(["a"])
        await asyncio.sleep(0)
        two = await co.submit(["b"])
        return rec, one, two

    rec, one, two = asyncio.run(main())
    assert (one, two) == (["A"], ["B"])
    assert rec.calls == [["a"], ["b"]]


def test_the_cap_counts_job_weights_not_jobs():
    async def main():
        rec = Recorder()
        co = Coalescer(rec.run, size=len, max_size=lambda: 4)  # a job weighs its length
        first = await _held_run(rec, co)
        await asyncio.sleep(0)
        later = [asyncio.create_task(co.submit(b)) for b in (["bb"], ["cc"], ["ddd"])]
        await asyncio.sleep(0)
        rec.gate.set()
        await first
        await asyncio.gather(*later)
        return rec

    assert asyncio.run(main()).calls == [["a"], ["bb", "cc"], ["ddd"]]


def test_a_caller_that_left_before_its_turn_is_never_sent():
    async def main():
        rec = Recorder()
        co = _coalescer(rec)
        first = await _held_run(rec, co)
        gone = asyncio.create_task(co.submit(["b"]))
        kept = asyncio.create_task(co.submit(["c"]))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        rec.gate.set()
        return rec, await first, await kept

    rec, first, kept = asyncio.run(main())
    assert rec.calls == [["a"], ["c"]], "'b' left while queued: nobody computes it"
    assert (first, kept) == (["A"], ["C"])


def test_several_runs_in_flight_and_what_queues_behind_them_goes_together():
    async def main():
        rec = Recorder()
        rec.gate.clear()
        co = Coalescer(rec.run, size=lambda job: 1, max_size=lambda: 100, max_in_flight=lambda: 2)
        first = [asyncio.create_task(co.submit([x])) for x in "ab"]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert rec.calls == [["a"], ["b"]], "two slots: two runs at once"
        assert co.in_flight == 2
        later = [asyncio.create_task(co.submit([x])) for x in "cde"]
        await asyncio.sleep(0)
        assert len(rec.calls) == 2, "no slot free: c, d and e wait"
        rec.gate.set()
        out = await asyncio.gather(*first, *later)
        return rec, out, co.in_flight

    rec, out, in_flight = asyncio.run(main())
    assert rec.calls == [["a"], ["b"], ["c", "d", "e"]]
    assert out == [["A"], ["B"], ["C"], ["D"], ["E"]]
    assert in_flight == 0


def test_a_run_whose_callers_all_left_is_cancelled_and_frees_its_slot():
    async def main():
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def run(jobs, deliver):
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return jobs

        co = Coalescer(run, size=lambda job: 1, max_size=lambda: 100)
        gone = asyncio.create_task(co.submit(["a"]))
        await started.wait()
        gone.cancel()
        await asyncio.wait_for(cancelled.wait(), 1)
        await asyncio.sleep(0)
        return co.in_flight

    assert asyncio.run(main()) == 0


def test_a_run_is_not_cancelled_while_one_of_its_callers_still_waits():
    async def main():
        rec = Recorder()
        co = _coalescer(rec)
        first = await _held_run(rec, co)
        gone = asyncio.create_task(co.submit(["b"]))
        kept = asyncio.create_task(co.submit(["c"]))
        await asyncio.sleep(0)
        rec.gate.set()
        assert await first == ["A"]
        rec.gate.clear()
        await asyncio.sleep(0)
        assert rec.calls[-1] == ["b", "c"]
        gone.cancel()
        await asyncio.sleep(0)
        rec.gate.set()
        return await kept

    assert asyncio.run(main()) == ["C"]


async def _second_run_held(rec: Recorder, co: Coalescer[str, str], *batches: list[str]) -> list[asyncio.Task]:
    """`batches` queue behind a held first run, which then ends; their run starts and is held."""
    first = await _held_run(rec, co)
    later = [asyncio.create_task(co.submit(b)) for b in batches]
    await asyncio.sleep(0)
    held, rec.gate = rec.gate, asyncio.Event()  # the next run waits on a gate of its own
    held.set()
    assert await first == ["A"]
    for _ in range(3):
        await asyncio.sleep(0)
    assert rec.calls[-1] == [job for b in batches for job in b], "one run holds every batch"
    return later


def test_a_caller_is_answered_once_its_jobs_are_delivered_while_the_run_goes_on():
    async def main():
        rec = Recorder(early={"b", "c"})
        co = _coalescer(rec)
        answered, waiting = await _second_run_held(rec, co, ["b", "c"], ["d"])
        assert answered.done() and answered.result() == ["B!", "C!"]
        assert not waiting.done(), "d is not delivered yet: its caller waits for the run"
        assert co.in_flight == 1
        rec.gate.set()
        return await waiting

    assert asyncio.run(main()) == ["D"]


def test_a_caller_waits_for_all_of_its_jobs_and_keeps_what_was_delivered_first():
    async def main():
        rec = Recorder(early={"b"})
        co = _coalescer(rec)
        [half] = await _second_run_held(rec, co, ["b", "c"])
        assert not half.done(), "c is still running"
        rec.gate.set()
        return await half

    assert asyncio.run(main()) == ["B!", "C"], "the run's own result for b does not replace the delivered one"


def test_a_run_that_fails_after_delivering_fails_only_the_callers_still_waiting():
    async def main():
        rec = Recorder(fail_on={"d"}, early={"b"})
        co = _coalescer(rec)
        answered, doomed = await _second_run_held(rec, co, ["b"], ["d"])
        rec.gate.set()
        return await answered, await asyncio.gather(doomed, return_exceptions=True)

    answered, [doomed] = asyncio.run(main())
    assert answered == ["B!"]
    assert isinstance(doomed, RuntimeError)


def test_an_empty_submission_is_answered_with_no_results():
    async def main():
        return await _coalescer(Recorder()).submit([])

    assert asyncio.run(main()) == []
