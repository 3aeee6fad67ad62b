"""The shipper that takes a monitor's report building off the training thread: order kept, never blocks, a flood
drops the oldest droppable jobs (counted), and its books balance so that ``wait``/``close`` return."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from gfservice.training.shipper import Shipper


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 400), limit=st.integers(1, 16), keep_every=st.integers(1, 7))
def test_a_flood_keeps_order_counts_its_drops_and_drains(n, limit, keep_every):
    done: list[int] = []
    errors: list[str] = []
    s = Shipper(errors.append, limit=limit)

    def job(i: int) -> None:
        time.sleep(0.00002)
        done.append(i)

    t0 = time.perf_counter()
    for i in range(n):
        s.put(lambda i=i: job(i), droppable=i % keep_every != 0)
    assert time.perf_counter() - t0 < 1.0 + n * 0.001          # put never waits for the worker
    assert s.close(10.0) and s.pending == 0
    assert done == sorted(done) and len(done) + s.dropped == n  # in order; every job run or counted as dropped
    assert all(i in done for i in range(0, n, keep_every))       # a job that must not be dropped never is
    assert errors == []


def test_a_job_that_raises_is_counted_and_the_worker_goes_on():
    errors: list[str] = []
    done: list[int] = []
    s = Shipper(errors.append)
    s.put(lambda: 1 / 0)
    s.put(lambda: done.append(1))
    assert s.wait(5.0) and done == [1] and errors == ["shipping a step"]
    assert s.close()
