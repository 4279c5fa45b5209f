"""online_learner_node over real Fast DDS: pairing, label checks, training, gated hand-over.

Each test starts the node in its own rclpy Context (or as a process, for the shutdown test)
and talks to it through a client node: camera images and labels in; model_updates,
training_stats and /diagnostics out. Frames are real Apollo frames, downscaled to 480x270 to
keep the messages small; the node trains at 128 px.
"""

import array
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import cv2
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
import pytest
import rclpy
from rclpy.exceptions import InvalidParameterValueException
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from test_perception_node import start_node as start_perception
import torch
from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose
import yaml

from gradclip_ros.checkpoints import load_checkpoint, save_checkpoint
from gradclip_ros.images import encode_compressed
from gradclip_ros.model import ModelSpec
from gradclip_ros.online_learner_node import OnlineLearnerNode, PARAMETERS
from gradclip_ros.training import prepare_frame, Trainer, TrainerConfig

torch.set_num_threads(1)

WAIT_S = 60.0  # generous: other test runs may share the two CPU cores
SIZE = (480, 270)  # width, height of the published frames
CLASSES = ['vehicle', 'pedestrian']
STATUS = 'online_learner_node: online learning'
REPO = pathlib.Path(__file__).resolve().parents[1]

RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50,
                      reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                     reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


@pytest.fixture(scope='module')
def frames(shared_data):
    """Apollo frames at 480x270 in stamp order: (rgb, boxes xyxy float32 [2, 4])."""
    root = shared_data / 'driving' / 'apollo'
    coco = json.loads((root / 'labels.json').read_text())
    result = []
    scale = np.array([SIZE[0] / 1920, SIZE[1] / 1080] * 2, np.float32)
    for image in sorted(coco['images'], key=lambda item: item['stamp_ns']):
        rgb = cv2.imread(str(root / image['file_name']))[:, :, ::-1]
        rgb = cv2.resize(rgb, SIZE, interpolation=cv2.INTER_AREA)
        boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (
            a['bbox'] for a in coco['annotations'] if a['image_id'] == image['id'])],
            np.float32) * scale
        result.append((np.ascontiguousarray(rgb), boxes))
    return result


def node_parameters(tmp_path, **changes):
    values = {
        'cameras': ['cam_a', 'cam_b'], 'transports': ['raw', 'compressed'],
        'reliability': ['reliable'], 'class_names': CLASSES, 'input_size': 128,
        'min_buffer_frames': 2, 'holdout_every': 3, 'min_holdout_frames': 1,
        'validate_every': 4, 'max_duty_cycle': 1.0, 'sync_tolerance': 0.005, 'max_wait': 1.0,
        'checkpoint_dir': str(tmp_path / 'checkpoints'),
        'handover_dir': str(tmp_path / 'models'), 'run_dir': str(tmp_path / 'run'),
        'diagnostics_period': 0.2,
    }
    values.update(changes)
    return values


class LearnerUnderTest:
    """An OnlineLearnerNode in its own Context, spun by an executor thread."""

    def __init__(self, **parameters):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        overrides = [Parameter(name, value=value) for name, value in parameters.items()]
        try:
            self.node = OnlineLearnerNode(context=self.context, parameter_overrides=overrides)
        except BaseException:
            rclpy.shutdown(context=self.context)
            raise
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.node.stop()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        self.thread.join(timeout=5.0)


class Client:
    """Test-side node: publishes images and labels, records the learner's outputs."""

    def __init__(self, cameras=('cam_a', 'cam_b'), transports=('raw', 'compressed')):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('learner_test_client', context=self.context)
        self.lock = threading.Lock()
        self.updates, self.stats, self.diagnostics, self.perception = [], [], [], []
        self.images, self.labels = {}, {}
        for camera, transport in zip(cameras, transports):
            if transport == 'compressed':
                self.images[camera] = self.node.create_publisher(
                    CompressedImage, f'{camera}/image_raw/compressed', RELIABLE)
            else:
                self.images[camera] = self.node.create_publisher(
                    Image, f'{camera}/image_raw', RELIABLE)
            self.labels[camera] = self.node.create_publisher(
                Detection2DArray, f'{camera}/labels', RELIABLE)
        self.transports = dict(zip(cameras, transports))
        self.node.create_subscription(String, 'model_updates', self._store(self.updates),
                                      LATCHED)
        self.node.create_subscription(DiagnosticStatus, 'training_stats',
                                      self._store(self.stats), 50)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 50)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _store(self, target):
        def store(msg):
            with self.lock:
                target.append(msg)
        return store

    def _on_diagnostics(self, msg):
        with self.lock:
            for status in msg.status:
                if status.name == STATUS:
                    self.diagnostics.append({v.key: v.value for v in status.values})
                elif status.name == 'perception_node: model':
                    self.perception.append({v.key: v.value for v in status.values})

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        self.thread.join(timeout=5.0)

    def wait_for(self, predicate, what, timeout=WAIT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                result = predicate()
            if result:
                return result
            time.sleep(0.05)
        raise AssertionError(f'timed out after {timeout} s waiting for {what}')

    def wait_connected(self):
        for camera in self.images:
            for publisher in (self.images[camera], self.labels[camera]):
                self.wait_for(lambda: publisher.get_subscription_count() > 0,
                              f'the learner to subscribe to {publisher.topic_name}')

    def latest(self, key):
        """Return the newest diagnostics value of ``key`` (as text), or None."""
        return self.diagnostics[-1].get(key) if self.diagnostics else None

    def publish_image(self, camera, rgb, stamp_ns):
        if self.transports[camera] == 'compressed':
            data = array.array('B')
            data.frombytes(encode_compressed(rgb, 'jpeg'))
            msg = CompressedImage(format='jpeg', data=data)
        else:
            data = array.array('B')
            data.frombytes(rgb.tobytes())
            msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding='rgb8',
                        is_bigendian=0, step=rgb.shape[1] * 3, data=data)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        msg.header.frame_id = camera
        self.images[camera].publish(msg)

    def publish_labels(self, camera, boxes, stamp_ns, classes=None):
        """Publish xyxy boxes as Detection2DArray (center/size) with class names."""
        msg = Detection2DArray()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        msg.header.frame_id = camera
        for index, (x1, y1, x2, y2) in enumerate(boxes):
            detection = Detection2D()
            detection.bbox.center.position.x = float((x1 + x2) / 2)
            detection.bbox.center.position.y = float((y1 + y2) / 2)
            detection.bbox.size_x = float(x2 - x1)
            detection.bbox.size_y = float(y2 - y1)
            hypothesis = ObjectHypothesisWithPose()
            hypothesis.hypothesis.class_id = (classes[index] if classes else 'vehicle')
            hypothesis.hypothesis.score = 1.0
            detection.results.append(hypothesis)
            msg.detections.append(detection)
        self.labels[camera].publish(msg)

    def publish_frames(self, frames, start_ns=1_000_000_000, period_ns=50_000_000):
        """Publish every frame with its labels, alternating cameras.

        Labels go first half of the time, so both arrival orders occur.
        """
        for index, (rgb, boxes) in enumerate(frames):
            camera = 'cam_a' if index % 2 == 0 else 'cam_b'
            stamp = start_ns + index * period_ns
            if index % 4 < 2:
                self.publish_labels(camera, boxes, stamp)
                self.publish_image(camera, rgb, stamp)
            else:
                self.publish_image(camera, rgb, stamp)
                self.publish_labels(camera, boxes, stamp)
            time.sleep(0.02)


@pytest.fixture
def client():
    client = Client()
    yield client
    client.close()


def test_yaml_lists_every_parameter():
    data = yaml.safe_load((REPO / 'config' / 'online_learning.yaml').read_text())
    parameters = data['online_learner_node']['ros__parameters']
    assert sorted(parameters) == sorted(PARAMETERS)
    for name, value in parameters.items():
        default = PARAMETERS[name][0]
        assert value == default, name


def test_bad_labels_dropped_box_by_box(tmp_path, frames, client):
    learner = LearnerUnderTest(**node_parameters(tmp_path, min_buffer_frames=1000))
    try:
        client.wait_connected()
        rgb, boxes = frames[0]
        bad = np.array([[10, 10, 60, 40],        # good
                        [10, 10, 60, 40],        # unknown class
                        [600, 10, 650, 40],      # outside the 480x270 image
                        [30, 30, 30, 60],        # zero width
                        [np.nan, 10, 60, 40]],   # NaN
                       np.float32)
        classes = ['vehicle', 'truck', 'vehicle', 'vehicle', 'vehicle']
        stamp = 5_000_000_000
        client.publish_labels('cam_a', bad, stamp, classes)
        client.publish_image('cam_a', rgb, stamp)
        client.publish_labels('cam_b', boxes, stamp)
        client.publish_image('cam_b', rgb, stamp + 2_000_000)  # 2 ms apart: still pairs
        client.wait_for(lambda: client.latest('samples_seen') == '2', 'two paired frames')
        for kind in ('unknown_class', 'outside_image', 'non_positive_size', 'non_finite'):
            assert client.latest(f'dropped_labels_{kind}') == '1', kind
        assert learner.node.trainer.frames_offered == 2
        kept = sorted(len(frame.boxes) for frame in learner.node.trainer.buffer.sample(
            2, np.random.default_rng(0)))
        assert kept == [1, 2]

        # Unpaired labels expire after max_wait; an image 20 ms off never pairs.
        client.publish_labels('cam_a', boxes, 9_000_000_000)
        client.publish_image('cam_a', rgb, 9_020_000_000)
        client.wait_for(lambda: client.latest('expired_labels') == '1'
                        and client.latest('expired_images') == '1', 'expiry')
        assert client.latest('samples_seen') == '2'
    finally:
        learner.close()


def test_learner_trains_and_hands_over(tmp_path, frames, client):
    (tmp_path / 'models').mkdir()
    perception = start_perception(
        cameras=['cam_a'], model_dir=str(tmp_path / 'models'), device='cpu', input_size=128,
        class_names=CLASSES, diagnostics_period=0.2)
    learner = LearnerUnderTest(**node_parameters(tmp_path))
    try:
        client.wait_connected()
        client.publish_frames(frames[:12])
        update = client.wait_for(lambda: client.updates and client.updates[-1],
                                 'a model update')
        path = pathlib.Path(update.data)
        assert path.parent == tmp_path / 'models'
        _, spec, metadata = load_checkpoint(path)
        assert spec.version.startswith('step-')
        assert spec.class_names == tuple(CLASSES)
        assert spec.score is not None

        stats = client.wait_for(lambda: len(client.stats) >= 4 and client.stats, 'stats')
        values = {item.key: item.value for item in stats[-1].values}
        for key in ('step', 'loss', 'loss_classification', 'lr', 'grad_norm_before',
                    'grad_norm_after', 'threshold', 'clipped', 'clip_fraction',
                    'nonfinite_count', 'step_time_s', 'samples_per_s'):
            assert key in values, key
        client.wait_for(lambda: client.latest('handovers') not in (None, '0'),
                        'handovers in diagnostics')
        assert client.latest('deployed_version').startswith('step-')
        assert int(client.latest('holdout_frames')) == 4
        assert float(client.latest('samples_per_s')) > 0.0
        lines = (tmp_path / 'run' / 'train_log.jsonl').read_text().splitlines()
        assert len(lines) >= 4

        client.wait_for(lambda: client.perception and client.perception[-1].get(
            'version', '').startswith('step-'), 'the perception node to load the update')
    finally:
        learner.close()
        perception.close()
    # Shutdown leaves a complete final checkpoint.
    newest = sorted((tmp_path / 'checkpoints').glob('step-*.safetensors'))[-1]
    load_checkpoint(newest)
    assert newest.with_name(newest.name.replace('.safetensors', '.state.pt')).is_file()


@pytest.fixture(scope='module')
def good_checkpoint(frames, tmp_path_factory):
    """Weights fitted at 128 px on the published frames until their mAP@0.5 is >= 0.5."""
    config = TrainerConfig.from_dict({'min_buffer_frames': 1, 'holdout_every': 0})
    spec = ModelSpec(class_names=tuple(CLASSES), input_size=128)
    trainer = Trainer(config, spec)
    prepared = [prepare_frame(rgb, boxes, np.zeros(2, np.int64), 128)[0]
                for rgb, boxes in frames[:12]]
    for frame in prepared:
        trainer.add_prepared(frame)
    score = 0.0
    for _ in range(8):
        for _ in range(25):
            trainer.train_step()
        score = trainer.evaluate(frames=prepared)['map50']
        if score >= 0.5:
            break
    assert score >= 0.5
    path = tmp_path_factory.mktemp('good') / 'good.safetensors'
    save_checkpoint(path, trainer.model.state_dict(), spec.with_version('good'))
    return path


def test_gate_withholds_worse_candidate(tmp_path, frames, client, good_checkpoint):
    # A learning rate this high ruins the weights within a few steps.
    learner = LearnerUnderTest(**node_parameters(
        tmp_path, checkpoint=str(good_checkpoint), learning_rate=5.0, warmup_steps=0,
        clip_mode='norm', clip_max_norm=1e6, validate_every=3, loss_spike_factor=1e6))
    try:
        client.wait_connected()
        client.publish_frames(frames[:12])
        client.wait_for(lambda: client.latest('validations') not in (None, '0'),
                        'a validation')
        assert float(client.latest('deployed_map50')) > 0.1
        assert client.latest('deployed_version') == 'good'
        assert client.latest('handovers') == '0'
        assert int(client.latest('rejected_candidates')) >= 1
        assert not client.updates
        assert not list((tmp_path / 'models').glob('*.safetensors'))
    finally:
        learner.close()


def test_bad_parameter_rejected(tmp_path):
    with pytest.raises(ValueError, match='transports'):
        LearnerUnderTest(**node_parameters(tmp_path, transports=['raw', 'raw', 'raw']))
    with pytest.raises(ValueError, match='optimizer'):
        LearnerUnderTest(**node_parameters(tmp_path, optimizer='lion'))
    with pytest.raises(InvalidParameterValueException, match='learning_rate'):
        LearnerUnderTest(**node_parameters(tmp_path, learning_rate=20.0))


def test_sigint_stops_between_steps(tmp_path, frames, client):
    parameters = node_parameters(tmp_path)
    arguments = []
    for name, value in parameters.items():
        text = json.dumps(value).replace('"', "'") if isinstance(value, list) else value
        arguments += ['-p', f'{name}:={text}']
    process = subprocess.Popen(
        [sys.executable, '-m', 'gradclip_ros.online_learner_node', '--ros-args', *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        client.wait_connected()
        client.publish_frames(frames[:8])
        client.wait_for(lambda: len(client.stats) >= 2, 'two training steps')
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-2000:]
    assert 'final checkpoint written' in output
    assert 'online learner: cameras' in output
    newest = sorted((tmp_path / 'checkpoints').glob('step-*.safetensors'))[-1]
    load_checkpoint(newest)
    assert not list((tmp_path / 'checkpoints').glob('.*.tmp'))
