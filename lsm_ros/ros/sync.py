"""Stereo synchronisation and the inference worker: plain Python (no rclpy), unit-testable alone.

- :class:`StereoSynchronizer` pairs left and right images by stamp (exact, or approximate within a
  tolerance) with bounded queues; every image is paired at most once and every drop is counted by reason.
- :class:`CameraInfoCache` keeps the recent CameraInfo of each side and finds the one for an image stamp.
- :class:`LatestPairWorker` runs the (slow) reconstruction on one background thread and always takes the
  newest pending pair: while it works, newer pairs overwrite the pending slot (the overwritten one is counted
  as dropped), so there is never a backlog.
- :class:`RateLimitedLog` logs repeated messages of one kind at most once per interval.

Stamps are integer nanoseconds (exact comparisons; ``builtin_interfaces/Time`` converts losslessly).
"""
from __future__ import annotations

import bisect
import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Literal, Protocol, TypeVar

Item = TypeVar('Item')
Side = Literal['left', 'right']
SIDES: tuple[Side, Side] = ('left', 'right')

# Reasons for which the synchronizer drops an image without pairing it.
DROP_QUEUE_FULL = 'queue_full'          # oldest image of a full side queue evicted
DROP_SUPERSEDED = 'superseded'          # still unpaired when a newer pair was formed: it can no longer pair
DROP_LATE = 'late'                      # arrived with a stamp not newer than the last pair's
DROP_DUPLICATE = 'duplicate_stamp'      # an image with the same stamp is already queued on that side
SYNC_DROP_REASONS = (DROP_QUEUE_FULL, DROP_SUPERSEDED, DROP_LATE, DROP_DUPLICATE)


class WarningLogger(Protocol):
    """What the worker and :class:`RateLimitedLog` need of a logger (``logging.Logger`` or an rclpy logger)."""

    def warning(self, message: str) -> Any: ...


@dataclass(frozen=True)
class StereoPair(Generic[Item]):
    """A left and a right item whose stamps (ns) matched."""

    left: Item
    right: Item
    left_stamp_ns: int
    right_stamp_ns: int

    @property
    def stamp_ns(self) -> int:
        """The pair's stamp: the left image's (the products are stamped with it)."""
        return self.left_stamp_ns


@dataclass(frozen=True)
class SyncResult(Generic[Item]):
    """What adding one item did: the pair it completed, or why the item itself was dropped."""

    pair: StereoPair[Item] | None = None
    rejected: str | None = None   # DROP_LATE or DROP_DUPLICATE when the added item was not queued


class StereoSynchronizer(Generic[Item]):
    """Pairs left/right items by stamp. Thread-safe.

    ``tolerance_ns``: largest |left - right| stamp difference paired (inclusive); ``approximate=False``
    pairs equal stamps only. An arriving item is paired at once with the closest unpaired item of the other
    side within the tolerance (so the tolerance should stay below half the frame period). Items older than a
    formed pair are dropped (``superseded``), as are items not newer than it (``late``). Each side keeps at
    most ``queue_size`` unpaired items, sorted by stamp (out-of-order arrival is fine); the oldest goes first.
    """

    def __init__(self, *, approximate: bool = True, tolerance_ns: int = 20_000_000, queue_size: int = 10) -> None:
        if queue_size < 1:
            raise ValueError(f'queue_size must be >= 1, got {queue_size}')
        if tolerance_ns < 0:
            raise ValueError(f'tolerance_ns must be >= 0, got {tolerance_ns}')
        self.approximate = approximate
        self.tolerance_ns = int(tolerance_ns) if approximate else 0
        self.queue_size = int(queue_size)
        self._queues: dict[Side, list[tuple[int, Item]]] = {side: [] for side in SIDES}
        self._last_pair_stamps: dict[Side, int | None] = {side: None for side in SIDES}
        self._drops: collections.Counter[str] = collections.Counter()
        self._pairs = 0
        self._lock = threading.Lock()

    def add_left(self, stamp_ns: int, item: Item) -> SyncResult[Item]:
        """Queue a left item; the result holds the pair it completes, if any."""
        return self.add('left', stamp_ns, item)

    def add_right(self, stamp_ns: int, item: Item) -> SyncResult[Item]:
        """Queue a right item; the result holds the pair it completes, if any."""
        return self.add('right', stamp_ns, item)

    def add(self, side: Side, stamp_ns: int, item: Item) -> SyncResult[Item]:
        """Queue an item of ``side`` ('left' or 'right'); the result holds the pair it completes, if any."""
        if side not in SIDES:
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        other: Side = 'right' if side == 'left' else 'left'
        stamp_ns = int(stamp_ns)
        with self._lock:
            last = self._last_pair_stamps[side]
            if last is not None and stamp_ns <= last:
                self._drops[DROP_LATE] += 1
                return SyncResult(rejected=DROP_LATE)
            queue = self._queues[side]
            stamps = [s for s, _ in queue]
            if stamp_ns in stamps:
                self._drops[DROP_DUPLICATE] += 1
                return SyncResult(rejected=DROP_DUPLICATE)
            partner_index = self._closest_within_tolerance(self._queues[other], stamp_ns)
            if partner_index is None:
                queue.insert(bisect.bisect(stamps, stamp_ns), (stamp_ns, item))
                if len(queue) > self.queue_size:
                    del queue[0]
                    self._drops[DROP_QUEUE_FULL] += 1
                return SyncResult()
            partner_stamp, partner = self._queues[other].pop(partner_index)
            self._pairs += 1
            self._last_pair_stamps[side], self._last_pair_stamps[other] = stamp_ns, partner_stamp
            for s, q in ((side, queue), (other, self._queues[other])):
                newer = [(t, x) for t, x in q if t > self._last_pair_stamps[s]]
                self._drops[DROP_SUPERSEDED] += len(q) - len(newer)
                q[:] = newer
            if side == 'left':
                return SyncResult(pair=StereoPair(item, partner, stamp_ns, partner_stamp))
            return SyncResult(pair=StereoPair(partner, item, partner_stamp, stamp_ns))

    def _closest_within_tolerance(self, queue: list[tuple[int, Item]], stamp_ns: int) -> int | None:
        best, best_gap = None, None
        for index, (other_stamp, _) in enumerate(queue):
            gap = abs(other_stamp - stamp_ns)
            if gap <= self.tolerance_ns and (best_gap is None or gap < best_gap):
                best, best_gap = index, gap
        return best

    @property
    def drop_counts(self) -> dict[str, int]:
        """Dropped items per reason (every reason of :data:`SYNC_DROP_REASONS` present)."""
        with self._lock:
            return {reason: self._drops[reason] for reason in SYNC_DROP_REASONS}

    @property
    def pairs_formed(self) -> int:
        with self._lock:
            return self._pairs

    def queued(self, side: Side) -> int:
        """Unpaired items waiting on ``side``."""
        with self._lock:
            return len(self._queues[side])

    def reset(self) -> None:
        """Forget queued items and the last pair (e.g. after a clock jump); counters are kept."""
        with self._lock:
            for side in SIDES:
                self._queues[side].clear()
                self._last_pair_stamps[side] = None


class CameraInfoCache(Generic[Item]):
    """The most recent CameraInfo messages of each side (``history`` per side), looked up by stamp. Thread-safe."""

    def __init__(self, history: int = 16) -> None:
        if history < 1:
            raise ValueError(f'history must be >= 1, got {history}')
        self._infos: dict[Side, collections.deque[tuple[int, Item]]] = {
            side: collections.deque(maxlen=history) for side in SIDES}
        self._lock = threading.Lock()

    def update(self, side: Side, stamp_ns: int, info: Item) -> None:
        """Store a CameraInfo of ``side`` received with stamp ``stamp_ns``."""
        with self._lock:
            self._infos[side].append((int(stamp_ns), info))

    def latest(self, side: Side) -> Item | None:
        """The last CameraInfo received on ``side`` (None before the first)."""
        with self._lock:
            infos = self._infos[side]
            return infos[-1][1] if infos else None

    def lookup(self, side: Side, stamp_ns: int, tolerance_ns: int) -> Item | None:
        """The CameraInfo of ``side`` closest in stamp to ``stamp_ns`` within ``tolerance_ns`` (inclusive);
        among equally close ones the latest received. None when there is none."""
        with self._lock:
            best, best_gap = None, None
            for info_stamp, info in self._infos[side]:
                gap = abs(info_stamp - int(stamp_ns))
                if gap <= tolerance_ns and (best_gap is None or gap <= best_gap):
                    best, best_gap = info, gap
            return best


class RateLimitedLog:
    """Logs a message of a given ``key`` at most once per ``interval_s``; says how many were suppressed."""

    def __init__(self, logger: WarningLogger, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = float(interval_s)
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def warning(self, key: str, message: str) -> bool:
        """Log ``message`` as a warning unless ``key`` was logged less than ``interval_s`` ago (True: logged)."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] += 1
                return False
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message = f'{message} ({suppressed} similar message(s) suppressed in the last {self.interval_s:g} s)'
        self.logger.warning(message)
        return True


class LatestPairWorker(Generic[Item]):
    """One background thread running ``work(item)`` on the newest submitted item ("latest pair wins").

    :meth:`submit` never blocks: the item goes into a single pending slot; an item still pending there is
    replaced and counted in ``dropped``. Exceptions raised by ``work`` are caught, counted in ``failed`` and
    logged (rate-limited, ``log_interval_s``); the thread keeps running. :meth:`stop` ends the thread after
    the current item (the pending one is discarded and counted in ``discarded_on_stop``).
    """

    def __init__(self, work: Callable[[Item], None], *, logger: WarningLogger, name: str = 'latest_pair_worker',
                 log_interval_s: float = 5.0) -> None:
        self._work = work
        self._log = RateLimitedLog(logger, log_interval_s)
        self._condition = threading.Condition()
        self._pending: Item | None = None
        self._has_pending = False
        self._busy = False
        self._stopping = False
        self.submitted = 0
        self.processed = 0
        self.dropped = 0
        self.failed = 0
        self.discarded_on_stop = 0
        self.last_error: str = ''
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> 'LatestPairWorker[Item]':
        self._thread.start()
        return self

    def submit(self, item: Item) -> bool:
        """Make ``item`` the pending one; True when it replaced (dropped) an older pending item."""
        with self._condition:
            if self._stopping:
                raise RuntimeError('LatestPairWorker is stopped')
            replaced = self._has_pending
            if replaced:
                self.dropped += 1
            self._pending, self._has_pending = item, True
            self.submitted += 1
            self._condition.notify_all()
            return replaced

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._has_pending and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                item, self._pending, self._has_pending = self._pending, None, False
                self._busy = True
            try:
                self._work(item)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - the worker must survive any failure of one item
                with self._condition:
                    self.failed += 1
                    self.last_error = f'{type(exc).__name__}: {exc}'
                self._log.warning('work_failed', f'processing failed ({self.failed} failure(s) so far): '
                                                 f'{type(exc).__name__}: {exc}')
            finally:
                with self._condition:
                    self._busy = False
                    self.processed += 1
                    self._condition.notify_all()

    @property
    def busy(self) -> bool:
        """True while ``work`` runs."""
        with self._condition:
            return self._busy

    @property
    def has_pending(self) -> bool:
        with self._condition:
            return self._has_pending

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until nothing is pending or running (True), or until ``timeout_s`` passed (False)."""
        with self._condition:
            return self._condition.wait_for(lambda: not (self._busy or self._has_pending) or self._stopping,
                                            timeout=timeout_s)

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop after the current item; True when the thread ended within ``timeout_s``."""
        with self._condition:
            if self._has_pending:
                self.discarded_on_stop += 1
            self._pending, self._has_pending = None, False
            self._stopping = True
            self._condition.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        """Counters: submitted, processed (finished, failed included), dropped, failed, discarded_on_stop."""
        with self._condition:
            return dict(submitted=self.submitted, processed=self.processed, dropped=self.dropped,
                        failed=self.failed, discarded_on_stop=self.discarded_on_stop)
