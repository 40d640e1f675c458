"""The ``lsm_node`` process: rclpy set-up, signal handling and the executor around one
:class:`~lsm_ros.ros.node.LsmNode` (:func:`run`, called by :func:`lsm_ros.ros.node.main`, the console entry point).

Network: the environment is respected; only when ROS_AUTOMATIC_DISCOVERY_RANGE is unset does the node stay on
localhost (see :func:`lsm_ros.ros.isolation.apply_node_environment_defaults`).
"""
from __future__ import annotations

import logging
import signal
from typing import Any, Callable

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from lsm_ros.ros.graph import SteadyMultiThreadedExecutor
from lsm_ros.ros.isolation import apply_node_environment_defaults
from lsm_ros.ros.names import NODE_NAME


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f'signal {signum}')


def run(make_node: Callable[[], Node], args: list[str] | None = None) -> int:
    """Spin ``make_node()`` until SIGINT or SIGTERM (0), or report why it could not be set up (1). With
    ``managed:=true`` the node waits for lifecycle transitions."""
    logging.basicConfig(level=logging.INFO, format='[%(levelname)s] [%(name)s]: %(message)s')
    apply_node_environment_defaults()
    # Our own signal handling: SIGINT/SIGTERM end spin() with KeyboardInterrupt while the Context is still valid,
    # so the inference thread finishes (and publishes) its pair before the node and the Context go. rclpy's
    # handlers would shut the Context down first and the pair in flight would fail to publish.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    node = None
    # Image callbacks, a query, a render and /diagnostics at once. rclpy 9.1's stock MultiThreadedExecutor can
    # fall into a busy loop that starves the inference thread for 10-16 s under a 30 Hz stream (ros2/rclpy#1452);
    # the steady one hands each task to its pool once.
    executor = SteadyMultiThreadedExecutor(num_threads=4)
    try:
        node = make_node()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:  # noqa: BLE001 - a clear message instead of a traceback for set-up errors
        logging.getLogger(NODE_NAME).error('lsm_node stopped: %s: %s', type(exc).__name__, exc)
        return 1
    finally:
        if node is not None:
            executor.remove_node(node)
            executor.wait_for_pool(5.0)   # callbacks still running end before their node goes
        executor.shutdown(timeout_sec=5.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
