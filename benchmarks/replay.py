"""Replay speed and timing accuracy on a bag of real 1920x1080 frames.

The bag is made in a temporary folder with ``gradclip-ros convert`` from the Apollo frames of
the real data kit (42 raw rgb8 images of about 6 MB each, plus their labels). Measured:

- ``read_msgs_per_s``: rosbags reading the bag alone, the way replay reads it (rosbag2
  messages stay serialized CDR bytes, nothing is deserialized).
- ``deserialize_msgs_per_s``: the same with every message deserialized by rosbags, for
  comparison.
- ``replay_msgs_per_s``: ``BagReplayer`` publishing as fast as possible (``--rate 0``) with one
  best-effort image subscriber in a separate process; ``replay_vs_read`` is its ratio to
  ``read_msgs_per_s`` (target >= 0.5). ``replay_no_subscriber_msgs_per_s`` is the same
  without any subscriber.
- ``timing_error_ms_median``: at ``--rate 1.0``, the median absolute difference between the
  recorded gap and the published gap of consecutive messages, measured at publish time
  inside the replayer (target < 2 ms).

Run: ``python benchmarks/replay.py [--json] [--loops N]``. ROS traffic stays on this machine;
set ROS_DOMAIN_ID to a private value when others share the machine.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import rclpy
from rclpy.executors import SingleThreadedExecutor

from gradclip_ros import bags, convert
from gradclip_ros.replay import BagReplayer, ReplayOptions

REPO = pathlib.Path(__file__).resolve().parents[1]
APOLLO = REPO.parent / 'shared' / 'data' / 'driving' / 'apollo'

SUBSCRIBER = """
import sys, time, rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from vision_msgs.msg import Detection2DArray
rclpy.init()
node = rclpy.create_node('benchmark_image_counter')
count = [0]
def on_image(msg):
    count[0] += 1
for topic in sys.argv[1:]:
    if topic.endswith('/labels'):
        node.create_subscription(Detection2DArray, topic, lambda msg: None, 10, raw=True)
    else:
        node.create_subscription(Image, topic, on_image, qos_profile_sensor_data, raw=True)
print('ready', flush=True)
try:
    while rclpy.ok():
        rclpy.spin_once(node, timeout_sec=0.1)
        if sys.stdin.closed:
            break
except KeyboardInterrupt:
    pass
print(count[0], flush=True)
"""


def make_bag(folder: pathlib.Path) -> pathlib.Path:
    """Convert the Apollo frames into a raw rgb8 mcap bag under ``folder``."""
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    output = folder / 'apollo_full_hd'
    args = parser.parse_args([
        '--camera-dir', f'narrow={APOLLO / "narrow"}', '--camera-dir',
        f'obstacle={APOLLO / "obstacle"}', '--coco', str(APOLLO / 'labels.json'),
        '--output', str(output), '--no-progress'])
    with open(os.devnull, 'w') as sink:
        convert.convert(args, stream=sink)
    return output


def measure_read(bag_path: pathlib.Path, loops: int, deserialize: bool) -> float:
    """Return messages per second of reading the bag ``loops`` times (one source, as replay)."""
    count = 0
    typestore = bags.get_bag_typestore()
    with bags.BagSource(bag_path) as source:
        started = time.perf_counter()
        for _ in range(loops):
            for message in source.messages():
                if deserialize:
                    typestore.deserialize_cdr(message.cdr, message.msgtype)
                count += 1
        return count / (time.perf_counter() - started)


def measure_replay(bag_path: pathlib.Path, options: ReplayOptions):
    """Replay in this process with a spinning executor; returns the ReplaySummary."""
    with bags.BagSource(bag_path) as source:
        node = BagReplayer(source, options, node_name='benchmark_replayer')
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        try:
            return node.run()
        finally:
            executor.shutdown()
            node.destroy_node()


def start_subscriber(topics):
    """Start a subscriber process on ``topics`` that counts images; wait until it is ready."""
    process = subprocess.Popen([sys.executable, '-c', SUBSCRIBER, *topics],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    process.stdout.readline()
    return process


def run(loops: int) -> dict:
    with tempfile.TemporaryDirectory(prefix='gradclip_replay_bench_') as tmp:
        bag_path = make_bag(pathlib.Path(tmp))
        with bags.BagSource(bag_path) as source:
            messages = sum(topic.count for topic in source.topics.values())
            topics = list(source.topics)

        measure_read(bag_path, 1, deserialize=False)  # warm the page cache
        read = measure_read(bag_path, loops, deserialize=False)
        deserialized = measure_read(bag_path, loops, deserialize=True)

        rclpy.init()
        try:
            alone = measure_replay(bag_path, ReplayOptions(rate=0.0, loops=loops,
                                                           progress=False))
            subscriber = start_subscriber(topics)
            try:
                fast = measure_replay(bag_path, ReplayOptions(
                    rate=0.0, loops=loops, progress=False, wait_for_subscribers=10.0))
                timed = measure_replay(bag_path, ReplayOptions(
                    rate=1.0, loops=1, progress=False, wait_for_subscribers=10.0))
            finally:
                subscriber.send_signal(2)
                received = subscriber.communicate(timeout=30)[0].strip().splitlines()
        finally:
            rclpy.shutdown()

    replay = fast.total / fast.seconds
    return {
        'bag': 'Apollo narrow+obstacle, 42 raw rgb8 1920x1080 images + 42 labels, mcap',
        'messages_per_pass': messages,
        'loops': loops,
        'read_msgs_per_s': round(read, 1),
        'deserialize_msgs_per_s': round(deserialized, 1),
        'replay_msgs_per_s': round(replay, 1),
        'replay_no_subscriber_msgs_per_s': round(alone.total / alone.seconds, 1),
        'replay_vs_read': round(replay / read, 3),
        'images_received_by_subscriber': int(received[-1]) if received else None,
        'images_published': loops * 42 + 42,
        'timing_error_ms_median': round(timed.timing_error_ms(), 4),
        'timing_measured_at': 'publish time inside the replayer, rate 1.0',
        'cpu_count': os.cpu_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--loops', type=int, default=5,
                        help='passes over the 84-message bag per measurement (default: 5)')
    args = parser.parse_args()
    if not APOLLO.is_dir():
        print(f'error: real data not found: {APOLLO}', file=sys.stderr)
        return 1
    result = run(args.loops)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f'{"metric":<34} {"value":>12}  target')
    rows = [
        ('read_msgs_per_s', result['read_msgs_per_s'], ''),
        ('deserialize_msgs_per_s', result['deserialize_msgs_per_s'], ''),
        ('replay_msgs_per_s', result['replay_msgs_per_s'], ''),
        ('replay_no_subscriber_msgs_per_s', result['replay_no_subscriber_msgs_per_s'], ''),
        ('replay_vs_read', result['replay_vs_read'], '>= 0.5'),
        ('timing_error_ms_median', result['timing_error_ms_median'], '< 2'),
    ]
    for name, value, target in rows:
        print(f'{name:<34} {value:>12}  {target}')
    print(f'images received by the subscriber: {result["images_received_by_subscriber"]} of '
          f'{result["images_published"]} (best effort)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
