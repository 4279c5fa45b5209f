"""Pieces the package's nodes share: the ``main()`` body and per-camera parameters."""

from typing import Callable, List, Optional, Sequence

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


def per_camera(values: Sequence[str], cameras: Sequence[str], name: str,
               allowed: Sequence[str]) -> List[str]:
    """Expand a one-for-all or one-per-camera string list; raises ValueError when invalid."""
    values = list(values)
    if len(values) == 1:
        values = values * len(cameras)
    if len(values) != len(cameras):
        raise ValueError(
            f'{name} has {len(values)} entries {values!r} for {len(cameras)} cameras '
            f'{list(cameras)!r}; give one entry for all cameras or one per camera')
    for value in values:
        if value not in allowed:
            raise ValueError(
                f'invalid {name} entry {value!r}; allowed: {", ".join(allowed)}')
    return values
