"""Shared ``main()`` body of the package's nodes: start, spin, stop cleanly."""

from typing import Callable, Optional

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from gradclip_ros.checkpoints import CheckpointError
from gradclip_ros.runtime import tune_malloc


def run_node(factory: Callable[[], Node], name: str, args=None) -> int:
    """Create the node with ``factory`` and spin it until Ctrl-C or shutdown.

    Returns 1 when the node rejects its configuration (ValueError or CheckpointError, logged
    as fatal), else 0. A node's ``stop()``, if it has one, runs before ``destroy_node()``.
    """
    tune_malloc()
    # Without rclpy's SIGINT handler, Ctrl-C raises KeyboardInterrupt in spin() while the
    # context is still valid, so the worker threads stop before the context shuts down.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = factory()
    except (CheckpointError, ValueError) as error:
        rclpy.logging.get_logger(name).fatal(f'cannot start: {error}')
        rclpy.try_shutdown()
        return 1

    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        stop: Optional[Callable[[], None]] = getattr(node, 'stop', None)
        if stop is not None:
            stop()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
