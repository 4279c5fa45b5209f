"""perception_node over real Fast DDS: encodings, box scale, malformed frames, dropping, params.

The node runs in this process in its own rclpy Context and executor thread. The test client is
a separate rclpy node in another Context, so every message goes through Fast DDS (which
may shortcut the delivery inside one process). The detector is a real
SSDlite fitted in the test to one real Apollo frame with one labelled vehicle box, which makes
the expected output known. The helpers here are also used by test_perception_swap.py.
"""

import array
import json
import re
import subprocess
import sys
import threading
import time

import cv2
from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
import torch
from vision_msgs.msg import Detection2DArray, LabelInfo

from gradclip_ros.checkpoints import save_checkpoint
from gradclip_ros.images import encode_compressed
from gradclip_ros.model import build_model, Detector, images_to_batch, ModelSpec
from gradclip_ros.perception_node import PerceptionNode

torch.set_num_threads(1)

FIT_FILE = 'narrow/1531984547597777197.jpg'
FIT_INPUT_SIZE = 160  # pixels; small so that fitting and inference stay fast on CPU
FIT_STEPS = 60
WAIT_S = 20.0  # generous: other test runs may share the CPU

RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                      reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                     reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


# ---- data ----

def load_fit_example(shared_data):
    """Return the Apollo frame (RGB uint8 [1080, 1920, 3]) and its largest box [4] xyxy px."""
    apollo = shared_data / 'driving' / 'apollo'
    labels = json.loads((apollo / 'labels.json').read_text())
    image_id = next(image['id'] for image in labels['images'] if image['file_name'] == FIT_FILE)
    x, y, w, h = max((ann['bbox'] for ann in labels['annotations']
                      if ann['image_id'] == image_id), key=lambda bbox: bbox[2] * bbox[3])
    rgb = np.ascontiguousarray(cv2.imread(str(apollo / FIT_FILE))[:, :, ::-1])
    return rgb, np.array([x, y, x + w, y + h], np.float32)


def apollo_frames(shared_data, count, size=(640, 480)):
    """Return ``count`` real Apollo frames resized to ``size`` (width, height), RGB uint8."""
    files = sorted((shared_data / 'driving' / 'apollo' / 'obstacle').glob('*.jpg'))[:count]
    return [np.ascontiguousarray(cv2.resize(cv2.imread(str(path)), size,
                                            interpolation=cv2.INTER_AREA)[:, :, ::-1])
            for path in files]


def fit_state_dict(rgb, box, input_size=FIT_INPUT_SIZE, steps=FIT_STEPS):
    """Fit a fresh SSDlite to one image with one 'vehicle' box; return its state dict.

    The batch is the image and its mirror image, because batch norm cannot train on the 1x1
    feature maps of a single image. Afterwards the batch-norm statistics are recomputed on
    that batch, so eval mode reproduces the fitted outputs.
    """
    torch.manual_seed(0)
    spec = ModelSpec(input_size=input_size)
    model = build_model(spec)
    image = images_to_batch([rgb], input_size, torch.device('cpu'))[0]
    height, width = rgb.shape[:2]
    scale = torch.tensor([input_size / width, input_size / height] * 2)
    target = torch.as_tensor(box) * scale
    mirrored = torch.stack([input_size - target[2], target[1], input_size - target[0],
                            target[3]])
    images = [image, image.flip(-1)]
    targets = [{'boxes': target[None], 'labels': torch.tensor([1])},
               {'boxes': mirrored[None], 'labels': torch.tensor([1])}]

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass gives the batch statistics
    with torch.no_grad():
        model(images, targets)
    return model.eval().state_dict()


def write_fitted_checkpoint(path, shared_data, version='v1'):
    """Fit, check and save the one-box checkpoint; return (path, rgb, box)."""
    rgb, box = load_fit_example(shared_data)
    state_dict = fit_state_dict(rgb, box)
    spec = ModelSpec(input_size=FIT_INPUT_SIZE, version=version)
    found = Detector(spec, 'cpu', state_dict=state_dict).predict([rgb])[0]
    assert len(found) >= 1, 'the fitted test checkpoint detects nothing'
    assert found.scores[0] > 0.8, f'fitting the test checkpoint failed: scores {found.scores[:3]}'
    save_checkpoint(path, state_dict, spec)
    return path, rgb, box


# ---- messages ----

def bayer_mosaic(rgb, pattern):
    """Sample RGB [H, W, 3] into a Bayer image [H, W] with ``pattern`` such as 'rggb'."""
    channel = {'r': 0, 'g': 1, 'b': 2}
    mosaic = np.empty(rgb.shape[:2], np.uint8)
    for index, letter in enumerate(pattern):
        row, column = divmod(index, 2)
        mosaic[row::2, column::2] = rgb[row::2, column::2, channel[letter]]
    return mosaic


def image_message(rgb, encoding='rgb8'):
    """Build a sensor_msgs/Image of RGB uint8 [H, W, 3] in ``encoding`` (header left empty)."""
    if encoding == 'rgb8':
        pixels = rgb
    elif encoding == 'bgr8':
        pixels = rgb[:, :, ::-1]
    elif encoding in ('rgba8', 'bgra8'):
        alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
        color = rgb if encoding == 'rgba8' else rgb[:, :, ::-1]
        pixels = np.concatenate([color, alpha], axis=2)
    elif encoding == 'mono8':
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    elif encoding == 'mono16':
        pixels = (cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype('<u2') * 257)
    elif encoding.startswith('bayer_'):
        pixels = bayer_mosaic(rgb, encoding[len('bayer_'):encoding.index('8')])
    else:
        raise ValueError(f'no test conversion for {encoding}')
    pixels = np.ascontiguousarray(pixels)
    height, width = pixels.shape[:2]
    data = array.array('B')
    data.frombytes(pixels.tobytes())
    return Image(height=height, width=width, encoding=encoding, is_bigendian=0,
                 step=pixels.nbytes // height, data=data)


def compressed_message(rgb, image_format):
    """Build a sensor_msgs/CompressedImage of RGB uint8 [H, W, 3] ('jpeg' or 'png')."""
    data = array.array('B')
    data.frombytes(encode_compressed(rgb, image_format))
    return CompressedImage(format=image_format, data=data)


def status_values(diagnostics, name):
    """Return (level, message, {key: value}) of the status called ``name``."""
    for status in diagnostics.status:
        if status.name == name:
            return (int.from_bytes(status.level, 'little'), status.message,
                    {item.key: item.value for item in status.values})
    raise AssertionError(f'no status {name!r} in {[status.name for status in diagnostics.status]}')


def counts(diagnostics, camera):
    _, _, values = status_values(diagnostics, f'perception_node: camera {camera}')
    return {key: int(values[key]) for key in
            ('received', 'processed', 'dropped', 'malformed', 'failed', 'pending')}


# ---- running the node and a client ----

class NodeUnderTest:
    """A PerceptionNode in its own Context, spun by an executor thread."""

    def __init__(self, **parameters):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        overrides = [value if isinstance(value, Parameter) else Parameter(name, value=value)
                     for name, value in parameters.items()]
        try:
            self.node = PerceptionNode(context=self.context, parameter_overrides=overrides)
        except BaseException:
            rclpy.shutdown(context=self.context)
            raise
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        self.thread.join(timeout=5.0)


def start_node(**parameters):
    """Start a node that is closed again by the caller; raises what the constructor raises."""
    return NodeUnderTest(**parameters)


class Client:
    """Test-side rclpy node: camera publishers, result subscriptions and wait helpers."""

    def __init__(self, cameras, transports, name='perception_test_client'):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.lock = threading.Lock()
        self.detections = {camera: [] for camera in cameras}
        self.labels = {camera: [] for camera in cameras}
        self.diagnostics = []
        self.publishers = {}
        self.sequence = 0
        for camera, transport in zip(cameras, transports):
            if transport == 'compressed':
                self.publishers[camera] = self.node.create_publisher(
                    CompressedImage, f'{camera}/image_raw/compressed', RELIABLE)
            else:
                self.publishers[camera] = self.node.create_publisher(
                    Image, f'{camera}/image_raw', RELIABLE)
            self.node.create_subscription(
                Detection2DArray, f'{camera}/detections',
                lambda msg, camera=camera: self._store(self.detections[camera], msg), RELIABLE)
            self.node.create_subscription(
                LabelInfo, f'{camera}/detections/labels',
                lambda msg, camera=camera: self._store(self.labels[camera], msg), LATCHED)
        self.node.create_subscription(
            DiagnosticArray, '/diagnostics',
            lambda msg: self._store(self.diagnostics, msg), 10)
        self.updates = self.node.create_publisher(String, 'model_updates', LATCHED)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _store(self, target, msg):
        with self.lock:
            target.append(msg)

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
            time.sleep(0.01)
        raise AssertionError(f'timed out after {timeout} s waiting for {what}')

    def wait_connected(self, cameras):
        for camera in cameras:
            self.wait_for(lambda: self.publishers[camera].get_subscription_count() > 0,
                          f'the node to subscribe to camera {camera}')

    def publish(self, camera, msg, frame_id=None):
        """Publish ``msg`` with a fresh unique stamp; return the stamp as (sec, nanosec)."""
        self.sequence += 1
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.header.frame_id = frame_id or f'{camera}_optical_frame'
        self.publishers[camera].publish(msg)
        return (msg.header.stamp.sec, msg.header.stamp.nanosec)

    def answer(self, camera, stamp, timeout=WAIT_S):
        """Wait for the detections whose header stamp equals ``stamp``."""
        def find():
            for msg in self.detections[camera]:
                if (msg.header.stamp.sec, msg.header.stamp.nanosec) == stamp:
                    return msg
            return None
        return self.wait_for(find, f'detections with stamp {stamp} on {camera}', timeout)

    def send(self, camera, msg, frame_id=None):
        """Publish ``msg`` and return the Detection2DArray the node published for it."""
        return self.answer(camera, self.publish(camera, msg, frame_id))

    def fresh_diagnostics(self):
        """Wait for a /diagnostics message published after this call and return it."""
        start = self.node.get_clock().now().nanoseconds

        def newest():
            if self.diagnostics:
                stamp = self.diagnostics[-1].header.stamp
                if stamp.sec * 10**9 + stamp.nanosec > start:
                    return self.diagnostics[-1]
            return None
        return self.wait_for(newest, 'a fresh /diagnostics message')

    def settled_counts(self, camera):
        """Wait until the camera has nothing pending and its counters stop changing."""
        previous = None
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            current = counts(self.fresh_diagnostics(), camera)
            if current == previous and current['pending'] == 0:
                return current
            previous = current
        raise AssertionError(f'counters of {camera} did not settle: {previous}')


def detection_boxes(msg):
    """Return [(class_id, score, cx, cy, w, h)] of a Detection2DArray."""
    return [(d.results[0].hypothesis.class_id, d.results[0].hypothesis.score,
             d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.size_x, d.bbox.size_y)
            for d in msg.detections]


# ---- fixtures ----

CAMERAS = ['cam_raw', 'cam_jpeg']
TRANSPORTS = ['raw', 'compressed']


@pytest.fixture(scope='module')
def fitted(tmp_path_factory, shared_data):
    """Fit the one-box checkpoint; returns (path, full-HD RGB frame, its box [4] xyxy px)."""
    folder = tmp_path_factory.mktemp('models')
    return write_fitted_checkpoint(folder / 'v1.safetensors', shared_data)


@pytest.fixture(scope='module')
def graph(fitted):
    """Start the node with the fitted checkpoint on two reliable cameras, plus a client."""
    node = start_node(
        checkpoint=str(fitted[0]), input_size=FIT_INPUT_SIZE, device='cpu', torch_threads=1,
        cameras=CAMERAS, transports=TRANSPORTS, reliability=['reliable'],
        diagnostics_period=0.2)
    client = Client(CAMERAS, TRANSPORTS)
    try:
        client.wait_connected(CAMERAS)
        yield node, client
    finally:
        client.close()
        node.close()


# ---- tests ----

RAW_ENCODINGS = ['rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16',
                 'bayer_rggb8', 'bayer_bggr8', 'bayer_gbrg8', 'bayer_grbg8']


def test_every_encoding_answered_with_header(graph, fitted):
    _, client = graph
    rgb = cv2.resize(fitted[1], (640, 480), interpolation=cv2.INTER_AREA)
    cases = [('cam_raw', encoding, image_message(rgb, encoding)) for encoding in RAW_ENCODINGS]
    cases.append(('cam_raw', 'rgb8 full HD', image_message(fitted[1], 'rgb8')))
    cases += [('cam_jpeg', image_format, compressed_message(rgb, image_format))
              for image_format in ('jpeg', 'png')]

    for index, (camera, kind, msg) in enumerate(cases):
        frame_id = f'frame_{index}'
        stamp = client.publish(camera, msg, frame_id)
        answer = client.answer(camera, stamp)
        assert answer.header.frame_id == frame_id, kind
        for detection in answer.detections:
            assert detection.header.frame_id == frame_id, kind
            assert (detection.header.stamp.sec, detection.header.stamp.nanosec) == stamp, kind
        if kind in ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'rgb8 full HD', 'png'):
            # Colour decodings of the fitted frame must find its vehicle.
            classes = [box[0] for box in detection_boxes(answer)]
            assert 'vehicle' in classes, f'{kind}: {detection_boxes(answer)}'


def test_labels_latched_with_class_map(graph):
    _, client = graph
    for camera in CAMERAS:
        labels = client.wait_for(lambda: client.labels[camera], f'LabelInfo on {camera}')
        latest = labels[-1]
        assert [(c.class_id, c.class_name) for c in latest.class_map] == [
            (0, 'vehicle'), (1, 'pedestrian'), (2, 'cyclist'), (3, 'traffic_light')]
        assert latest.threshold == pytest.approx(0.3)


def test_boxes_in_original_pixels(graph, fitted):
    _, client = graph
    full_hd, box = fitted[1], fitted[2]
    for width, height in ((640, 480), (1920, 1080), (1000, 1000)):
        rgb = cv2.resize(full_hd, (width, height), interpolation=cv2.INTER_AREA)
        answer = client.send('cam_raw', image_message(rgb))
        found = detection_boxes(answer)
        assert found, f'no detection at {width}x{height}'
        class_id, score, cx, cy, w, h = max(found, key=lambda item: item[1])
        expected = box * np.array([width / 1920, height / 1080] * 2)
        assert class_id == 'vehicle'
        assert score > 0.5
        # Tolerance: 3 % of the image side, a few pixels at the model's 160 px input.
        assert cx == pytest.approx((expected[0] + expected[2]) / 2, abs=0.03 * width)
        assert cy == pytest.approx((expected[1] + expected[3]) / 2, abs=0.03 * height)
        assert w == pytest.approx(expected[2] - expected[0], abs=0.03 * width)
        assert h == pytest.approx(expected[3] - expected[1], abs=0.03 * height)


def test_empty_result_still_published(graph):
    _, client = graph
    black = np.zeros((480, 640, 3), np.uint8)
    answer = client.send('cam_raw', image_message(black))
    assert len(answer.detections) == 0


def malformed_raw_frames(rgb):
    """Return [(kind, Image)] for every malformed raw frame kind."""
    wrong_step = image_message(rgb)
    wrong_step.step = rgb.shape[1] * 3 - 6
    short = image_message(rgb)
    short.data = short.data[:len(short.data) // 2]
    zero = Image(height=0, width=640, encoding='rgb8', step=1920)
    unknown = image_message(rgb)
    unknown.encoding = 'yuv_unknown'
    return [('wrong step', wrong_step), ('short data', short), ('zero size', zero),
            ('unknown encoding', unknown)]


def test_malformed_frames_counted(graph, fitted):
    _, client = graph
    rgb = cv2.resize(fitted[1], (640, 480), interpolation=cv2.INTER_AREA)
    before_raw = client.settled_counts('cam_raw')
    before_jpeg = client.settled_counts('cam_jpeg')

    bad_jpeg = CompressedImage(format='jpeg', data=array.array('B', b'not an image' * 50))
    cases = [('cam_raw', kind, msg) for kind, msg in malformed_raw_frames(rgb)]
    cases.append(('cam_jpeg', 'undecodable', bad_jpeg))
    expected = {'cam_raw': before_raw['malformed'], 'cam_jpeg': before_jpeg['malformed']}
    for camera, kind, msg in cases:
        client.publish(camera, msg)
        expected[camera] += 1
        # Wait for the count first: the keep-last-1 reader would let the good frame replace
        # a malformed one that the callback has not taken yet.
        client.wait_for(lambda: counts(client.diagnostics[-1], camera)['malformed']
                        == expected[camera], f'{kind} counted as malformed on {camera}')
        # The next good frame is still answered.
        good = image_message(rgb) if camera == 'cam_raw' else compressed_message(rgb, 'jpeg')
        answer = client.send(camera, good)
        assert answer.detections, f'no detection on the good frame after {kind}'

    after_raw = client.settled_counts('cam_raw')
    after_jpeg = client.settled_counts('cam_jpeg')
    assert after_raw['malformed'] - before_raw['malformed'] == 4
    assert after_jpeg['malformed'] - before_jpeg['malformed'] == 1
    assert after_raw['processed'] - before_raw['processed'] == 4
    assert after_jpeg['processed'] - before_jpeg['processed'] == 1


def test_fast_stream_dropped_not_queued(graph, shared_data):
    _, client = graph
    frames = [image_message(rgb) for rgb in apollo_frames(shared_data, 10)]
    before = client.settled_counts('cam_raw')
    answered_before = len(client.detections['cam_raw'])

    # One frame every 2 ms is faster than inference, even at the 160 px input. Back-to-back
    # publishing would be faster still, but the keep-last-1 reader would then drop nearly all
    # frames before the node's callback sees them.
    stamps = []
    for index in range(100):
        stamps.append(client.publish('cam_raw', frames[index % len(frames)]))
        time.sleep(0.002)
    client.answer('cam_raw', stamps[-1])  # the newest frame is always processed
    after = client.settled_counts('cam_raw')

    delta = {key: after[key] - before[key] for key in after}
    assert delta['received'] <= len(stamps)
    assert delta['dropped'] > 0
    assert delta['processed'] < delta['received']
    assert delta['received'] == (delta['processed'] + delta['dropped'] + delta['malformed']
                                 + delta['failed'])
    with client.lock:
        answers = client.detections['cam_raw'][answered_before:]
    assert len(answers) == delta['processed']
    answered = [(msg.header.stamp.sec, msg.header.stamp.nanosec) for msg in answers]
    assert answered == sorted(answered), 'answers arrived out of order'


def set_parameters(client, parameters):
    """Set parameters on the node through its parameter service; return the results."""
    parameter_client = AsyncParameterClient(client.node, 'perception_node')
    assert parameter_client.wait_for_services(timeout_sec=WAIT_S)
    future = parameter_client.set_parameters(parameters)
    client.wait_for(future.done, 'the set_parameters response')
    return future.result().results


def test_score_threshold_changes_at_run_time(graph, fitted):
    node, client = graph
    rgb = cv2.resize(fitted[1], (640, 480), interpolation=cv2.INTER_AREA)
    assert client.send('cam_raw', image_message(rgb)).detections

    try:
        results = set_parameters(client, [Parameter('score_threshold', value=1.0)])
        assert results[0].successful, results[0].reason
        assert node.node.get_parameter('score_threshold').value == 1.0
        assert client.send('cam_raw', image_message(rgb)).detections == []
        labels = client.wait_for(
            lambda: [msg for msg in client.labels['cam_raw'] if msg.threshold == 1.0],
            'LabelInfo with the new threshold')
        assert labels[-1].class_map[0].class_name == 'vehicle'
    finally:
        results = set_parameters(client, [Parameter('score_threshold', value=0.3)])
        assert results[0].successful, results[0].reason
    assert client.send('cam_raw', image_message(rgb)).detections


@pytest.mark.parametrize('name, value', [
    ('model', 'fasterrcnn_mobilenet_v3_large_320_fpn'),  # read-only
    ('cameras', ['other']),  # read-only
    ('score_threshold', 1.5),  # out of range
    ('nms_iou', -0.1),  # out of range
    ('max_detections', 0),  # out of range
    ('silence_timeout', 0.0),  # out of range
])
def test_invalid_parameter_change_rejected(graph, name, value):
    node, client = graph
    before = node.node.get_parameter(name).value
    results = set_parameters(client, [Parameter(name, value=value)])
    assert not results[0].successful
    assert results[0].reason
    assert node.node.get_parameter(name).value == before


@pytest.mark.parametrize('parameters, message', [
    ({'model': 'yolo'}, 'known: fasterrcnn_mobilenet_v3_large_320_fpn, '
                        'ssdlite320_mobilenet_v3_large'),
    ({'cameras': ['a', 'b'], 'transports': ['raw', 'raw', 'raw']}, 'transports has 3 entries'),
    ({'transports': ['h264']}, "invalid transports entry 'h264'; allowed: raw, compressed"),
    ({'reliability': ['sometimes']}, 'allowed: best_effort, reliable'),
    ({'cameras': ['']}, "invalid camera name ''"),
    ({'cameras': ['front', 'front']}, 'repeated'),
    ({'cameras': ['front camera']}, "invalid camera name 'front camera'"),
    ({'device': 'tpu'}, "invalid device 'tpu'"),
])
def test_invalid_configuration_rejected(parameters, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        start_node(**parameters).close()


def test_checkpoint_mismatch_rejected(fitted):
    # The fitted checkpoint has 160 px input and the default classes.
    with pytest.raises(ValueError, match='class_names is .* but the model expects'):
        start_node(checkpoint=str(fitted[0]), input_size=FIT_INPUT_SIZE,
                   class_names=['car', 'person']).close()
    with pytest.raises(ValueError, match='input_size is 160, but the model expects 320'):
        start_node(checkpoint=str(fitted[0])).close()


def test_annotated_image_while_subscribed(graph, fitted):
    _, client = graph
    rgb = cv2.resize(fitted[1], (640, 480), interpolation=cv2.INTER_AREA)
    images = []
    subscription = client.node.create_subscription(
        Image, 'cam_raw/detections/image', lambda msg: client._store(images, msg),
        QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT))
    try:
        node = graph[0].node
        client.wait_for(lambda: node.count_subscribers('cam_raw/detections/image') > 0,
                        'the annotated image subscription to be matched')
        stamp = client.publish('cam_raw', image_message(rgb))
        answer = client.answer('cam_raw', stamp)
        annotated = client.wait_for(
            lambda: [msg for msg in images
                     if (msg.header.stamp.sec, msg.header.stamp.nanosec) == stamp],
            'the annotated image')[0]
    finally:
        client.node.destroy_subscription(subscription)

    assert (annotated.height, annotated.width, annotated.encoding) == (480, 640, 'rgb8')
    assert annotated.header.frame_id == answer.header.frame_id
    pixels = np.frombuffer(annotated.data, np.uint8).reshape(480, 640, 3)
    _, _, cx, cy, w, h = detection_boxes(answer)[0]
    left, top = int(round(cx - w / 2)), int(round(cy - h / 2))
    # The box outline is drawn in the first class colour, (255, 64, 64) RGB.
    assert tuple(pixels[int(cy), left]) == (255, 64, 64)
    assert tuple(pixels[top, int(cx)]) == (255, 64, 64)
    assert not np.array_equal(pixels, rgb)


def test_diagnostics_report_latency_and_rate(graph, fitted):
    _, client = graph
    rgb = cv2.resize(fitted[1], (640, 480), interpolation=cv2.INTER_AREA)
    for _ in range(5):
        client.send('cam_raw', image_message(rgb))
    level, message, values = status_values(client.fresh_diagnostics(),
                                           'perception_node: camera cam_raw')
    assert level == 0, message
    assert values['topic'] == 'cam_raw/image_raw'
    assert float(values['output_rate_hz']) > 0.0
    for source in ('from_stamp', 'from_receive'):
        p50, p95, p99 = (float(values[f'latency_{source}_p{q}_ms']) for q in (50, 95, 99))
        assert 0.0 < p50 <= p95 <= p99 < 60_000.0, source
    _, _, model = status_values(client.diagnostics[-1], 'perception_node: model')
    assert model['version'] == 'v1'
    assert model['weights_source'] == str(fitted[0].resolve())
    assert float(model['inference_p50_ms']) > 0.0


def test_main_exits_on_invalid_model():
    result = subprocess.run(
        [sys.executable, '-m', 'gradclip_ros.perception_node', '--ros-args',
         '-p', 'model:=yolo'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "unknown model 'yolo'" in result.stderr
    assert 'ssdlite320_mobilenet_v3_large' in result.stderr
