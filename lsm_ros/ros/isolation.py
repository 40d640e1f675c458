"""Keep DDS traffic on this host: the environment every test, demo and experiment sets before ``rclpy.init``.

Three variables decide where a ROS 2 (Kilted, Fast DDS) process is seen:

- ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``: discovery only on this host (Kilted ignores
  ``ROS_LOCALHOST_ONLY``); the ROS default (SUBNET) multicasts on every interface;
- ``ROS_DOMAIN_ID``: a per-run id in 1..101 so that two test sessions never see each other's topics;
- ``FASTDDS_DEFAULT_PROFILES_FILE``: the package's ``config/fastdds_localhost.xml`` (shared memory with a
  32 MiB segment for whole images and clouds, UDPv4 on 127.0.0.1 only, no built-in transports).

The variables are read when rclpy creates its DDS participant, so they must be set before ``rclpy.init``
(``os.environ`` changes are seen by the C libraries of the same process).

Three policies:

- :func:`apply_localhost_only_environment` (tests, the demo): always localhost; an explicitly set
  ``ROS_DOMAIN_ID`` is kept, otherwise one is derived from the process id.
- :func:`apply_reserved_localhost_environment` (the bench's ROS mode, the load test): the same, but without an
  explicit ``ROS_DOMAIN_ID`` one is reserved with a lock file (:func:`reserve_domain_id`).
- :func:`apply_node_environment_defaults` (the ``lsm_node`` entry point): respects the user's
  environment. A robot deployment sets ``ROS_AUTOMATIC_DISCOVERY_RANGE`` (e.g. ``SUBNET``) and its own
  ``ROS_DOMAIN_ID``; only when the discovery range is unset (a development machine) is the node kept on
  localhost with the package's Fast DDS profile.
"""
from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Mapping, MutableMapping

_log = logging.getLogger(__name__)

DISCOVERY_RANGE_VARIABLE = 'ROS_AUTOMATIC_DISCOVERY_RANGE'
DOMAIN_ID_VARIABLE = 'ROS_DOMAIN_ID'
FASTDDS_PROFILE_VARIABLE = 'FASTDDS_DEFAULT_PROFILES_FILE'
ISOLATION_VARIABLES = (DISCOVERY_RANGE_VARIABLE, DOMAIN_ID_VARIABLE, FASTDDS_PROFILE_VARIABLE)
FASTDDS_PROFILE_NAME = 'fastdds_localhost.xml'
# Domain ids handed out here: 1..101 (0 is the ROS default that other people's processes use).
_MIN_DOMAIN_ID, _MAX_DOMAIN_ID = 1, 101


def fastdds_profile_path() -> Path:
    """The package's localhost-only Fast DDS profile: the source tree's ``config/``, else the installed share."""
    source_tree = Path(__file__).resolve().parents[2] / 'config' / FASTDDS_PROFILE_NAME
    if source_tree.is_file():
        return source_tree
    try:
        from ament_index_python.packages import get_package_share_directory
        installed = Path(get_package_share_directory('lsm_ros')) / 'config' / FASTDDS_PROFILE_NAME
    except (ImportError, LookupError, OSError):  # no ament index, or lsm_ros not in it
        installed = None
    if installed is not None and installed.is_file():
        return installed
    raise FileNotFoundError(f'{FASTDDS_PROFILE_NAME} not found in {source_tree.parent} nor in the installed share '
                            'of lsm_ros: install the package with its config/ directory')


def domain_id_for_process(pid: int | None = None) -> int:
    """A domain id in 1..101 derived from a process id (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return _MIN_DOMAIN_ID + pid % (_MAX_DOMAIN_ID - _MIN_DOMAIN_ID + 1)


_reserved_domain_locks: dict[int, IO[str]] = {}


def reserve_domain_id(lock_dir: str | Path | None = None) -> int:
    """A domain id in 1..101 that no other process on this machine holds through this function.

    Tries the ids from :func:`domain_id_for_process` on and keeps an exclusive ``flock`` on
    ``<lock_dir>/lsm_ros_ros_domain_<id>.lock`` until this process exits, so that concurrent test sessions get
    different domains. Falls back to the PID-derived id when every lock is taken.
    """
    lock_dir = Path(lock_dir or tempfile.gettempdir())
    span = _MAX_DOMAIN_ID - _MIN_DOMAIN_ID + 1
    first = domain_id_for_process()
    for step in range(span):
        domain_id = _MIN_DOMAIN_ID + (first - _MIN_DOMAIN_ID + step) % span
        if domain_id in _reserved_domain_locks:
            return domain_id
        handle = open(lock_dir / f'lsm_ros_ros_domain_{domain_id}.lock', 'w', encoding='utf-8')
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _reserved_domain_locks[domain_id] = handle
        return domain_id
    _log.warning('every ROS domain id lock in %s is taken: using %d unreserved', lock_dir, first)
    return first


def _check_domain_id(domain_id: int | str) -> str:
    try:
        value = int(domain_id)
    except (TypeError, ValueError) as exc:
        raise ValueError(f'ROS_DOMAIN_ID must be an integer, got {domain_id!r}') from exc
    if not 0 <= value <= 232:
        raise ValueError(f'ROS_DOMAIN_ID must be in 0..232, got {value}')
    return str(value)


def localhost_only_environment(domain_id: int | None = None,
                               environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The isolation variables for a test or demo process (returned, not applied).

    ``domain_id``: explicit id; else an explicitly set ``ROS_DOMAIN_ID`` of ``environ`` (default
    ``os.environ``) is kept; else one is derived from the process id. The discovery range is always
    LOCALHOST and the Fast DDS profile always the package's.
    """
    environ = os.environ if environ is None else environ
    if domain_id is None:
        explicit = environ.get(DOMAIN_ID_VARIABLE, '').strip()
        domain = _check_domain_id(explicit) if explicit else str(domain_id_for_process())
    else:
        domain = _check_domain_id(domain_id)
    return {DISCOVERY_RANGE_VARIABLE: 'LOCALHOST', DOMAIN_ID_VARIABLE: domain,
            FASTDDS_PROFILE_VARIABLE: str(fastdds_profile_path())}


def apply_localhost_only_environment(domain_id: int | None = None,
                                     environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :func:`localhost_only_environment` in ``environ`` (default ``os.environ``); call before rclpy.init."""
    environ = os.environ if environ is None else environ
    values = localhost_only_environment(domain_id, environ)
    environ.update(values)
    _log.debug('ROS isolation: %s', values)
    return values


def apply_reserved_localhost_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Loopback-only DDS before rclpy starts (:func:`apply_localhost_only_environment`) with a ROS_DOMAIN_ID of
    this process's own: an explicitly set one is kept (as by scripts/ros_env.sh and the tests), otherwise one is
    reserved with a lock file (:func:`reserve_domain_id`)."""
    environ = os.environ if environ is None else environ
    explicit = environ.get(DOMAIN_ID_VARIABLE, '').strip()
    return apply_localhost_only_environment(None if explicit else reserve_domain_id(), environ)


def apply_node_environment_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Environment policy of the ``lsm_node`` entry point; returns the effective isolation variables.

    When ``ROS_AUTOMATIC_DISCOVERY_RANGE`` is set, nothing is changed (a deployment chose its network).
    When it is unset, it becomes LOCALHOST and, if no Fast DDS profile is set, the package's profile is used.
    ``ROS_DOMAIN_ID`` is never changed (ROS default 0 when unset). The values are logged.
    """
    environ = os.environ if environ is None else environ
    if not environ.get(DISCOVERY_RANGE_VARIABLE):
        environ[DISCOVERY_RANGE_VARIABLE] = 'LOCALHOST'
        if not environ.get(FASTDDS_PROFILE_VARIABLE):
            environ[FASTDDS_PROFILE_VARIABLE] = str(fastdds_profile_path())
        _log.info('%s was unset: this node stays on localhost. Set %s=SUBNET (and %s) to reach other machines.',
                  DISCOVERY_RANGE_VARIABLE, DISCOVERY_RANGE_VARIABLE, DOMAIN_ID_VARIABLE)
    effective = {name: environ.get(name, '') for name in ISOLATION_VARIABLES}
    _log.info('ROS network: %s', ', '.join(f'{k}={v or "<unset>"}' for k, v in effective.items()))
    return effective
