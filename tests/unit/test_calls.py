"""The ingress's coalescer (embserve/calls.py): small requests to one model share calls while `calls` are in
flight; each is still answered, failed and given up on its own. A fake replica stands in for the Serve
handle: a call is a future the test settles."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import pytest

from embserve.calls import CALLS_PER_REPLICA, SMALL_INPUTS, Coalescer, calls_in_flight, shares_calls
from embserve.errors import Overloaded


@dataclass(eq=False)
class Job:
    texts: list[str]
    waited_s: float = 0.0

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def chars(self) -> int:
        return sum(map(len, self.texts))


class FakeCall:
    """A call in flight: awaitable, cancellable, settled by the test."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.future = asyncio.get_running_loop().create_future()
        self.cancelled = False

    def __await__(self):
        return self.future.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.future.cancel()

    def answer(self) -> None:
        self.future.set_result([f"vectors of {job.texts}" for job in self.jobs])


class Replica:
    def __init__(self) -> None:
        self.calls: list[FakeCall] = []

    def send(self, jobs: list[Job]) -> FakeCall:
        call = FakeCall(jobs)
        self.calls.append(call)
        return call


def aio(test):
    """Runs an async test on its own event loop (the project has no pytest asyncio plugin)."""
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())
    return run


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def job(*texts: str) -> Job:
    return Job(list(texts))


@aio
async def test_a_lone_request_goes_at_once_alone():
    replica = Replica()
    coalescer = Coalescer(replica.send, lambda: 2, lambda: 32)
    answer, _ = coalescer.submit(job("a"))
    await settle()
    assert [c.jobs[0].texts for c in replica.calls] == [["a"]]
    replica.calls[0].answer()
    assert await answer == "vectors of ['a']"
    assert coalescer.in_flight == 0


@aio
async def test_requests_that_arrive_while_every_call_is_out_go_together_in_the_next():
    replica = Replica()
    coalescer = Coalescer(replica.send, lambda: 2, lambda: 32)
    first = [coalescer.submit(job(t))[0] for t in ("a", "b")]  # one call each: two slots (8 inputs go at once)
    await settle()
    waiting = [coalescer.submit(job(t))[0] for t in ("c", "d", "e")]
    await settle()
    assert len(replica.calls) == 2 and coalescer.waiting == 3
    replica.calls[1].answer()  # a slot frees: everything waiting goes, in arrival order, as one call
    await settle()
    assert len(replica.calls) == 3
    assert [j.texts for j in replica.calls[2].jobs] == [["c"], ["d"], ["e"]]
    assert all(j.waited_s > 0 for j in replica.calls[2].jobs)
    replica.calls[2].answer()
    assert await asyncio.gather(*waiting) == ["vectors of ['c']", "vectors of ['d']", "vectors of ['e']"]
    assert not first[0].done()  # its own call is still out
    replica.calls[0].answer()
    assert await first[0] == "vectors of ['a']"
    assert (coalescer.sent_calls, coalescer.sent_requests) == (3, 5)


@aio
async def test_a_call_holds_at_most_max_inputs_and_the_rest_go_in_the_next():
    replica = Replica()
    coalescer = Coalescer(replica.send, lambda: 1, lambda: 16)
    coalescer.submit(job("x"))
    await settle()
    for texts in (["a", "b"], ["c"]):
        coalescer.submit(job(*texts))
    await settle()
    assert len(replica.calls) == 1  # 3 inputs wait: less than a quarter of a call
    coalescer.submit(job(*"defghijklmnopq"))  # 17 inputs wait: more than a call holds
    await settle()
    assert [[len(j) for j in c.jobs] for c in replica.calls[1:]] == [[2, 1], [14]]


@aio
async def test_requests_that_fill_a_quarter_of_a_call_go_at_once_whatever_is_in_flight():
    """The replica plans its forwards over what it holds: a quarter of a call's worth waiting here goes to it."""
    replica = Replica()
    coalescer = Coalescer(replica.send, lambda: 1, lambda: 16)
    coalescer.submit(job("x"))
    await settle()
    for text in "abc":
        coalescer.submit(job(text))
    await settle()
    assert len(replica.calls) == 1 and coalescer.waiting == 3
    coalescer.submit(job("d"))
    await settle()
    assert [j.texts for j in replica.calls[1].jobs] == [["a"], ["b"], ["c"], ["d"]]
    assert coalescer.in_flight == 2 and coalescer.waiting == 0


@aio
async def test_a_request_larger_than_max_inputs_still_goes_alone():
    replica = Replica()
    coalescer = Coalescer(replica.send, lambda: 1, lambda: 2)
    coalescer.submit(job("a", "b", "c"))
    await settle()
    assert [j.texts for j in replica.calls[0].jobs] == [["a", "b", "c"]]


@aio
async def test_a_failed_call_fails_each_of_its_requests_and_frees_its_slot():
    replica = Replica()
    coalescer = Coalescer(replica.send, lambda: 1, lambda: 32)
    coalescer.submit(job("x"))
    await settle()
    answers = [coalescer.submit(job(t))[0] for t in ("a", "b")]
    replica.calls[0].answer()
    await settle()
    replica.calls[1].future.set_exception(RuntimeError("replica died"))
    for answer in answers:
        with pytest.raises(RuntimeError, match="replica died"):
            await answer
    assert coalescer.in_flight == 0
    later, _ = coalescer.submit(job("c"))
    await settle()
    replica.calls[2].answer()
    assert await later == "vectors of ['c']"


@aio
async def test_a_request_given_up_while_waiting_never_leaves_the_ingress():
    replica = Replica()
    coalescer = Coalescer(replica.send, lambda: 1, lambda: 32)
    coalescer.submit(job("x"))
    await settle()
    _, give_up = coalescer.submit(job("gone"))
    kept, _ = coalescer.submit(job("kept"))
    give_up()
    await settle()
    assert coalescer.waiting == 1
    replica.calls[0].answer()
    await settle()
    assert [j.texts for j in replica.calls[1].jobs] == [["kept"]]
    replica.calls[1].answer()
    assert await kept == "vectors of ['kept']"


@aio
async def test_a_timeout_while_waiting_takes_the_request_out_of_the_queue():
    replica = Replica()
    coalescer = Coalescer(replica.send, lambda: 1, lambda: 32)
    coalescer.submit(job("x"))
    await settle()
    answer, _ = coalescer.submit(job("late"))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(answer, timeout=0.01)
    await settle()
    assert coalescer.waiting == 0


@aio
async def test_a_shared_call_is_cancelled_only_when_every_one_of_its_requests_is_gone():
    replica = Replica()
    coalescer = Coalescer(replica.send, lambda: 1, lambda: 32)
    coalescer.submit(job("x"))
    await settle()
    (a, give_up_a), (b, give_up_b) = coalescer.submit(job("a")), coalescer.submit(job("b"))
    replica.calls[0].answer()
    await settle()
    shared = replica.calls[1]
    give_up_a()
    await settle()
    assert not shared.cancelled and a.cancelled() and not b.done()  # b still waits for its answer
    give_up_b()
    await settle()
    assert shared.cancelled
    assert coalescer.in_flight == 0


@aio
async def test_the_call_of_a_lone_request_is_cancelled_when_it_is_given_up():
    replica = Replica()
    coalescer = Coalescer(replica.send, lambda: 2, lambda: 32)
    _, give_up = coalescer.submit(job("a"))
    await settle()
    give_up()
    await settle()
    assert replica.calls[0].cancelled


@aio
async def test_more_waiting_requests_than_allowed_are_refused_at_once():
    replica = Replica()
    coalescer = Coalescer(replica.send, lambda: 1, lambda: 32, max_waiting=2)
    coalescer.submit(job("x"))
    await settle()
    coalescer.submit(job("a"))
    coalescer.submit(job("b"))
    with pytest.raises(Overloaded):
        coalescer.submit(job("c"))


@aio
async def test_more_calls_allowed_live_start_at_once():
    replica = Replica()
    calls = {"n": 1}
    coalescer = Coalescer(replica.send, lambda: calls["n"], lambda: 32)
    coalescer.submit(job("x"))
    await settle()
    coalescer.submit(job("a"))
    await settle()
    assert len(replica.calls) == 1
    calls["n"] = 2
    coalescer.submit(job("b"))
    await settle()
    assert [j.texts for j in replica.calls[1].jobs] == [["a"], ["b"]]


def test_only_small_requests_share_calls():
    assert shares_calls(job("a"))
    assert shares_calls(Job(["a"] * SMALL_INPUTS))
    assert not shares_calls(Job(["a"] * (SMALL_INPUTS + 1)))
    assert not shares_calls(job("a" * 20_000))


def test_calls_in_flight_by_default_follow_a_fixed_deployment_and_stay_off_for_an_autoscaled_one():
    assert calls_in_flight(None, {"num_replicas": 1})[0] == CALLS_PER_REPLICA
    assert calls_in_flight(None, {"num_replicas": 3})[0] == 3 * CALLS_PER_REPLICA
    calls, why = calls_in_flight(None, {"autoscaling_config": {"min_replicas": 1}})
    assert calls == 0 and "autoscal" in why
    assert calls_in_flight(None, {"num_replicas": "auto"})[0] == 0
    assert calls_in_flight(0, {"num_replicas": 1}) == (0, "set")
    assert calls_in_flight(6, {"autoscaling_config": {}}) == (6, "set")
