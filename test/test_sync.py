"""Stereo synchronisation, CameraInfo lookup, rate-limited logs and the latest-pair-wins worker (no ROS)."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from lsm_ros.ros.sync import (DROP_DUPLICATE, DROP_LATE, DROP_QUEUE_FULL, DROP_SUPERSEDED, CameraInfoCache,
                              LatestPairWorker, RateLimitedLog, StereoSynchronizer)

pytestmark = pytest.mark.timeout(60)
MS = 1_000_000


def pairs_of(results) -> list[tuple[str, str]]:
    return [(r.pair.left, r.pair.right) for r in results if r.pair is not None]


def test_exact_pairs_equal_stamps_only() -> None:
    sync = StereoSynchronizer(approximate=False, tolerance_ns=50 * MS)
    assert sync.tolerance_ns == 0
    assert sync.add_left(100, 'L100').pair is None
    assert sync.add_right(101, 'R101').pair is None
    result = sync.add_right(100, 'R100')
    assert (result.pair.left, result.pair.right, result.pair.stamp_ns) == ('L100', 'R100', 100)
    assert sync.pairs_formed == 1


def test_approximate_tolerance_edges() -> None:
    sync = StereoSynchronizer(approximate=True, tolerance_ns=20 * MS)
    sync.add_left(1000 * MS, 'L0')
    assert sync.add_right(1020 * MS, 'R0').pair is not None                   # exactly the tolerance: paired
    sync.add_left(2000 * MS, 'L1')
    assert sync.add_right(2020 * MS + 1, 'R1 late').pair is None              # 1 ns beyond: not paired
    result = sync.add_right(1990 * MS, 'R1')                                 # 10 ms before L1: paired
    assert (result.pair.left, result.pair.right) == ('L1', 'R1')
    assert (result.pair.left_stamp_ns, result.pair.right_stamp_ns) == (2000 * MS, 1990 * MS)
    assert sync.queued('right') == 1                                         # 'R1 late' is newer: still queued


def test_approximate_picks_the_closest_partner() -> None:
    sync = StereoSynchronizer(tolerance_ns=30 * MS)
    sync.add_right(990 * MS, 'R990')
    sync.add_right(1005 * MS, 'R1005')
    result = sync.add_left(1000 * MS, 'L1000')
    assert (result.pair.left, result.pair.right) == ('L1000', 'R1005')
    assert sync.drop_counts[DROP_SUPERSEDED] == 1                           # R990 can no longer pair
    assert sync.queued('right') == 0


def test_out_of_order_arrival() -> None:
    sync = StereoSynchronizer(tolerance_ns=0)
    results = [sync.add_left(200, 'L200'), sync.add_left(100, 'L100'), sync.add_right(100, 'R100'),
               sync.add_right(200, 'R200')]
    assert pairs_of(results) == [('L100', 'R100'), ('L200', 'R200')]
    assert sum(sync.drop_counts.values()) == 0


def test_each_image_is_paired_at_most_once_and_late_ones_are_dropped() -> None:
    sync = StereoSynchronizer(tolerance_ns=10)
    assert sync.add_left(100, 'L').pair is None
    assert sync.add_right(100, 'R').pair is not None
    assert sync.add_right(100, 'R again').rejected == DROP_LATE                # not newer than the pair
    assert sync.add_left(95, 'L old').rejected == DROP_LATE
    assert sync.add_left(200, 'L2').pair is None
    assert sync.add_left(200, 'L2 dup').rejected == DROP_DUPLICATE
    assert pairs_of([sync.add_right(205, 'R2')]) == [('L2', 'R2')]
    assert sync.drop_counts == {DROP_QUEUE_FULL: 0, DROP_SUPERSEDED: 0, DROP_LATE: 2, DROP_DUPLICATE: 1}


def test_bounded_queues_drop_the_oldest() -> None:
    sync = StereoSynchronizer(tolerance_ns=0, queue_size=3)
    for stamp in range(1, 6):
        sync.add_left(stamp, f'L{stamp}')
    assert sync.queued('left') == 3
    assert sync.drop_counts[DROP_QUEUE_FULL] == 2
    assert sync.add_right(1, 'R1').pair is None                              # L1 was evicted
    assert pairs_of([sync.add_right(4, 'R4')]) == [('L4', 'R4')]
    assert sync.drop_counts[DROP_SUPERSEDED] == 2                           # L3 and R1 are older than the pair
    assert sync.queued('left') == 1 and sync.queued('right') == 0


def test_reset_forgets_queues_and_last_pair() -> None:
    sync = StereoSynchronizer(tolerance_ns=0)
    sync.add_left(10, 'L'), sync.add_right(10, 'R'), sync.add_left(20, 'L20')
    sync.reset()
    assert sync.queued('left') == 0
    assert sync.add_left(5, 'L5').rejected is None                          # older stamps accepted again


def test_synchronizer_is_thread_safe() -> None:
    sync = StereoSynchronizer(tolerance_ns=0, queue_size=1000)
    pairs: list = []
    lock = threading.Lock()

    def feed(side: str) -> None:
        for stamp in range(1, 501):
            result = sync.add(side, stamp, f'{side}{stamp}')
            if result.pair is not None:
                with lock:
                    pairs.append(result.pair)
    threads = [threading.Thread(target=feed, args=(side,)) for side in ('left', 'right')]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stamps = [p.stamp_ns for p in pairs]
    assert len(stamps) == len(set(stamps)) and all(p.left_stamp_ns == p.right_stamp_ns for p in pairs)
    assert sync.pairs_formed == len(pairs) > 0
    # every image is accounted for exactly once: paired, still queued or dropped
    assert 2 * len(pairs) + sync.queued('left') + sync.queued('right') + sum(sync.drop_counts.values()) == 1000


def test_invalid_synchronizer_arguments() -> None:
    with pytest.raises(ValueError):
        StereoSynchronizer(queue_size=0)
    with pytest.raises(ValueError):
        StereoSynchronizer(tolerance_ns=-1)
    with pytest.raises(ValueError):
        StereoSynchronizer().add('middle', 1, 'x')  # type: ignore[arg-type]


def test_camera_info_cache_lookup_with_tolerance() -> None:
    cache: CameraInfoCache[str] = CameraInfoCache(history=3)
    assert cache.latest('left') is None and cache.lookup('left', 0, 10) is None
    for stamp in (100, 200, 300, 400):
        cache.update('left', stamp, f'info{stamp}')
    assert cache.latest('left') == 'info400'
    assert cache.lookup('left', 290, 20) == 'info300'
    assert cache.lookup('left', 250, 50) == 'info300'          # equally close: the latest received
    assert cache.lookup('left', 100, 50) is None                # beyond the history (3)
    assert cache.lookup('left', 1000, 600) == 'info400'
    assert cache.lookup('left', 1000, 599) is None
    assert cache.lookup('right', 300, 1000) is None


class ListLogger:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def warning(self, message: str) -> None:
        self.messages.append(message)


def test_rate_limited_log_counts_suppressed_messages() -> None:
    now = [0.0]
    logger = ListLogger()
    log = RateLimitedLog(logger, 5.0, clock=lambda: now[0])
    assert log.warning('a', 'first')
    assert not log.warning('a', 'second')
    assert log.warning('b', 'other key')
    now[0] = 5.0
    assert log.warning('a', 'third')
    assert logger.messages == ['first', 'other key', 'third (1 similar message(s) suppressed in the last 5 s)']


def test_worker_processes_only_the_latest_pending_item() -> None:
    release = threading.Event()
    started = threading.Event()
    done: list[int] = []

    def work(item: int) -> None:
        started.set()
        if item == 0:
            release.wait(5)
        done.append(item)
    worker = LatestPairWorker(work, logger=ListLogger()).start()
    try:
        assert worker.submit(0) is False
        assert started.wait(5)
        assert worker.busy
        replaced = [worker.submit(i) for i in range(1, 6)]   # arrive while 0 runs
        assert replaced == [False, True, True, True, True]
        release.set()
        assert worker.wait_idle(5)
        assert done == [0, 5]                                # never a backlog: 1..4 dropped
        assert worker.stats() == dict(submitted=6, processed=2, dropped=4, failed=0, discarded_on_stop=0)
    finally:
        assert worker.stop(5)


def test_worker_survives_exceptions_and_logs_them_rate_limited() -> None:
    logger = ListLogger()
    done: list[int] = []

    def work(item: int) -> None:
        if item < 3:
            raise RuntimeError(f'boom {item}')
        done.append(item)
    worker = LatestPairWorker(work, logger=logger, log_interval_s=60.0).start()
    try:
        for item in range(4):
            worker.submit(item)
            assert worker.wait_idle(5)
        assert done == [3] and worker.running
        assert worker.failed == 3 and 'RuntimeError: boom 2' in worker.last_error
        assert len(logger.messages) == 1 and 'boom 0' in logger.messages[0]   # rate-limited
    finally:
        worker.stop(5)


def test_worker_stops_cleanly_and_refuses_new_items() -> None:
    release = threading.Event()

    def work(item: int) -> None:
        release.wait(5)
    worker = LatestPairWorker(work, logger=logging.getLogger('test')).start()
    worker.submit(1)
    time.sleep(0.05)
    worker.submit(2)                                         # pending while 1 runs
    stopper = threading.Thread(target=worker.stop, args=(5,))
    stopper.start()
    release.set()
    stopper.join(5)
    assert not worker.running
    assert worker.stats()['discarded_on_stop'] == 1
    with pytest.raises(RuntimeError, match='stopped'):
        worker.submit(3)
    assert LatestPairWorker(work, logger=ListLogger()).stop(1)   # never started: nothing to join
