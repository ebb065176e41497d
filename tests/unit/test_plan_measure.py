"""promptkd.plan.measure.LiveBytes, the instrument bench/plan_check.py measures phases with: counts against
written-out storage sizes, including the cases where an address stops naming one storage."""
from __future__ import annotations

import sys
import threading

import torch

from promptkd.plan.measure import LiveBytes

F32 = 4


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def test_phase_peak_is_the_largest_sum_of_live_storages_above_the_start():
    live = LiveBytes()
    before = torch.zeros(64)
    live.adopt([before])  # made before the mode, counted so that its free is seen
    with live:
        with live.phase("step"):
            a = torch.zeros(1000)            # 4000
            b = a.view(10, 100) + 1          # 4000: 8000 above the start
            del a                            # 4000
            c = b.sum(dim=0).expand(7, 100)  # 400 (a view: one storage)
            del before                       # a storage from before the phase: below the start now
            d = torch.ones(1500)             # 6000: 4000 + 400 + 6000 - 256 = 10144
    assert live.phase_peak["step"] == 10144
    assert live.live == _nbytes(b) + _nbytes(c) + _nbytes(d) == 4000 + 400 + 6000
    del b, c, d
    assert live.live == 0


def test_a_storage_resized_in_place_is_counted_where_it_is_now_and_its_old_address_is_free_for_another():
    live = LiveBytes()
    with live:
        with live.phase("p"):
            a = torch.zeros(256)                # 1024 bytes
            old = a.untyped_storage().data_ptr()
            torch.ones(1024, out=a)             # out= grows the same storage into new memory
            assert a.untyped_storage().data_ptr() != old
            assert live.live == 1024 * F32      # not 1024 * F32 + 1024: the old memory is gone
            b = torch.zeros(256)                # glibc hands the freed 1024 bytes back here
            assert live.live == 1024 * F32 + 256 * F32, (old, b.untyped_storage().data_ptr())
    assert live.phase_peak["p"] == 1280 * F32
    assert live.alive({b.untyped_storage().data_ptr()}) == 1024
    del a
    assert live.live == 1024 and live.addresses() == {b.untyped_storage().data_ptr()}
    del b
    assert live.live == 0 and live.addresses() == set()


def test_two_storages_over_one_buffer_count_once():
    a = torch.zeros(100)
    alias = torch.from_numpy(a.numpy())  # a second storage object over the same memory
    assert alias.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    live = LiveBytes()
    live.adopt([a, alias, a[10:]])
    assert live.live == 400


def test_frees_from_other_threads_are_counted_exactly_while_this_one_counts():
    """A collective's worker thread drops the last reference to tensors counted here while the main thread counts
    new ones (gloo's threads do, in every phase of a 2-rank step). Two threads updating one total must not lose
    updates: with a plain ``+=``/``-=`` in each thread, some runs of this test lost some, and a 2-rank
    optimizer-step peak once measured half its size in CI (the sqrt temporary of Adam lost)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads interleave between almost any two bytecodes
    try:
        for _ in range(12):
            live = LiveBytes()
            doomed = [torch.zeros(1 + i % 5) for i in range(20000)]
            live.adopt(doomed)
            kept = [torch.zeros(1 + i % 3) for i in range(20000)]
            start = threading.Event()

            def drop() -> None:
                start.wait()
                while doomed:
                    doomed.pop()

            worker = threading.Thread(target=drop)
            worker.start()
            start.set()
            for t in kept:
                live.adopt([t])
            worker.join()
            assert live.live == sum(_nbytes(t) for t in kept)
    finally:
        sys.setswitchinterval(interval)
