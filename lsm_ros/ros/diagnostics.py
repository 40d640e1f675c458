"""Health of ``lsm_node`` as ``diagnostic_msgs/DiagnosticArray`` (for ``/diagnostics``), without a Node.

- :class:`TopicRateMonitor` follows each input topic: arrival rate over a sliding window, time since the last
  message, the header stamps against the arrival times (stamps that stop advancing or go backwards) and the
  left/right stamp offset of a stereo pair of topics.
- :class:`LatencyMonitor` keeps the recent processing latencies (bounded) for their median and 95th percentile.
- :class:`NodeHealth` is one snapshot of everything the node knows about itself (filled from its statistics and
  the monitors, see :func:`health_from_statistics`); :func:`build_diagnostic_array` turns it into three statuses,
  ``<node>: inputs``, ``<node>: processing`` and ``<node>: model`` (hardware_id: the torch device), each with a
  level, a message and the KeyValues documented in :data:`KEY_DOCS`.

Everything is deterministic: the monitors take an injectable clock (or explicit times) and the builder is a pure
function of the snapshot, the previous snapshot (for "since the last report" counts) and
:class:`DiagnosticThresholds`.
"""
from __future__ import annotations

import bisect
import collections
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from std_msgs.msg import Header

DIAGNOSTICS_TOPIC = '/diagnostics'
NODE_NAME = 'lsm_node'
# The three statuses (their name is '<node name>: <part>').
STATUS_INPUTS, STATUS_PROCESSING, STATUS_MODEL = 'inputs', 'processing', 'model'
STATUS_PARTS = (STATUS_INPUTS, STATUS_PROCESSING, STATUS_MODEL)
# Model load states (NodeHealth.model_state).
MODEL_UNCONFIGURED, MODEL_LOADING, MODEL_READY, MODEL_FAILED = 'unconfigured', 'loading', 'ready', 'failed'
MODEL_STATES = (MODEL_UNCONFIGURED, MODEL_LOADING, MODEL_READY, MODEL_FAILED)
# Scale of the last reconstruction (NodeHealth.scale).
SCALE_METRIC, SCALE_MODEL_UNITS, SCALE_UNKNOWN = 'metric', 'model_units', 'unknown'
SCALES = (SCALE_METRIC, SCALE_MODEL_UNITS, SCALE_UNKNOWN)
# Lifecycle state in which the node processes pairs (a plain node is active once constructed).
ACTIVE_STATE = 'active'
# Rejection reasons that are failures of the network itself rather than of the input.
INFERENCE_FAILURE_REASONS = ('reconstruction_failed', 'out_of_memory')

OK, WARN, ERROR, STALE = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR, DiagnosticStatus.STALE
_SEVERITY = {OK: 0, WARN: 1, STALE: 2, ERROR: 3}   # how a status combines its findings: the worst one wins
_MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------------ snapshot
@dataclass(frozen=True)
class TopicStats:
    """One input topic over the monitor's window (see :class:`TopicRateMonitor`)."""

    topic: str
    required: bool                 # the node needs it (a silent optional topic is no problem)
    messages: int                  # received since watching began
    rate_hz: float                 # (n - 1) / (last - first arrival) of the n arrivals in the window; 0 when n < 2
    since_last_s: float            # since the last message, or since watching began when none arrived
    stamp_rate: float | None       # header stamp advance per second of arrival over the window (1: real time,
    #                                0: frozen, < 0: going back); None when fewer than 2 arrivals in the window
    stamps_backwards: int          # in the window: messages whose stamp is older than the previous message's
    stamps_repeated: int           # in the window: messages with the previous message's stamp
    window_messages: int           # arrivals in the window

    @property
    def stamps_frozen(self) -> bool:
        """Several messages in the window and none advanced the stamp."""
        return self.window_messages >= 2 and self.stamps_repeated == self.window_messages - 1


@dataclass(frozen=True)
class StereoOffset:
    """Left minus right header stamp, each right message matched with the left one of nearest stamp, over the
    window (this is the offset the synchronizer pairs by)."""

    median_s: float
    max_abs_s: float
    samples: int


@dataclass(frozen=True)
class LatencyStats:
    """Processing latency (image arrival to products published) of the recent pairs."""

    samples: int
    median_s: float | None
    p95_s: float | None
    last_s: float | None


@dataclass(frozen=True)
class MemoryStats:
    """Memory of the node's process (bytes; None: unknown or not on CUDA)."""

    rss_bytes: int | None = None
    cuda_allocated_bytes: int | None = None
    cuda_reserved_bytes: int | None = None


@dataclass(frozen=True)
class NodeHealth:
    """One snapshot of the node's health; :func:`build_diagnostic_array` reports it.

    The node fills it once per report, e.g. with :func:`health_from_statistics` from ``LsmNode.statistics()``, a
    :class:`TopicRateMonitor` and a :class:`LatencyMonitor`.
    """

    time_s: float                                      # monotonic time of the snapshot (the monitors' clock)
    node_name: str = NODE_NAME                         # status names are '<node_name>: inputs', ...
    lifecycle_state: str = ACTIVE_STATE                # 'unconfigured', 'inactive', 'active', 'finalized'
    # model
    model_state: str = MODEL_UNCONFIGURED              # one of MODEL_STATES
    weights: str = ''                                  # what the weights are (Reconstructor.weights)
    trained_weights: bool | None = None                # False: untrained reference/random weights
    model_error: str = ''                              # why loading failed (model_state 'failed')
    device: str = ''                                   # torch device, e.g. 'cpu', 'cuda:0' ('' before configure)
    model_on_device: bool = True                       # False while unconfigured or offloaded (deactivated)
    memory: MemoryStats = field(default_factory=MemoryStats)
    # inputs
    inputs: Mapping[str, TopicStats] = field(default_factory=dict)   # TopicRateMonitor.snapshot()
    image_topics: tuple[str, str] | None = None        # (left, right) image topics, keys of ``inputs``
    stereo_offset: StereoOffset | None = None          # TopicRateMonitor.stereo_offset(*image_topics)
    sync_tolerance_s: float = 0.02                     # sync_tolerance_s when approximate_sync, else 0
    pairs: int = 0                                     # pairs formed by the synchronizer
    sync_drops: Mapping[str, int] = field(default_factory=dict)      # per StereoSynchronizer drop reason
    inactive_drops: int = 0                            # images received while not active
    # processing
    processed: int = 0                                 # pairs reconstructed and published
    dropped_busy: int = 0                              # pending pairs replaced by newer ones (latest pair wins)
    worker_exceptions: int = 0                         # exceptions that escaped the inference thread's work
    worker_running: bool = True                        # the inference thread is alive (when configured)
    rejected: Mapping[str, int] = field(default_factory=dict)        # pairs without output, per reason
    failed_pairs_in_a_row: int = 0                     # inference failures since the last success
    latency: LatencyStats = field(default_factory=lambda: LatencyStats(0, None, None, None))
    scale: str = SCALE_UNKNOWN                         # of the last reconstruction: one of SCALES
    scale_source: str = ''                             # ReconstructionInfo.scale_source (e.g. 'stereo_baseline')
    baseline_m: float | None = None                    # stereo baseline of the last pair's CameraInfo, if any


def _threshold(default: float | int, doc: str) -> Any:
    return field(default=default, metadata={'doc': doc})


@dataclass(frozen=True)
class DiagnosticThresholds:
    """When a finding becomes a warning or an error (each field's ``metadata['doc']`` says what it does)."""

    stale_after_s: float = _threshold(2.0, 'a required input topic silent this long (s): inputs WARN "no messages '
                                           'on <topic> for X s"; all of them: STALE')
    min_rate_hz: float = _threshold(0.0, 'a required input topic slower than this (Hz): inputs WARN (0: no check)')
    no_pair_min_images: int = _threshold(3, 'both image topics got at least this many images since the last report '
                                            'and no pair formed: inputs WARN')
    latency_warn_s: float = _threshold(15.0, 'p95 processing latency above this (s): processing WARN (the full LSM '
                                             'takes about 7.5 s per 256x256 pair on a 2-core CPU)')
    latency_error_s: float = _threshold(60.0, 'p95 processing latency above this (s): processing ERROR')
    failures_in_a_row_error: int = _threshold(3, 'this many inference failures in a row: processing ERROR (fewer: '
                                                 'WARN)')

    def __post_init__(self) -> None:
        for name in ('stale_after_s', 'min_rate_hz', 'latency_warn_s', 'latency_error_s'):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f'{name} must be a finite number >= 0, got {value!r}')
        if self.latency_error_s < self.latency_warn_s:
            raise ValueError(f'latency_error_s ({self.latency_error_s}) is below latency_warn_s '
                             f'({self.latency_warn_s})')
        if self.no_pair_min_images < 1 or self.failures_in_a_row_error < 1:
            raise ValueError('no_pair_min_images and failures_in_a_row_error must be >= 1')


# ------------------------------------------------------------------------------------------------ monitors
class TopicRateMonitor:
    """Arrivals and header stamps of input topics over a sliding window of ``window_s`` seconds. Thread-safe.

    ``clock``: monotonic seconds (arrival times when :meth:`record` gets none, and "now" for the statistics).
    At most ``max_samples`` arrivals are kept per topic.
    """

    def __init__(self, window_s: float = 5.0, max_samples: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(window_s) and window_s > 0) or max_samples < 2:
            raise ValueError(f'window_s must be > 0 and max_samples >= 2, got {window_s}, {max_samples}')
        self.window_s = float(window_s)
        self._clock = clock
        self._samples: dict[str, collections.deque[tuple[float, int]]] = {}
        self._max_samples = int(max_samples)
        self._watch_start: dict[str, float] = {}
        self._last_arrival: dict[str, float] = {}
        self._counts: collections.Counter[str] = collections.Counter()
        self._required: dict[str, bool] = {}
        self._lock = threading.Lock()

    def watch(self, topic: str, required: bool = True, now_s: float | None = None) -> None:
        """Start following ``topic`` (its silence counts from now); ``required``: the node needs it."""
        now = self._clock() if now_s is None else float(now_s)
        with self._lock:
            self._ensure(topic, now)
            self._required[topic] = bool(required)

    def _ensure(self, topic: str, now: float) -> None:
        if topic not in self._samples:
            self._samples[topic] = collections.deque(maxlen=self._max_samples)
            self._watch_start[topic] = now
            self._required.setdefault(topic, True)

    def record(self, topic: str, stamp_ns: int, arrival_s: float | None = None) -> None:
        """A message of ``topic`` with header stamp ``stamp_ns`` arrived (at ``arrival_s``, default now)."""
        arrival = self._clock() if arrival_s is None else float(arrival_s)
        with self._lock:
            self._ensure(topic, arrival)
            samples = self._samples[topic]
            samples.append((arrival, int(stamp_ns)))
            while samples and samples[0][0] < arrival - self.window_s:
                samples.popleft()
            self._counts[topic] += 1
            self._last_arrival[topic] = max(arrival, self._last_arrival.get(topic, arrival))

    def forget(self) -> None:
        """Drop every topic (e.g. on cleanup); topics are watched again when recorded or watched."""
        with self._lock:
            self._samples.clear()
            self._watch_start.clear()
            self._last_arrival.clear()
            self._counts.clear()
            self._required.clear()

    def _window(self, topic: str, now: float) -> list[tuple[float, int]]:
        return [s for s in self._samples.get(topic, ()) if now - self.window_s <= s[0] <= now]

    def topic_stats(self, topic: str, now_s: float | None = None) -> TopicStats:
        """The statistics of one watched or recorded topic (KeyError for another)."""
        now = self._clock() if now_s is None else float(now_s)
        with self._lock:
            if topic not in self._samples:
                raise KeyError(f'topic {topic!r} is not monitored')
            window = self._window(topic, now)
            since = now - self._last_arrival.get(topic, self._watch_start[topic])
            messages, required = self._counts[topic], self._required[topic]
        rate = stamp_rate = None
        if len(window) >= 2:
            span_s = window[-1][0] - window[0][0]
            rate = (len(window) - 1) / span_s if span_s > 0 else 0.0
            stamp_rate = (window[-1][1] - window[0][1]) * 1e-9 / span_s if span_s > 0 else None
        backwards = sum(later[1] < earlier[1] for earlier, later in zip(window, window[1:]))
        repeated = sum(later[1] == earlier[1] for earlier, later in zip(window, window[1:]))
        return TopicStats(topic=topic, required=required, messages=messages, rate_hz=rate or 0.0,
                          since_last_s=max(since, 0.0), stamp_rate=stamp_rate, stamps_backwards=backwards,
                          stamps_repeated=repeated, window_messages=len(window))

    def snapshot(self, now_s: float | None = None) -> dict[str, TopicStats]:
        """:meth:`topic_stats` of every topic, in the order they were first watched or recorded."""
        now = self._clock() if now_s is None else float(now_s)
        with self._lock:
            topics = list(self._samples)
        return {topic: self.topic_stats(topic, now) for topic in topics}

    def stereo_offset(self, left_topic: str, right_topic: str, now_s: float | None = None) -> StereoOffset | None:
        """Left minus right stamp of each right message in the window and the left message of nearest stamp;
        None when a side has nothing in the window."""
        now = self._clock() if now_s is None else float(now_s)
        with self._lock:
            left = sorted(stamp for _, stamp in self._window(left_topic, now))
            right = [stamp for _, stamp in self._window(right_topic, now)]
        if not left or not right:
            return None
        offsets = []
        for stamp in right:
            index = bisect.bisect_left(left, stamp)
            nearest = min(left[max(index - 1, 0):index + 1], key=lambda s: abs(s - stamp))
            offsets.append((nearest - stamp) * 1e-9)
        return StereoOffset(median_s=_median(offsets), max_abs_s=max(abs(o) for o in offsets), samples=len(offsets))


class LatencyMonitor:
    """The last ``window`` processing latencies (seconds). Thread-safe."""

    def __init__(self, window: int = 100) -> None:
        if window < 1:
            raise ValueError(f'window must be >= 1, got {window}')
        self._latencies: collections.deque[float] = collections.deque(maxlen=int(window))
        self._lock = threading.Lock()

    def record(self, latency_s: float) -> None:
        """Add one latency; raises ValueError for a negative or non-finite one."""
        latency_s = float(latency_s)
        if not (math.isfinite(latency_s) and latency_s >= 0):
            raise ValueError(f'a latency must be a finite number of seconds >= 0, got {latency_s!r}')
        with self._lock:
            self._latencies.append(latency_s)

    def stats(self) -> LatencyStats:
        """Median, 95th percentile (nearest rank) and last of the window."""
        with self._lock:
            values = list(self._latencies)
        if not values:
            return LatencyStats(0, None, None, None)
        ordered = sorted(values)
        return LatencyStats(samples=len(values), median_s=_median(ordered),
                            p95_s=ordered[math.ceil(0.95 * len(ordered)) - 1], last_s=values[-1])


def _median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


# ------------------------------------------------------------------------------------------------ memory
def process_rss_bytes() -> int | None:
    """Resident memory of this process (Linux ``/proc/self/statm``); None elsewhere."""
    try:
        with open('/proc/self/statm', encoding='ascii') as statm:
            return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        return None


def memory_stats(device: str) -> MemoryStats:
    """RSS, and on a CUDA ``device`` torch's allocated and reserved bytes (torch is not imported here: without it
    loaded, there is no CUDA memory to report)."""
    allocated = reserved = None
    torch = sys.modules.get('torch')
    if device.startswith('cuda') and torch is not None and torch.cuda.is_available():
        allocated, reserved = int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device))
    return MemoryStats(rss_bytes=process_rss_bytes(), cuda_allocated_bytes=allocated, cuda_reserved_bytes=reserved)


# ------------------------------------------------------------------------------------------------ from the node
def health_from_statistics(statistics: Mapping[str, Any], *, time_s: float, monitor: TopicRateMonitor | None = None,
                           image_topics: tuple[str, str] | None = None, latency: LatencyMonitor | None = None,
                           **fields: Any) -> NodeHealth:
    """A :class:`NodeHealth` from ``LsmNode.statistics()`` (missing keys keep their defaults), the topic monitor
    (inputs, and the stereo offset of ``image_topics``), the latency monitor, and any other NodeHealth field given
    by name (model_state, weights, trained_weights, device, memory, sync_tolerance_s, scale, ...)."""
    counts = statistics.get('counts', {})
    worker = statistics.get('worker', {})
    values: dict[str, Any] = dict(
        pairs=int(counts.get('pairs', 0)), processed=int(counts.get('processed', 0)),
        sync_drops=dict(statistics.get('sync_drops', {})), rejected=dict(statistics.get('rejected', {})),
        dropped_busy=int(worker.get('dropped', 0)), worker_exceptions=int(worker.get('failed', 0)),
        worker_running=bool(statistics.get('worker_running', True)),
        inactive_drops=int(statistics.get('inactive_drops', 0)),
        failed_pairs_in_a_row=int(statistics.get('failed_pairs_in_a_row', 0)),
        model_on_device=bool(statistics.get('model_on_device', True)))
    if 'lifecycle_state' in statistics:
        values['lifecycle_state'] = str(statistics['lifecycle_state'])
    if monitor is not None:
        values['inputs'] = monitor.snapshot(time_s)
        if image_topics is not None:
            values['image_topics'] = image_topics
            values['stereo_offset'] = monitor.stereo_offset(*image_topics, now_s=time_s)
    if latency is not None:
        values['latency'] = latency.stats()
    values.update(fields)
    return NodeHealth(time_s=time_s, **values)


# ------------------------------------------------------------------------------------------------ KeyValues
@dataclass(frozen=True)
class KeyDoc:
    """One KeyValue of a status: its key (``<topic>``/``<reason>`` stand for a name) and what its value means."""

    status: str
    key: str
    meaning: str

    def matches(self, key: str) -> bool:
        pattern = re.sub(r'<[a-z ]+>', '.+', re.escape(self.key))
        return re.fullmatch(pattern, key) is not None


KEY_DOCS: tuple[KeyDoc, ...] = (
    KeyDoc(STATUS_INPUTS, '<topic>: rate (Hz)', 'arrivals per second over the monitor window: (n - 1) / time '
           'between the first and last of the n messages in it; 0 with fewer than 2'),
    KeyDoc(STATUS_INPUTS, '<topic>: since last (s)', 'seconds since the last message (since the node started '
           'watching the topic when none arrived yet)'),
    KeyDoc(STATUS_INPUTS, '<topic>: messages', 'messages received since the node started watching the topic'),
    KeyDoc(STATUS_INPUTS, '<topic>: stamp rate', 'header stamp seconds per second of arrival over the window: 1 = '
           'live, 0 = stamps frozen, negative = going back, other = a bag played faster or slower; "-" with fewer '
           'than 2 messages in the window'),
    KeyDoc(STATUS_INPUTS, '<topic>: stamps backwards', 'messages in the window stamped older than the message '
           'before them (a restarted driver or bag; such images are dropped as stale)'),
    KeyDoc(STATUS_INPUTS, 'stereo offset median (ms)', 'median of left minus right image stamp over the window, '
           'each right image matched with the left image of nearest stamp; "-" without images on both sides'),
    KeyDoc(STATUS_INPUTS, 'stereo offset max (ms)', 'largest |left - right| stamp offset in the window'),
    KeyDoc(STATUS_INPUTS, 'sync tolerance (ms)', 'largest offset the synchronizer pairs (sync_tolerance_s; 0 '
           'with approximate_sync false)'),
    KeyDoc(STATUS_INPUTS, 'pairs formed', 'stereo pairs formed by the synchronizer since start'),
    KeyDoc(STATUS_INPUTS, 'sync drops: <reason>', 'images dropped unpaired since start, per reason: queue_full '
           '(its side queue overflowed: the partner never came), superseded (a newer pair formed first), late '
           '(stamp not newer than the last pair\'s), duplicate_stamp (same stamp already queued)'),
    KeyDoc(STATUS_INPUTS, 'images while inactive', 'images received while the node was not active (not '
           'processed)'),
    KeyDoc(STATUS_PROCESSING, 'pairs processed', 'pairs reconstructed and published since start'),
    KeyDoc(STATUS_PROCESSING, 'latency median (s)', 'median of the recent processing latencies, image arrival to '
           'products published; "-" before the first'),
    KeyDoc(STATUS_PROCESSING, 'latency p95 (s)', '95th percentile (nearest rank) of the same latencies'),
    KeyDoc(STATUS_PROCESSING, 'latency samples', 'how many recent latencies the two figures summarise'),
    KeyDoc(STATUS_PROCESSING, 'dropped pairs (busy)', 'pairs replaced while waiting for the busy inference thread '
           '(latest pair wins: expected when images come faster than pairs are processed)'),
    KeyDoc(STATUS_PROCESSING, 'rejected: <reason>', 'pairs that gave no output since start, per reason (see '
           'Troubleshooting)'),
    KeyDoc(STATUS_PROCESSING, 'rejected total', 'sum of the rejected pairs over all reasons'),
    KeyDoc(STATUS_PROCESSING, 'failed pairs in a row', 'inference failures since the last successful pair'),
    KeyDoc(STATUS_PROCESSING, 'worker exceptions', 'exceptions that escaped the inference thread (0 expected)'),
    KeyDoc(STATUS_PROCESSING, 'scale', 'scale of the last reconstruction: "metric (<source>)" (metres, from the '
           'stereo baseline of the CameraInfo), "model units" (no usable baseline: the model\'s own scale) or '
           '"unknown" (no reconstruction yet)'),
    KeyDoc(STATUS_PROCESSING, 'baseline (m)', 'stereo baseline of the last pair\'s right CameraInfo (P[0,3] = '
           '-fx*B); "-" when none'),
    KeyDoc(STATUS_MODEL, 'lifecycle state', 'unconfigured, inactive, active or finalized (a plain node is active '
           'once started)'),
    KeyDoc(STATUS_MODEL, 'model state', 'unconfigured (no model loaded), loading, ready, or failed (see error)'),
    KeyDoc(STATUS_MODEL, 'weights', 'which weights the model runs (checkpoint files, or the untrained reference / '
           'random weights)'),
    KeyDoc(STATUS_MODEL, 'trained weights', 'yes, no (untrained: every product is meaningless) or unknown'),
    KeyDoc(STATUS_MODEL, 'device', 'torch device of the model (also the statuses\' hardware_id)'),
    KeyDoc(STATUS_MODEL, 'model on device', 'no while unconfigured, or while deactivated on CUDA (moved to the '
           'CPU)'),
    KeyDoc(STATUS_MODEL, 'process RSS (MiB)', 'resident memory of the node\'s process'),
    KeyDoc(STATUS_MODEL, 'CUDA allocated (MiB)', 'torch.cuda.memory_allocated on the device (CUDA only)'),
    KeyDoc(STATUS_MODEL, 'CUDA reserved (MiB)', 'torch.cuda.memory_reserved: allocated plus torch\'s cache (CUDA '
           'only)'),
    KeyDoc(STATUS_MODEL, 'error', 'why loading the model failed (model state failed only)'),
)


def documented_key(status: str, key: str) -> KeyDoc | None:
    """The :data:`KEY_DOCS` entry of a KeyValue of ``status`` (None: undocumented)."""
    return next((doc for doc in KEY_DOCS if doc.status == status and doc.matches(key)), None)


# ------------------------------------------------------------------------------------------------ statuses
def status_name(node_name: str, part: str) -> str:
    """'<node name>: <part>' (part: inputs, processing or model)."""
    return f'{node_name}: {part}'


class _Status:
    """Findings (level, text), KeyValues and the all-is-well message of one status being built."""

    def __init__(self) -> None:
        self.findings: list[tuple[bytes, str]] = []
        self.values: list[KeyValue] = []
        self.summary = ''

    def add(self, level: bytes, text: str) -> None:
        self.findings.append((level, text))

    def value(self, key: str, value: Any) -> None:
        self.values.append(KeyValue(key=key, value=_text(value)))

    def build(self, name: str, hardware_id: str) -> DiagnosticStatus:
        """The status: the worst finding's level; the findings, worst first, as message (else the summary)."""
        level = max((f[0] for f in self.findings), key=_SEVERITY.__getitem__, default=OK)
        message = '; '.join(text for _, text in sorted(self.findings, key=lambda f: -_SEVERITY[f[0]]))
        return DiagnosticStatus(level=level, name=name, message=message or self.summary, hardware_id=hardware_id,
                                values=self.values)


def _text(value: Any) -> str:
    """A KeyValue value: '-' for None, yes/no, floats with 3 decimals."""
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'no'
    if isinstance(value, float):
        return f'{value:.3f}' if math.isfinite(value) else str(value)
    return str(value)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _delta(current: Mapping[str, int], previous: Mapping[str, int] | None) -> dict[str, int]:
    previous = previous or {}
    return {k: v - previous.get(k, 0) for k, v in current.items() if v - previous.get(k, 0) > 0}


def _inputs_status(health: NodeHealth, previous: NodeHealth | None, limits: DiagnosticThresholds) -> _Status:
    status = _Status()
    active = health.lifecycle_state == ACTIVE_STATE
    required = [s.topic for s in health.inputs.values() if s.required]
    stale = {s.topic for s in health.inputs.values() if s.required and s.since_last_s > limits.stale_after_s}
    status.summary = (f'{len(required)} required input topic(s) live, {health.pairs} pair(s) formed'
                      if health.inputs else 'no input topic monitored')
    if not active:
        status.summary = f'not active ({health.lifecycle_state}): images are not processed'
    for stats in health.inputs.values():
        status.value(f'{stats.topic}: rate (Hz)', stats.rate_hz)
        status.value(f'{stats.topic}: since last (s)', stats.since_last_s)
        status.value(f'{stats.topic}: messages', stats.messages)
        status.value(f'{stats.topic}: stamp rate', stats.stamp_rate)
        status.value(f'{stats.topic}: stamps backwards', stats.stamps_backwards)
        if not active:
            continue
        if stats.topic in stale:
            status.add(WARN, f'no messages on {stats.topic} for {stats.since_last_s:.1f} s')
        elif stats.required and limits.min_rate_hz > 0 and stats.window_messages >= 2 \
                and stats.rate_hz < limits.min_rate_hz:
            status.add(WARN, f'{stats.topic} at {stats.rate_hz:.2f} Hz, below {limits.min_rate_hz:g} Hz')
        if stats.stamps_backwards:
            status.add(WARN, f'stamps on {stats.topic} went backwards {stats.stamps_backwards} time(s)')
        elif stats.stamps_frozen:
            status.add(WARN, f'stamps on {stats.topic} stopped advancing ({stats.window_messages} messages with '
                             'one stamp)')
    if active and required and len(stale) == len(required):
        status.add(STALE, 'no input at all: check the topic remappings and that the cameras publish')
    offset = health.stereo_offset
    status.value('stereo offset median (ms)', None if offset is None else offset.median_s * 1e3)
    status.value('stereo offset max (ms)', None if offset is None else offset.max_abs_s * 1e3)
    status.value('sync tolerance (ms)', health.sync_tolerance_s * 1e3)
    if active and offset is not None and abs(offset.median_s) > health.sync_tolerance_s:
        status.add(WARN, f'left and right stamps differ by {offset.median_s * 1e3:.1f} ms, more than the sync '
                         f'tolerance {health.sync_tolerance_s * 1e3:.1f} ms: pairs are dropped (synchronise the '
                         'cameras or raise sync_tolerance_s)')
    status.value('pairs formed', health.pairs)
    for reason, count in health.sync_drops.items():
        status.value(f'sync drops: {reason}', count)
    status.value('images while inactive', health.inactive_drops)
    if active and previous is not None and health.image_topics is not None:
        arrived = [health.inputs[t].messages - previous.inputs[t].messages if t in previous.inputs
                   else health.inputs[t].messages for t in health.image_topics if t in health.inputs]
        if len(arrived) == 2 and min(arrived) >= limits.no_pair_min_images and health.pairs == previous.pairs:
            drops = _delta(health.sync_drops, previous.sync_drops)
            status.add(WARN, f'images arrive on both sides but no pair formed in the last '
                             f'{health.time_s - previous.time_s:.1f} s (sync drops {drops or "none"}): check the '
                             'stamps, approximate_sync and sync_tolerance_s')
    return status


def _processing_status(health: NodeHealth, previous: NodeHealth | None, limits: DiagnosticThresholds) -> _Status:
    status = _Status()
    active = health.lifecycle_state == ACTIVE_STATE
    latency = health.latency
    status.value('pairs processed', health.processed)
    status.value('latency median (s)', latency.median_s)
    status.value('latency p95 (s)', latency.p95_s)
    status.value('latency samples', latency.samples)
    status.value('dropped pairs (busy)', health.dropped_busy)
    for reason, count in health.rejected.items():
        status.value(f'rejected: {reason}', count)
    status.value('rejected total', sum(health.rejected.values()))
    status.value('failed pairs in a row', health.failed_pairs_in_a_row)
    status.value('worker exceptions', health.worker_exceptions)
    scale_text = {SCALE_METRIC: f'metric ({health.scale_source or "stereo baseline"})',
                  SCALE_MODEL_UNITS: 'model units'}.get(health.scale, 'unknown (no reconstruction yet)')
    status.value('scale', scale_text)
    status.value('baseline (m)', health.baseline_m)
    if active and health.model_state == MODEL_READY and not health.worker_running:
        status.add(ERROR, 'the inference thread is not running: no pair can be processed')
    if health.failed_pairs_in_a_row >= limits.failures_in_a_row_error:
        status.add(ERROR, f'{health.failed_pairs_in_a_row} pairs in a row failed in the network')
    elif health.failed_pairs_in_a_row:
        status.add(WARN, f'{health.failed_pairs_in_a_row} pair(s) in a row failed in the network')
    new_exceptions = health.worker_exceptions - (previous.worker_exceptions if previous else 0)
    if new_exceptions > 0:
        status.add(ERROR, f'{new_exceptions} exception(s) escaped the inference thread')
    rejected_now = {k: v for k, v in _delta(health.rejected, previous.rejected if previous else None).items()
                    if k not in INFERENCE_FAILURE_REASONS}
    if rejected_now:
        window = f' in the last {health.time_s - previous.time_s:.1f} s' if previous else ''
        status.add(WARN, f'{sum(rejected_now.values())} pair(s) rejected{window}: '
                         + ', '.join(f'{k} {v}' for k, v in sorted(rejected_now.items())))
    if latency.p95_s is not None:
        if latency.p95_s > limits.latency_error_s:
            status.add(ERROR, f'p95 latency {latency.p95_s:.1f} s above {limits.latency_error_s:g} s')
        elif latency.p95_s > limits.latency_warn_s:
            status.add(WARN, f'p95 latency {latency.p95_s:.1f} s above {limits.latency_warn_s:g} s')
    if health.scale == SCALE_MODEL_UNITS and health.baseline_m:
        status.add(WARN, f'a stereo baseline ({health.baseline_m:.3f} m) was given but the last reconstruction is in '
                         'model units (its relative pose failed)')
    status.summary = (f'{health.processed} pair(s) processed'
                      + (f', latency median {latency.median_s:.2f} s, p95 {latency.p95_s:.2f} s'
                         if latency.median_s is not None and latency.p95_s is not None else '')
                      + f', scale {scale_text}')
    if not active:
        status.summary = f'not active ({health.lifecycle_state}); ' + status.summary
    return status


def _model_status(health: NodeHealth) -> _Status:
    status = _Status()
    status.value('lifecycle state', health.lifecycle_state)
    status.value('model state', health.model_state)
    status.value('weights', health.weights or None)
    status.value('trained weights', 'unknown' if health.trained_weights is None else health.trained_weights)
    status.value('device', health.device or None)
    status.value('model on device', health.model_on_device)
    memory = health.memory
    status.value('process RSS (MiB)', _scaled(memory.rss_bytes, 1 / _MIB))
    if memory.cuda_allocated_bytes is not None:
        status.value('CUDA allocated (MiB)', _scaled(memory.cuda_allocated_bytes, 1 / _MIB))
    if memory.cuda_reserved_bytes is not None:
        status.value('CUDA reserved (MiB)', _scaled(memory.cuda_reserved_bytes, 1 / _MIB))
    if health.model_state == MODEL_FAILED:
        status.value('error', health.model_error or None)
        status.add(ERROR, f'the model failed to load: {health.model_error or "unknown reason"}')
    elif health.model_state == MODEL_READY and health.trained_weights is False:
        status.add(WARN, f'UNTRAINED WEIGHTS ({health.weights}): every product is meaningless; pass the official '
                         'checkpoints')
    elif health.model_state not in MODEL_STATES:
        status.add(WARN, f'unknown model state {health.model_state!r}')
    if health.model_state == MODEL_READY:
        status.summary = f'ready on {health.device or "?"}: {health.weights}'
    elif health.model_state == MODEL_LOADING:
        status.summary = f'loading {health.weights}'.rstrip()
    else:
        status.summary = f'no model loaded ({health.lifecycle_state})'
    return status


def build_statuses(health: NodeHealth, previous: NodeHealth | None = None,
                   thresholds: DiagnosticThresholds | None = None) -> list[DiagnosticStatus]:
    """The three statuses (inputs, processing, model) of ``health``; ``previous``: the snapshot of the last report,
    for what happened since (new rejections, images without pairs)."""
    limits = thresholds or DiagnosticThresholds()
    hardware_id = health.device or 'none'
    return [_inputs_status(health, previous, limits).build(status_name(health.node_name, STATUS_INPUTS), hardware_id),
            _processing_status(health, previous, limits).build(status_name(health.node_name, STATUS_PROCESSING),
                                                               hardware_id),
            _model_status(health).build(status_name(health.node_name, STATUS_MODEL), hardware_id)]


def build_diagnostic_array(health: NodeHealth, previous: NodeHealth | None = None,
                           thresholds: DiagnosticThresholds | None = None, stamp: Time | None = None
                           ) -> DiagnosticArray:
    """The ``/diagnostics`` message of ``health`` (see :func:`build_statuses`), stamped ``stamp`` (the node's clock
    now; default zero)."""
    header = Header(stamp=Time(sec=stamp.sec, nanosec=stamp.nanosec) if stamp is not None else Time())
    return DiagnosticArray(header=header, status=build_statuses(health, previous, thresholds))


def level_name(level: bytes) -> str:
    """'OK', 'WARN', 'ERROR' or 'STALE'."""
    return {OK: 'OK', WARN: 'WARN', ERROR: 'ERROR', STALE: 'STALE'}[level]
