"""``gradclip-ros replay BAG``: publish a rosbag (rosbag2 or ROS 1) into the ROS graph.

Messages keep their recorded timing (scaled by ``--rate``; 0 publishes as fast as possible).
rosbag2 messages are published as the serialized CDR bytes stored in the bag, so nothing is
deserialized on the way; ROS 1 messages are converted to CDR by rosbags first.

``--lockstep TOPIC`` makes a replay deterministic for evaluation: the next image is published
only after the perception node has responded to the previous one on TOPIC (a Detection2DArray
whose header equals the image's) or after ``--lockstep-timeout`` seconds, which is counted.

Exit codes: 0 success, 1 invalid options, 2 a bag that cannot be read (missing, corrupt or
truncated; a partly readable bag is replayed up to the damage first).
"""

import argparse
import collections
from dataclasses import dataclass, field
import importlib
import json
import statistics
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import rclpy
from rclpy.duration import Duration
from rclpy.exceptions import InvalidTopicNameException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import (
    DurabilityPolicy, HistoryPolicy, qos_profile_sensor_data, QoSProfile, ReliabilityPolicy)
from rclpy.signals import SignalHandlerOptions
from rosgraph_msgs.msg import Clock
from tqdm import tqdm
from vision_msgs.msg import Detection2DArray

from gradclip_ros import bags

IMAGE_TYPES = bags.IMAGE_TYPES
# History depth of reliable publishers (keep last). NOTE: at --rate 0 a subscriber slower than
# the replay can still miss messages on reliable topics once this history wraps around;
# --lockstep or a finite --rate avoid that.
RELIABLE_DEPTH = 10
# Sleep until this close to a message's due time, then spin: time.sleep overshoots by
# 50-100 us on Linux, which a 1 ms spin absorbs.
_SPIN_NS = 1_000_000


@dataclass
class ReplayOptions:
    """Replay settings; ``add_arguments`` documents each field's command-line option."""

    rate: float = 1.0
    loops: int = 1
    start_offset: float = 0.0
    topics: Optional[Sequence[str]] = None
    remaps: Dict[str, str] = field(default_factory=dict)
    clock: bool = False
    reliable: bool = False
    lockstep_topics: Sequence[str] = ()
    lockstep_timeout: float = 5.0
    wait_for_subscribers: float = 0.0
    progress: bool = True


@dataclass
class ReplaySummary:
    """Counts and timing of one replay.

    ``timing_errors_ns`` are |published gap - recorded gap / rate| between consecutive
    messages, measured at publish time inside the replayer (only when ``rate`` > 0 and not
    waiting for lockstep responses).
    """

    published: collections.Counter = field(default_factory=collections.Counter)
    loops: int = 0
    lockstep_responses: int = 0
    lockstep_timeouts: int = 0
    seconds: float = 0.0
    stopped: Optional[str] = None
    skipped_topics: Dict[str, str] = field(default_factory=dict)
    timing_errors_ns: List[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.published.values())

    def timing_error_ms(self) -> Optional[float]:
        """Return the median absolute inter-message gap error in ms, or None."""
        if not self.timing_errors_ns:
            return None
        return statistics.median(self.timing_errors_ns) / 1e6

    def as_dict(self) -> dict:
        return {
            'published': dict(self.published), 'total': self.total, 'loops': self.loops,
            'lockstep_responses': self.lockstep_responses,
            'lockstep_timeouts': self.lockstep_timeouts,
            'seconds': round(self.seconds, 3),
            'msgs_per_s': round(self.total / self.seconds, 1) if self.seconds else None,
            'timing_error_ms_median': self.timing_error_ms(),
            'stopped': self.stopped, 'skipped_topics': self.skipped_topics,
        }

    def to_text(self) -> str:
        lines = [f'published {self.total} messages in {self.seconds:.2f} s '
                 f'({self.loops} loop(s) completed)']
        for topic, count in sorted(self.published.items()):
            lines.append(f'  {topic}: {count}')
        if self.lockstep_responses or self.lockstep_timeouts:
            lines.append(f'  lockstep: {self.lockstep_responses} responded, '
                         f'{self.lockstep_timeouts} timed out')
        if self.timing_errors_ns:
            lines.append(f'  timing: median gap error {self.timing_error_ms():.3f} ms')
        for topic, reason in sorted(self.skipped_topics.items()):
            lines.append(f'  not published: {topic} ({reason})')
        if self.stopped:
            lines.append(f'  stopped early: {self.stopped}')
        return '\n'.join(lines)


def message_class(msgtype: str):
    """Import the rclpy message class of ``pkg/msg/Name``; raises ImportError or ValueError."""
    package, kind, name = msgtype.split('/')
    if kind != 'msg':
        raise ValueError(f'{msgtype} is not a message type')
    return getattr(importlib.import_module(f'{package}.msg'), name)


def normalize_topic(name: str) -> str:
    """Return ``name`` with exactly one leading slash (bags store absolute topic names)."""
    return '/' + name.strip().lstrip('/')


class BagReplayer(Node):
    """Publish the messages of a ``bags.BagSource`` with their recorded timing.

    Call ``run()`` from one thread while an executor spins the node in another; the executor
    only serves the lockstep response subscriptions. The node declares no ROS parameters: it is
    configured by ``ReplayOptions`` from the command line.
    """

    def __init__(self, source: bags.BagSource, options: ReplayOptions,
                 node_name: str = 'bag_replayer'):
        super().__init__(node_name)
        self.source = source
        self.options = options
        self.summary = ReplaySummary()
        self._stop = threading.Event()
        self._responses = threading.Condition()
        self._responded: set = set()
        self._bag_publishers: Dict[str, object] = {}
        self._out_names: Dict[str, str] = {}
        self._clock_publisher = None

        self._create_publishers()
        if options.clock:
            self._clock_publisher = self.create_publisher(
                Clock, '/clock', QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self._response_subscriptions = [
            self.create_subscription(
                Detection2DArray, topic, self._on_response,
                QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE), raw=True)
            for topic in options.lockstep_topics]
        self.get_logger().info(
            f'replaying {source.path}: {len(self._bag_publishers)} topic(s), rate {options.rate}, '
            f'loops {options.loops or "forever"}, start offset {options.start_offset} s, '
            f'clock {"on" if options.clock else "off"}, '
            f'{"reliable" if self._images_reliable() else "best-effort"} images, lockstep '
            f'{", ".join(options.lockstep_topics) or "off"}')

    def _images_reliable(self) -> bool:
        # Lockstep needs every image delivered, so it implies reliable image publishers.
        # NOTE: a best-effort subscriber still gets best-effort delivery. With Fast DDS's
        # default UDP settings it lost most raw full-HD frames here, so subscribe reliably.
        return self.options.reliable or bool(self.options.lockstep_topics)

    def _qos_for(self, msgtype: str) -> QoSProfile:
        if msgtype == bags.LABEL_INFO_TYPE:
            return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.TRANSIENT_LOCAL)
        if msgtype in IMAGE_TYPES and not self._images_reliable():
            return qos_profile_sensor_data
        return QoSProfile(depth=RELIABLE_DEPTH, history=HistoryPolicy.KEEP_LAST,
                          reliability=ReliabilityPolicy.RELIABLE)

    def _create_publishers(self) -> None:
        selected = self.source.topics
        if self.options.topics:
            wanted = [normalize_topic(t) for t in self.options.topics]
            missing = [t for t in wanted if t not in selected]
            if missing:
                raise ValueError(f'topic(s) {", ".join(missing)} not in the bag; topics: '
                                 f'{", ".join(selected) or "none"}')
            selected = {t: selected[t] for t in wanted}
        remaps = {normalize_topic(k): normalize_topic(v) for k, v in self.options.remaps.items()}
        unknown = sorted(set(remaps) - set(self.source.topics))
        if unknown:
            raise ValueError(f'remap source(s) {", ".join(unknown)} not in the bag; topics: '
                             f'{", ".join(self.source.topics)}')

        for topic, info in selected.items():
            if topic in self.source.unsupported:
                self.summary.skipped_topics[topic] = f'{info.msgtype} has no ROS 2 definition'
                continue
            try:
                msg_class = message_class(info.msgtype)
            except (ImportError, AttributeError, ValueError) as error:
                self.summary.skipped_topics[topic] = f'cannot import {info.msgtype}: {error}'
                continue
            out_name = remaps.get(topic, topic)
            qos = self._qos_for(info.msgtype)
            try:
                self._bag_publishers[topic] = self.create_publisher(msg_class, out_name, qos)
            except InvalidTopicNameException:
                self.summary.skipped_topics[topic] = (
                    f'{out_name!r} is not a valid ROS 2 topic name; rename it with --remap')
                continue
            self._out_names[topic] = out_name
        for topic, reason in self.summary.skipped_topics.items():
            self.get_logger().warning(f'not publishing {topic}: {reason}')
        if not self._bag_publishers:
            raise ValueError(f'nothing to publish from {self.source.path}')

    def _on_response(self, cdr: bytes) -> None:
        try:
            key = bags.cdr_header(cdr)
        except (IndexError, ValueError) as error:
            self.get_logger().warning(f'ignoring an unreadable lockstep response: {error}',
                                      throttle_duration_sec=5.0)
            return
        with self._responses:
            self._responded.add(key)
            self._responses.notify_all()

    def stop(self) -> None:
        """Ask ``run()`` to return after the message it is publishing."""
        self._stop.set()
        with self._responses:
            self._responses.notify_all()

    def wait_for_subscribers(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for a subscriber on every topic and /clock.

        Lockstep response topics must have a publisher as well.
        """
        publishers = {self._out_names[t]: p for t, p in self._bag_publishers.items()}
        if self._clock_publisher is not None:
            publishers['/clock'] = self._clock_publisher
        deadline = time.monotonic() + timeout
        lonely, silent = [], []
        while time.monotonic() < deadline and not self._stop.is_set():
            lonely = [name for name, p in publishers.items() if p.get_subscription_count() == 0]
            # A response sent before its publisher matched would be lost and time out.
            silent = [s.topic_name for s in self._response_subscriptions
                      if s.get_publisher_count() == 0]
            if not lonely and not silent:
                return
            time.sleep(0.02)
        if lonely:
            self.get_logger().warning(
                f'no subscriber after {timeout} s on: {", ".join(lonely)}; publishing anyway')
        if silent:
            self.get_logger().warning(
                f'no publisher after {timeout} s on lockstep topic(s): {", ".join(silent)}')

    def _wait_for_response(self, key: Tuple[int, str]) -> bool:
        """Wait until the image with header ``key`` has a response; False on timeout or stop."""
        deadline = time.monotonic() + self.options.lockstep_timeout
        with self._responses:
            while key not in self._responded:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return False
                self._responses.wait(remaining)
            self._responded.discard(key)
            return True

    def _settle_lockstep(self, pending: Optional[Tuple[int, str]]) -> None:
        if pending is None:
            return
        if self._wait_for_response(pending):
            self.summary.lockstep_responses += 1
        elif not self._stop.is_set():
            self.summary.lockstep_timeouts += 1
            self.get_logger().warning(
                f'no lockstep response for the image stamped {pending[0]} ns '
                f'(frame_id {pending[1]!r}) within {self.options.lockstep_timeout} s',
                throttle_duration_sec=5.0)

    def run(self) -> ReplaySummary:
        """Publish the selected topics; returns the summary (also kept in ``self.summary``).

        Raises bags.BagReadError when the bag turns out to be damaged part-way; what came
        before the damage has been published by then and is counted in ``self.summary``.
        """
        options = self.options
        if options.wait_for_subscribers > 0:
            self.wait_for_subscribers(options.wait_for_subscribers)
        start_ns = None
        if options.start_offset > 0:
            start_ns = self.source.start_ns + round(options.start_offset * 1e9)
        per_loop = sum(info.count for topic, info in self.source.topics.items()
                       if topic in self._bag_publishers)
        total = per_loop * options.loops if options.loops else None
        started = time.monotonic()
        progress = tqdm(total=total, unit='msg', desc='replay', disable=not options.progress,
                        dynamic_ncols=True, mininterval=0.5)
        try:
            loop = 0
            while not self._stop.is_set() and (options.loops == 0 or loop < options.loops):
                self._play_once(start_ns, progress)
                if self._stop.is_set():
                    break
                loop += 1
                self.summary.loops = loop
        finally:
            progress.close()
            self.summary.seconds = time.monotonic() - started
            self._drain()
        return self.summary

    def _drain(self, timeout: float = 5.0) -> None:
        """Wait until reliable subscribers acknowledged everything, so an exit loses nothing."""
        deadline = time.monotonic() + timeout
        publishers = list(self._bag_publishers.values())
        if self._clock_publisher is not None:
            publishers.append(self._clock_publisher)
        for publisher in publishers:
            remaining = max(0.0, deadline - time.monotonic())
            # Best-effort publishers return at once.
            if not publisher.wait_for_all_acked(Duration(seconds=remaining)):
                self.get_logger().warning(
                    f'{publisher.topic_name}: not every message was acknowledged by the '
                    f'subscribers within {timeout} s of the end of the replay')
                return

    def _play_once(self, start_ns: Optional[int], progress: tqdm) -> None:
        options = self.options
        rate = options.rate
        lockstep = bool(options.lockstep_topics)
        first_bag_ns = None
        origin_ns = 0
        previous = None  # (bag time, publish time) of the previous message
        pending = None  # header of the last image that awaits a lockstep response
        clock_msg = Clock()
        next_refresh = 0.0

        try:
            for message in self.source.messages(list(self._bag_publishers), start_ns):
                if self._stop.is_set():
                    return
                if first_bag_ns is None:
                    first_bag_ns = message.bag_time_ns
                    origin_ns = time.perf_counter_ns()
                is_image = message.msgtype in IMAGE_TYPES

                if rate > 0:
                    due = origin_ns + int((message.bag_time_ns - first_bag_ns) / rate)
                    _sleep_until(due)
                waited = False
                if lockstep and is_image and pending is not None:
                    before = time.perf_counter_ns()
                    self._settle_lockstep(pending)
                    pending = None
                    waited = True
                    # Later messages keep their recorded gaps to this one instead of
                    # bursting to catch up with the time spent waiting.
                    origin_ns += time.perf_counter_ns() - before

                if self._clock_publisher is not None:
                    clock_msg.clock.sec, clock_msg.clock.nanosec = divmod(
                        message.bag_time_ns, 1_000_000_000)
                    self._clock_publisher.publish(clock_msg)
                self._bag_publishers[message.topic].publish(message.cdr)
                published_ns = time.perf_counter_ns()
                self.summary.published[self._out_names[message.topic]] += 1

                if rate > 0 and previous is not None and not waited:
                    expected = (message.bag_time_ns - previous[0]) / rate
                    self.summary.timing_errors_ns.append(
                        abs(int(published_ns - previous[1] - expected)))
                previous = (message.bag_time_ns, published_ns)
                if lockstep and is_image:
                    pending = bags.cdr_header(message.cdr)

                progress.update(1)
                now = time.monotonic()
                if not progress.disable and now >= next_refresh:
                    next_refresh = now + 0.5
                    self._show_bag_time(progress, message.bag_time_ns)
            if previous is not None and not progress.disable:
                self._show_bag_time(progress, previous[0])
        finally:
            # The last image of the pass still needs its response before the next pass or exit.
            if lockstep and pending is not None and not self._stop.is_set():
                self._settle_lockstep(pending)

    def _show_bag_time(self, progress: tqdm, bag_time_ns: int) -> None:
        progress.set_postfix_str(
            f'bag time {(bag_time_ns - self.source.start_ns) / 1e9:.2f} s', refresh=False)


def _sleep_until(due_ns: int) -> None:
    remaining = due_ns - time.perf_counter_ns()
    if remaining > _SPIN_NS:
        time.sleep((remaining - _SPIN_NS) / 1e9)
    while time.perf_counter_ns() < due_ns:
        pass


# ---------------------------------------------------------------------------------------------
# Command line


def parse_remaps(items: Optional[Sequence[str]]) -> Dict[str, str]:
    """Parse ``old:=new`` pairs; raises ValueError naming the bad item."""
    remaps = {}
    for item in items or []:
        old, sep, new = item.partition(':=')
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f'invalid --remap {item!r}; expected OLD:=NEW')
        remaps[old.strip()] = new.strip()
    return remaps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``replay`` options to ``parser``."""
    parser.add_argument('bag', help='rosbag2 folder, .mcap or .db3 file, or ROS 1 .bag file')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='playback speed factor; 0 publishes as fast as possible '
                        '(default: 1.0)')
    parser.add_argument('--loop', type=int, default=1, metavar='N',
                        help='number of passes over the bag; 0 repeats until interrupted '
                        '(default: 1)')
    parser.add_argument('--start-offset', type=float, default=0.0, metavar='SEC',
                        help='skip the first SEC seconds of bag time (default: 0)')
    parser.add_argument('--topics', nargs='+', metavar='TOPIC',
                        help='bag topics to publish (default: all)')
    parser.add_argument('--remap', action='append', metavar='OLD:=NEW',
                        help='publish bag topic OLD as NEW; repeatable')
    parser.add_argument('--clock', action='store_true',
                        help='publish /clock (rosgraph_msgs/Clock) with the bag time of each '
                        'message, for nodes that run with use_sim_time')
    parser.add_argument('--reliable', action='store_true',
                        help='reliable QoS for images too (default: best effort, the sensor '
                        'data profile); labels are always reliable, LabelInfo reliable and '
                        'transient local')
    parser.add_argument('--lockstep', nargs='+', metavar='TOPIC', default=(),
                        help='publish the next image only after a Detection2DArray with the '
                        'same header arrived on one of these topics (implies reliable images)')
    parser.add_argument('--lockstep-timeout', type=float, default=5.0, metavar='SEC',
                        help='seconds to wait for a lockstep response before moving on; '
                        'timeouts are counted (default: 5.0)')
    parser.add_argument('--wait-for-subscribers', type=float, default=0.0, metavar='SEC',
                        help='wait up to SEC seconds for a subscriber on every topic before '
                        'publishing (default: 0)')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    parser.add_argument('--json', action='store_true',
                        help='print the summary as one JSON object')


def options_from_args(args) -> ReplayOptions:
    """Check the parsed command line and turn it into ReplayOptions; raises ValueError."""
    if args.rate < 0:
        raise ValueError(f'--rate must be >= 0 (0 = as fast as possible), got {args.rate}')
    if args.loop < 0:
        raise ValueError(f'--loop must be >= 0 (0 = forever), got {args.loop}')
    if args.start_offset < 0:
        raise ValueError(f'--start-offset must be >= 0 seconds, got {args.start_offset}')
    if args.lockstep_timeout <= 0:
        raise ValueError(f'--lockstep-timeout must be > 0 seconds, got {args.lockstep_timeout}')
    if args.wait_for_subscribers < 0:
        raise ValueError(
            f'--wait-for-subscribers must be >= 0 seconds, got {args.wait_for_subscribers}')
    return ReplayOptions(
        rate=args.rate, loops=args.loop, start_offset=args.start_offset, topics=args.topics,
        remaps=parse_remaps(args.remap), clock=args.clock, reliable=args.reliable,
        lockstep_topics=list(args.lockstep), lockstep_timeout=args.lockstep_timeout,
        wait_for_subscribers=args.wait_for_subscribers, progress=not args.no_progress)


def main(args=None) -> int:
    """Run ``gradclip-ros replay``; see the module docstring for the exit codes."""
    if args is None or isinstance(args, list):
        parser = argparse.ArgumentParser(prog='gradclip-ros replay', description=__doc__)
        add_arguments(parser)
        args = parser.parse_args(args)
    try:
        options = options_from_args(args)
    except ValueError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    try:
        source = bags.BagSource(args.bag)
    except bags.BagError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    if source.salvaged:
        print(f'warning: {source.salvaged}; replaying what can be read record by record',
              file=sys.stderr)

    # No command-line arguments reach rcl (its ':=' remap syntax would clash with --remap), and
    # no rclpy SIGINT handler, so Ctrl-C stops the replay while the context is still valid.
    rclpy.init(args=[sys.argv[0]], signal_handler_options=SignalHandlerOptions.NO)
    executor = SingleThreadedExecutor()
    node = None
    spinner = threading.Thread(target=_spin, args=(executor,), daemon=True)
    code = 0
    try:
        node = BagReplayer(source, options)
        executor.add_node(node)
        spinner.start()
        try:
            node.run()
        except bags.BagReadError as error:
            node.summary.stopped = str(error)
            print(f'error: {error}', file=sys.stderr)
            code = 2
        except KeyboardInterrupt:
            node.stop()
            node.summary.stopped = 'interrupted'
            code = 130
        print(json.dumps(node.summary.as_dict()) if args.json else node.summary.to_text())
    except ValueError as error:
        print(f'error: {error}', file=sys.stderr)
        code = 1
    finally:
        # Stop the spinning thread before the node goes, so no callback runs during teardown.
        if rclpy.ok():
            rclpy.shutdown()
        if spinner.is_alive():
            spinner.join(timeout=5.0)
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        source.close()
    return code


def _spin(executor) -> None:
    try:
        executor.spin()
    except ExternalShutdownException:
        pass


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
