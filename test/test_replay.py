"""``gradclip-ros replay`` into real rclpy subscribers over DDS (private domain per session)."""

import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from vision_msgs.msg import Detection2DArray

from gradclip_ros import bags
from gradclip_ros.images import message_to_rgb

START_NS = 1_700_000_000_000_000_000
STEP_NS = 100_000_000
FRAMES = 5
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)


def frame_image(index: int) -> np.ndarray:
    image = np.zeros((12, 16, 3), np.uint8)
    image[..., 0] = index * 10
    image[..., 1] = np.arange(16, dtype=np.uint8)[None, :]
    return image


@pytest.fixture(scope='module')
def camera_bag(tmp_path_factory):
    """Write a bag with FRAMES images and labels on /cam, 100 ms apart."""
    path = tmp_path_factory.mktemp('replay') / 'cam'
    typestore = bags.get_bag_typestore()
    with bags.BagWriter(path) as writer:
        for index in range(FRAMES):
            stamp = START_NS + index * STEP_NS
            writer.write('/cam/image_raw', bags.make_image(
                typestore, frame_image(index), stamp, 'cam_optical_frame'), stamp)
            writer.write('/cam/labels', bags.make_detections(
                typestore, stamp, 'cam_optical_frame', [[1, 1, 5, 5]], ['vehicle']), stamp)
    return path


class Collector:
    """A test node that records what arrives on its subscriptions, spun in a thread."""

    def __init__(self, name: str):
        self.node = rclpy.create_node(name)
        self.received = {}
        self.lock = threading.Lock()
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)

    def subscribe(self, msg_type, topic: str, qos=RELIABLE, callback=None):
        self.received[topic] = []

        def store(msg):
            with self.lock:
                self.received[topic].append(msg)
            if callback is not None:
                callback(msg)
        self.node.create_subscription(msg_type, topic, store, qos)

    def start(self):
        self.thread.start()
        return self

    def wait_for(self, topic: str, count: int, timeout: float = 10.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received[topic]) >= count:
                    break
            time.sleep(0.02)
        with self.lock:
            return list(self.received[topic])

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()


@pytest.fixture(scope='module', autouse=True)
def ros_context():
    rclpy.init()
    yield
    rclpy.shutdown()


def run_replay(*argv, timeout=60):
    """Run the real command line; returns (exit code, summary dict or None, stderr)."""
    result = subprocess.run(
        [sys.executable, '-m', 'gradclip_ros.cli', 'replay', *map(str, argv), '--json',
         '--no-progress'], capture_output=True, text=True, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith('{') else None
    return result.returncode, summary, result.stderr


def stamp_of(msg) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def test_replay_order_count_clock_remap(camera_bag):
    collector = Collector('replay_listener')
    collector.subscribe(Image, '/replayed/image')
    collector.subscribe(Image, '/cam/image_raw')
    collector.subscribe(Detection2DArray, '/cam/labels')
    collector.subscribe(Clock, '/clock')
    collector.start()
    try:
        code, summary, stderr = run_replay(
            camera_bag, '--rate', 0, '--reliable', '--clock', '--remap',
            '/cam/image_raw:=/replayed/image', '--wait-for-subscribers', 20)
        images = collector.wait_for('/replayed/image', FRAMES)
        labels = collector.wait_for('/cam/labels', FRAMES)
        clocks = collector.wait_for('/clock', 2 * FRAMES)
        old_name = collector.received['/cam/image_raw']
    finally:
        collector.close()

    assert code == 0, stderr
    assert summary['published'] == {'/replayed/image': FRAMES, '/cam/labels': FRAMES}
    assert summary['loops'] == 1
    expected = [START_NS + i * STEP_NS for i in range(FRAMES)]
    assert [stamp_of(m) for m in images] == expected
    assert [stamp_of(m) for m in labels] == expected
    for index, msg in enumerate(images):
        assert msg.header.frame_id == 'cam_optical_frame'
        assert np.array_equal(message_to_rgb(msg), frame_image(index))
    assert labels[0].detections[0].results[0].hypothesis.class_id == 'vehicle'
    clock_ns = [m.clock.sec * 1_000_000_000 + m.clock.nanosec for m in clocks]
    assert len(clock_ns) == 2 * FRAMES
    assert clock_ns == sorted(clock_ns)
    assert sorted(set(clock_ns)) == expected
    assert old_name == []


def test_replay_topics_offset_and_loops(camera_bag):
    collector = Collector('offset_listener')
    collector.subscribe(Detection2DArray, '/cam/labels')
    collector.start()
    try:
        code, summary, stderr = run_replay(
            camera_bag, '--topics', 'cam/labels', '--start-offset', 0.25, '--loop', 2,
            '--rate', 0, '--wait-for-subscribers', 20)
        labels = collector.wait_for('/cam/labels', 4)
    finally:
        collector.close()

    assert code == 0, stderr
    assert summary['published'] == {'/cam/labels': 4}
    assert summary['loops'] == 2
    later = [START_NS + 3 * STEP_NS, START_NS + 4 * STEP_NS]
    assert [stamp_of(m) for m in labels] == later + later


def test_replay_lockstep_every_frame_once(camera_bag):
    responder = Collector('lockstep_responder')
    responses = responder.node.create_publisher(Detection2DArray, '/cam/detections', RELIABLE)

    def respond(image):
        time.sleep(0.05)  # a slow detector: without lockstep, rate 0 would outrun it
        responses.publish(Detection2DArray(header=image.header))
    responder.subscribe(Image, '/cam/image_raw', callback=respond)
    responder.start()
    try:
        code, summary, stderr = run_replay(
            camera_bag, '--rate', 0, '--topics', '/cam/image_raw', '--lockstep',
            '/cam/detections', '--lockstep-timeout', 10, '--wait-for-subscribers', 20)
        images = responder.wait_for('/cam/image_raw', FRAMES)
    finally:
        responder.close()

    assert code == 0, stderr
    assert summary['lockstep_responses'] == FRAMES
    assert summary['lockstep_timeouts'] == 0
    assert [stamp_of(m) for m in images] == [START_NS + i * STEP_NS for i in range(FRAMES)]


def test_replay_lockstep_counts_timeouts(camera_bag):
    responder = Collector('silent_responder')
    responses = responder.node.create_publisher(Detection2DArray, '/cam/detections', RELIABLE)

    def respond(image):
        if stamp_of(image) != START_NS + 2 * STEP_NS:  # never responds to the third image
            responses.publish(Detection2DArray(header=image.header))
    responder.subscribe(Image, '/cam/image_raw', callback=respond)
    responder.start()
    try:
        code, summary, stderr = run_replay(
            camera_bag, '--rate', 0, '--topics', '/cam/image_raw', '--lockstep',
            '/cam/detections', '--lockstep-timeout', 0.5, '--wait-for-subscribers', 20)
        images = responder.wait_for('/cam/image_raw', FRAMES)
    finally:
        responder.close()

    assert code == 0, stderr
    assert summary['lockstep_responses'] == FRAMES - 1
    assert summary['lockstep_timeouts'] == 1
    assert len(images) == FRAMES
    assert 'no lockstep response for the image stamped' in stderr


def test_replay_ros1_bag(shared_data):
    collector = Collector('ros1_listener')
    collector.subscribe(Image, '/spot/image')
    collector.start()
    try:
        code, summary, stderr = run_replay(
            shared_data / 'bags' / 'spot_hand_color_rgb8.bag', '--reliable', '--remap',
            '/spot/camera/hand_color/image:=/spot/image', '--wait-for-subscribers', 20)
        images = collector.wait_for('/spot/image', 1)
    finally:
        collector.close()

    assert code == 0, stderr
    assert summary['published'] == {'/spot/image': 1}
    msg = images[0]
    assert (msg.width, msg.height, msg.encoding) == (640, 480, 'rgb8')
    assert msg.header.frame_id == 'gripper_color_camera_z_forward'
    assert stamp_of(msg) == 1648052479616566426
    assert message_to_rgb(msg)[240, 320].tolist() == [172, 175, 171]


def test_replay_truncated_bag_partly(tmp_path):
    path = tmp_path / 'long'
    typestore = bags.get_bag_typestore()
    with bags.BagWriter(path) as writer:
        for index in range(30):
            image = np.full((200, 200, 3), index, np.uint8)
            stamp = START_NS + index * 10_000_000
            writer.write('/cam/image_raw', bags.make_image(typestore, image, stamp, 'c'), stamp)
    mcap_file = next(path.glob('*.mcap'))
    with open(mcap_file, 'r+b') as handle:
        handle.truncate(mcap_file.stat().st_size - 5000)

    collector = Collector('truncated_listener')
    collector.subscribe(Image, '/cam/image_raw')
    collector.start()
    try:
        # Recorded timing (10 ms gaps), so the reliable history of 10 never wraps around.
        code, summary, stderr = run_replay(path, '--reliable', '--wait-for-subscribers', 20)
        published = summary['published']['/cam/image_raw']
        images = collector.wait_for('/cam/image_raw', published)
    finally:
        collector.close()

    assert code == 2
    assert 0 < published < 30
    assert f'{mcap_file} is truncated or corrupt' in stderr
    assert f'reading stopped after {published} messages' in summary['stopped']
    assert [int(m.data[0]) for m in images] == list(range(published))


def test_replay_unreadable_bags(tmp_path):
    garbage = tmp_path / 'garbage.bag'
    garbage.write_bytes(b'#ROSBAG V2.0\n' + b'\x00' * 100)
    shutil.copy(garbage, tmp_path / 'other.bag')

    code, summary, stderr = run_replay(garbage)
    assert code == 2
    assert summary is None
    assert 'garbage.bag' in stderr

    code, _, stderr = run_replay(tmp_path / 'missing')
    assert code == 2
    assert 'bag not found' in stderr and 'missing' in stderr

    code, _, stderr = run_replay(tmp_path / 'other.bag', '--rate', -1)
    assert code == 1
    assert '--rate must be >= 0' in stderr
