"""Camera perception node: one detector serves every camera in batches, with weight hot-swap.

Threads:

- The executor thread runs the subscription callbacks, the parameter services and the
  diagnostics timer. An image callback decodes the frame and stores it in its camera's
  one-slot mailbox. A newer frame replaces an older one that was never processed, and the
  older one is counted as dropped.
- One inference worker takes the newest frame of every camera that has one, runs them as one
  ``Detector.predict`` batch and publishes the results. It swaps in new weights only between
  two batches.
- One loader thread reads and checks the checkpoints named on ``model_updates`` and builds the
  replacement model, so a slow or bad file never stalls inference.
"""

import array
from dataclasses import dataclass
import os
import queue
import re
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
import numpy as np
from rcl_interfaces.msg import (
    FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, SetParametersResult)
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from vision_msgs.msg import (
    Detection2D, Detection2DArray, LabelInfo, ObjectHypothesisWithPose, VisionClass)

from gradclip_ros.checkpoints import load_checkpoint
from gradclip_ros.diagnostics import RateMeter, RollingPercentiles
from gradclip_ros.images import message_to_rgb
from gradclip_ros.model import (
    ARCHITECTURES, DEFAULT_ARCHITECTURE, DEFAULT_CLASSES, Detections, Detector,
    InferenceSettings, ModelSpec)
from gradclip_ros.node_main import per_camera, run_node

NODE_NAME = 'perception_node'
TRANSPORTS = ('raw', 'compressed')
RELIABILITIES = ('best_effort', 'reliable')
RANDOM_INIT = 'random-init'
LATENCY_WINDOW_S = 30.0  # seconds of samples behind the latency percentiles
RATE_WINDOW_S = 5.0  # seconds behind output_rate_hz
_CAMERA_NAME = re.compile(r'^[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*$')


def _float_range(low: float, high: float) -> List[FloatingPointRange]:
    return [FloatingPointRange(from_value=float(low), to_value=float(high), step=0.0)]


def _int_range(low: int, high: int) -> List[IntegerRange]:
    return [IntegerRange(from_value=int(low), to_value=int(high), step=1)]


def parameter_declarations() -> List[Tuple[str, object, ParameterDescriptor]]:
    """Return (name, default, descriptor) for every parameter of the node, in docs order."""
    known = ', '.join(sorted(ARCHITECTURES))
    string, string_array = ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_STRING_ARRAY
    double, integer = ParameterType.PARAMETER_DOUBLE, ParameterType.PARAMETER_INTEGER
    return [
        ('model', DEFAULT_ARCHITECTURE, ParameterDescriptor(
            type=string, read_only=True,
            description=f'Detector architecture; one of: {known}')),
        ('checkpoint', '', ParameterDescriptor(
            type=string, read_only=True,
            description='Starting weights (.safetensors path); empty starts from random '
                        'weights. Its architecture, classes and input size must match')),
        ('device', 'auto', ParameterDescriptor(
            type=string, read_only=True,
            description='Inference device: "auto" (CUDA when available), "cpu", "cuda" or '
                        '"cuda:N"')),
        ('half', False, ParameterDescriptor(
            type=ParameterType.PARAMETER_BOOL, read_only=True,
            description='FP16 inference (CUDA devices only)')),
        ('input_size', 320, ParameterDescriptor(
            type=integer, read_only=True, integer_range=_int_range(64, 2048),
            description='Side of the square the frames are resized to, in pixels')),
        ('score_threshold', 0.3, ParameterDescriptor(
            type=double, floating_point_range=_float_range(0.0, 1.0),
            description='Minimum detection score (0..1) that is published')),
        ('nms_iou', 0.5, ParameterDescriptor(
            type=double, floating_point_range=_float_range(0.0, 1.0),
            description='IoU (0..1) above which non-maximum suppression removes the '
                        'lower-scored of two boxes of one class')),
        ('max_detections', 100, ParameterDescriptor(
            type=integer, integer_range=_int_range(1, 1000),
            description='Maximum detections published per image (1..1000)')),
        ('cameras', ['front'], ParameterDescriptor(
            type=string_array, read_only=True,
            description='Camera names; camera C is read from C/image_raw or '
                        'C/image_raw/compressed and answered on C/detections')),
        ('transports', ['raw'], ParameterDescriptor(
            type=string_array, read_only=True,
            description='Per camera (or one for all): "raw" subscribes to sensor_msgs/Image '
                        'on C/image_raw, "compressed" to sensor_msgs/CompressedImage on '
                        'C/image_raw/compressed')),
        ('reliability', ['best_effort'], ParameterDescriptor(
            type=string_array, read_only=True,
            description='Image subscription QoS reliability per camera (or one for all): '
                        '"best_effort" or "reliable"; history is keep-last 1 either way')),
        ('model_dir', '', ParameterDescriptor(
            type=string, read_only=True,
            description='Folder whose checkpoints model_updates may name (symlinks resolved); '
                        'empty rejects every update')),
        ('class_names', list(DEFAULT_CLASSES), ParameterDescriptor(
            type=string_array, read_only=True,
            description='Detector classes in label-index order; a checkpoint must have the '
                        'same list')),
        ('silence_timeout', 2.0, ParameterDescriptor(
            type=double, floating_point_range=_float_range(0.1, 3600.0),
            description='Seconds without a frame after which a camera reports WARN in '
                        '/diagnostics (0.1..3600 s)')),
        ('diagnostics_period', 1.0, ParameterDescriptor(
            type=double, read_only=True, floating_point_range=_float_range(0.05, 60.0),
            description='Seconds between two /diagnostics messages (0.05..60 s)')),
        ('torch_threads', 0, ParameterDescriptor(
            type=integer, read_only=True, integer_range=_int_range(0, 1024),
            description='torch.set_num_threads value for CPU inference; 0 keeps the torch '
                        'default')),
    ]


def check_camera_names(cameras: Sequence[str]) -> List[str]:
    """Return the camera names when they are non-empty, unique topic tokens; else ValueError."""
    cameras = list(cameras)
    if not cameras:
        raise ValueError('cameras is empty; give at least one camera name, e.g. ["front"]')
    for camera in cameras:
        if not _CAMERA_NAME.match(camera):
            raise ValueError(
                f'invalid camera name {camera!r}; use letters, digits and underscores, '
                f'starting with a letter (a "/" may separate such parts)')
    duplicates = sorted({camera for camera in cameras if cameras.count(camera) > 1})
    if duplicates:
        raise ValueError(f'camera names must be unique; repeated: {duplicates!r}')
    return cameras


def resolve_update_path(path: str, model_dir: str) -> str:
    """Return the real path of a weight update, or raise ValueError when it is not allowed.

    A relative ``path`` is taken relative to ``model_dir``. Symlinks and ``..`` are resolved
    before the containment check, so a link inside ``model_dir`` that points outside it is
    rejected.
    """
    if not model_dir:
        raise ValueError(
            'model_dir is empty, so every weight update is rejected; set the model_dir '
            'parameter to the folder that the learner writes checkpoints to')
    if not path:
        raise ValueError('the update message contains an empty path')
    root = os.path.realpath(model_dir)
    resolved = os.path.realpath(os.path.join(root, path))
    if resolved == root or os.path.commonpath([root, resolved]) != root:
        raise ValueError(f'{path!r} resolves to {resolved!r}, which is outside model_dir {root!r}')
    if not os.path.isfile(resolved):
        raise ValueError(f'{path!r} resolves to {resolved!r}, which is not a file')
    return resolved


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Fuse every Conv2d + BatchNorm2d pair and switch to channels-last memory, in place.

    The model must be in eval mode and is inference-only afterwards (its state_dict no longer
    matches a checkpoint). With fused convolutions all running through oneDNN in channels-last
    layout, one SSDlite predict on a 640x480 frame took 18.8 ms instead of 26.7 ms (1 torch
    thread, 2-core VM).
    """
    if model.training:
        raise ValueError('prepare_for_inference needs a model in eval mode')
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and type(norm) is nn.BatchNorm2d:
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    return model.to(memory_format=torch.channels_last)


def build_detector(spec: ModelSpec, device: str, half: bool, settings: InferenceSettings,
                   state_dict=None) -> Detector:
    """Build a Detector the way the node runs it (fused, channels-last), for benchmarks too."""
    detector = Detector(spec, device=device, half=half, settings=settings,
                        state_dict=state_dict)
    detector.model = prepare_for_inference(detector.model)
    return detector


@dataclass
class Frame:
    """A decoded frame waiting for inference: RGB uint8 [H, W, 3] and its timing."""

    rgb: np.ndarray
    header: Header
    received: float  # time.monotonic() when the callback started, seconds


class CameraState:
    """Mailbox, counters, latency windows and publishers of one camera."""

    def __init__(self, name: str, transport: str, reliability: str):
        self.name = name
        self.transport = transport
        self.reliability = reliability
        self.topic = f'{name}/image_raw' + ('/compressed' if transport == 'compressed' else '')
        self.slot: Optional[Frame] = None  # guarded by the node's condition variable

        # Counters change under the node's condition variable, so a snapshot always satisfies
        # received == processed + dropped + malformed + failed + pending, where pending counts
        # the frame in the slot and the one in the running batch.
        self.received = 0
        self.in_batch = 0
        self.processed = 0
        self.dropped = 0
        self.malformed = 0
        self.failed = 0
        self.last_received: Optional[float] = None

        self.latency_from_stamp = RollingPercentiles(2048, LATENCY_WINDOW_S)
        self.latency_from_receive = RollingPercentiles(2048, LATENCY_WINDOW_S)
        self.output_rate = RateMeter(RATE_WINDOW_S)
        self.logger = None
        self.detections_pub = None
        self.labels_pub = None
        self.image_pub = None


class PerceptionNode(Node):
    """Detect objects in several camera streams with one batched detector.

    Topics are relative, per camera C: subscribes to C/image_raw (sensor_msgs/Image) or
    C/image_raw/compressed, publishes C/detections (vision_msgs/Detection2DArray, boxes in
    pixels of the received image), C/detections/labels (vision_msgs/LabelInfo, transient
    local) and C/detections/image (annotated rgb8 Image, only drawn while subscribed). Also
    subscribes to model_updates (std_msgs/String: path of a new checkpoint) and publishes
    /diagnostics.
    """

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        self._started = time.monotonic()
        self._condition = threading.Condition()
        self._stopping = False
        self._threads: List[threading.Thread] = []
        self._updates: 'queue.Queue[Optional[str]]' = queue.Queue()

        self._declare_parameters()
        config = self._read_configuration()

        if config['torch_threads'] > 0:
            torch.set_num_threads(config['torch_threads'])
        self._settings = InferenceSettings(
            score_threshold=config['score_threshold'], nms_iou=config['nms_iou'],
            max_detections=config['max_detections'])
        self._pending_settings: Optional[InferenceSettings] = None
        self._silence_timeout = config['silence_timeout']
        self._model_dir = config['model_dir']
        self._detector, self._weights_source = self._load_detector(config)
        self._pending_model: Optional[Tuple[nn.Module, ModelSpec, str]] = None
        self._swaps_done = 0
        self._swaps_refused = 0
        self._last_rejection = ''
        self._batches = 0
        self._inference_ms = RollingPercentiles(2048, LATENCY_WINDOW_S)
        self._class_names = self._detector.spec.class_names

        self._cameras = [
            CameraState(name, transport, reliability)
            for name, transport, reliability in zip(
                config['cameras'], config['transports'], config['reliability'])]
        self._create_camera_interfaces()
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        updates_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.create_subscription(String, 'model_updates', self._on_model_update, updates_qos)

        # Registered after the declarations, so the callbacks see only run-time changes.
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self._publish_labels()
        self._start_thread(self._inference_loop, 'perception_inference')
        self._start_thread(self._loader_loop, 'perception_loader')
        self.create_timer(config['diagnostics_period'], self._publish_diagnostics)

        spec = self._detector.spec
        cameras = ', '.join(
            f'{camera.name} ({camera.transport}, {camera.reliability})'
            for camera in self._cameras)
        self.get_logger().info(
            f'started: model {spec.architecture} version {spec.version} from '
            f'{self._weights_source} on {self._detector.device}'
            f'{" fp16" if self._detector.half else ""}, input {spec.input_size} px, '
            f'classes {list(spec.class_names)}, score_threshold {self._settings.score_threshold}'
            f', nms_iou {self._settings.nms_iou}, max_detections '
            f'{self._settings.max_detections}, cameras [{cameras}], model_dir '
            f'{self._model_dir or "(empty: updates rejected)"}, torch threads '
            f'{torch.get_num_threads()}')

    # ---- set-up ----

    def _declare_parameters(self) -> None:
        for name, default, descriptor in parameter_declarations():
            self.declare_parameter(name, default, descriptor)

    def _read_configuration(self) -> Dict[str, object]:
        config = {name: self.get_parameter(name).value
                  for name, _, _ in parameter_declarations()}
        if config['model'] not in ARCHITECTURES:
            raise ValueError(
                f'unknown model {config["model"]!r}; known: {", ".join(sorted(ARCHITECTURES))}')
        config['cameras'] = check_camera_names(config['cameras'])
        config['transports'] = per_camera(
            config['transports'], config['cameras'], 'transports', TRANSPORTS)
        config['reliability'] = per_camera(
            config['reliability'], config['cameras'], 'reliability', RELIABILITIES)
        if config['model_dir'] and not os.path.isdir(config['model_dir']):
            self.get_logger().warning(
                f'model_dir {config["model_dir"]!r} does not exist (yet); updates are '
                f'rejected until it does')
        return config

    def _load_detector(self, config: Dict[str, object]) -> Tuple[Detector, str]:
        expected = ModelSpec(
            architecture=config['model'], class_names=tuple(config['class_names']),
            input_size=config['input_size'])
        state_dict = None
        source = RANDOM_INIT
        if config['checkpoint']:
            source = os.path.realpath(config['checkpoint'])
            state_dict, expected, _ = load_checkpoint(source, expected)
        else:
            self.get_logger().warning(
                'no checkpoint given: starting from RANDOM weights, so the detections are '
                'meaningless until a model update arrives on model_updates')
        detector = build_detector(
            expected, config['device'], config['half'], self._settings, state_dict)
        return detector, source

    def _create_camera_interfaces(self) -> None:
        labels_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL)
        annotated_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST, depth=1,
            reliability=ReliabilityPolicy.BEST_EFFORT)
        for camera in self._cameras:
            # Keep-last 1: the mailbox keeps only the newest frame anyway. NOTE: a frame that
            # the DDS reader replaces before the callback takes it is not counted anywhere.
            image_qos = QoSProfile(
                history=HistoryPolicy.KEEP_LAST, depth=1,
                reliability=(ReliabilityPolicy.RELIABLE if camera.reliability == 'reliable'
                             else ReliabilityPolicy.BEST_EFFORT),
                durability=DurabilityPolicy.VOLATILE)
            message_type = CompressedImage if camera.transport == 'compressed' else Image
            self.create_subscription(
                message_type, camera.topic,
                lambda msg, camera=camera: self._on_image(camera, msg), image_qos)
            camera.detections_pub = self.create_publisher(
                Detection2DArray, f'{camera.name}/detections', 10)
            camera.labels_pub = self.create_publisher(
                LabelInfo, f'{camera.name}/detections/labels', labels_qos)
            camera.image_pub = self.create_publisher(
                Image, f'{camera.name}/detections/image', annotated_qos)
            camera.logger = self.get_logger().get_child(camera.name.replace('/', '_'))

    def _start_thread(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def destroy_node(self) -> None:
        """Stop the worker and loader threads, then destroy the node."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._updates.put(None)
        for thread in self._threads:
            thread.join(timeout=10.0)
        super().destroy_node()

    # ---- executor thread: frames, updates, parameters ----

    def _on_image(self, camera: CameraState, msg) -> None:
        received = time.monotonic()

        # Decoding here keeps it off the inference thread and runs it while a batch is in
        # flight. NOTE: a frame that is later superseded was decoded for nothing, which costs
        # CPU when a camera publishes much faster than inference runs.
        try:
            rgb = message_to_rgb(msg)
        except (ValueError, cv2.error) as error:
            with self._condition:
                camera.received += 1
                camera.malformed += 1
                camera.last_received = received
            camera.logger.warning(
                f'camera {camera.name}: dropped a malformed frame on {camera.topic}: {error}',
                throttle_duration_sec=5.0)
            return

        with self._condition:
            camera.received += 1
            camera.last_received = received
            if camera.slot is not None:
                camera.dropped += 1
            camera.slot = Frame(rgb=rgb, header=msg.header, received=received)
            self._condition.notify()

    def _on_model_update(self, msg: String) -> None:
        path = msg.data.strip()
        self.get_logger().info(f'model update requested: {path!r}')
        self._updates.put(path)

    def _validate_parameters(self, parameters) -> SetParametersResult:
        # Descriptor ranges, types and read-only flags are checked by rclpy before this runs;
        # this catches what a range cannot express.
        for parameter in parameters:
            if parameter.name in ('score_threshold', 'nms_iou', 'silence_timeout'):
                if not np.isfinite(parameter.value):
                    return SetParametersResult(
                        successful=False,
                        reason=f'{parameter.name} must be a finite number, got '
                               f'{parameter.value!r}')
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters) -> None:
        names = {parameter.name for parameter in parameters}
        if 'silence_timeout' in names:
            self._silence_timeout = float(self.get_parameter('silence_timeout').value)
        if names & {'score_threshold', 'nms_iou', 'max_detections'}:
            settings = InferenceSettings(
                score_threshold=float(self.get_parameter('score_threshold').value),
                nms_iou=float(self.get_parameter('nms_iou').value),
                max_detections=int(self.get_parameter('max_detections').value))
            with self._condition:
                self._pending_settings = settings
                self._condition.notify()
        changed = ', '.join(f'{parameter.name}={parameter.value!r}' for parameter in parameters)
        self.get_logger().info(f'parameters changed: {changed}')

    # ---- loader thread ----

    def _loader_loop(self) -> None:
        while True:
            path = self._updates.get()
            if path is None:
                return
            self._load_update(path)

    def _load_update(self, path: str) -> None:
        current = self._detector.spec
        try:
            resolved = resolve_update_path(path, self._model_dir)
            state_dict, spec, _ = load_checkpoint(resolved, expected=current)
            model = prepare_for_inference(self._detector.build_replacement(spec, state_dict))
        # RuntimeError covers load_state_dict and device errors while building the model.
        except (ValueError, RuntimeError, OSError) as error:
            with self._condition:
                self._swaps_refused += 1
                self._last_rejection = str(error)
            self.get_logger().warning(
                f'rejected model update {path!r}: {error}; version {current.version} keeps '
                f'serving')
            return

        with self._condition:
            if self._pending_model is not None:
                self.get_logger().info(
                    f'model update {self._pending_model[2]!r} superseded by {resolved!r} '
                    f'before it was swapped in')
            self._pending_model = (model, spec, resolved)
            self._condition.notify()

    # ---- inference worker ----

    def _has_work(self) -> bool:
        return (self._stopping or self._pending_model is not None
                or self._pending_settings is not None
                or any(camera.slot is not None for camera in self._cameras))

    def _inference_loop(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(self._has_work)
                if self._stopping:
                    return
                replacement, self._pending_model = self._pending_model, None
                settings, self._pending_settings = self._pending_settings, None
                batch = [(camera, camera.slot) for camera in self._cameras
                         if camera.slot is not None]
                for camera, _ in batch:
                    camera.slot = None
                    camera.in_batch += 1

            # Weights and settings change only here, between two batches, so every batch runs
            # on one complete model.
            if replacement is not None:
                self._swap_model(*replacement)
            if settings is not None:
                threshold_changed = settings.score_threshold != self._settings.score_threshold
                self._settings = settings
                self._detector.settings = settings
                if threshold_changed:
                    self._publish_labels()
            if batch:
                self._run_batch(batch)

    def _swap_model(self, model: nn.Module, spec: ModelSpec, source: str) -> None:
        previous = self._detector.spec.version
        self._detector.replace_model(model, spec)
        with self._condition:
            self._weights_source = source
            self._swaps_done += 1
        self.get_logger().info(
            f'swapped model weights: version {previous} -> {spec.version} from {source}')
        if spec.class_names != self._class_names:
            self._class_names = spec.class_names
            self._publish_labels()

    def _run_batch(self, batch: List[Tuple[CameraState, Frame]]) -> None:
        started = time.perf_counter()
        try:
            results = self._detector.predict([frame.rgb for _, frame in batch])
        # Any inference failure (e.g. CUDA out of memory) must not end the worker thread; the
        # frames are counted as failed and the next batch is tried.
        except Exception as error:  # noqa: B902
            with self._condition:
                for camera, _ in batch:
                    camera.in_batch -= 1
                    camera.failed += 1
            self.get_logger().error(
                f'inference failed on a batch of {len(batch)} frame(s) from '
                f'{[camera.name for camera, _ in batch]}: {error!r}',
                throttle_duration_sec=5.0)
            return
        self._inference_ms.add((time.perf_counter() - started) * 1000.0)
        self._batches += 1

        class_names = self._detector.spec.class_names
        for (camera, frame), detections in zip(batch, results):
            message = detections_to_message(detections, frame.header, class_names)
            now_ros = self.get_clock().now()
            now = time.monotonic()
            camera.detections_pub.publish(message)

            stamp = Time.from_msg(frame.header.stamp, clock_type=now_ros.clock_type)
            camera.latency_from_stamp.add((now_ros - stamp).nanoseconds / 1e6, now)
            camera.latency_from_receive.add((now - frame.received) * 1000.0, now)
            camera.output_rate.tick(now=now)
            with self._condition:
                camera.in_batch -= 1
                camera.processed += 1

            if camera.image_pub.get_subscription_count() > 0:
                camera.image_pub.publish(
                    annotated_image(frame.rgb, detections, frame.header, class_names))

    # ---- labels and diagnostics ----

    def _publish_labels(self) -> None:
        message = LabelInfo()
        message.header.stamp = self.get_clock().now().to_msg()
        message.class_map = [
            VisionClass(class_id=index, class_name=name)
            for index, name in enumerate(self._class_names)]
        message.threshold = float(self._settings.score_threshold)
        for camera in self._cameras:
            camera.labels_pub.publish(message)

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        array_msg = DiagnosticArray()
        array_msg.header.stamp = self.get_clock().now().to_msg()
        array_msg.status = [self._camera_status(camera, now) for camera in self._cameras]
        array_msg.status.append(self._model_status(now))
        self._diagnostics_pub.publish(array_msg)

    def _camera_status(self, camera: CameraState, now: float) -> DiagnosticStatus:
        with self._condition:
            counts = {
                'received': camera.received, 'processed': camera.processed,
                'dropped': camera.dropped, 'malformed': camera.malformed,
                'failed': camera.failed,
                'pending': int(camera.slot is not None) + camera.in_batch}
            last_received = camera.last_received
        since = last_received if last_received is not None else self._started
        silent_s = now - since

        status = DiagnosticStatus(name=f'{self.get_name()}: camera {camera.name}',
                                  hardware_id=camera.name)
        if silent_s > self._silence_timeout:
            status.level = DiagnosticStatus.WARN
            status.message = (f'no frame for {silent_s:.1f} s (silence_timeout '
                              f'{self._silence_timeout:g} s) on {camera.topic}')
        else:
            status.level = DiagnosticStatus.OK
            status.message = 'receiving frames'

        values = [('topic', camera.topic), ('transport', camera.transport),
                  ('reliability', camera.reliability)]
        values += [(name, str(count)) for name, count in counts.items()]
        values.append(('output_rate_hz', f'{camera.output_rate.rate(now):.2f}'))
        values.append(('seconds_since_last_frame',
                       f'{silent_s:.2f}' if last_received is not None else 'never'))
        for label, window in (('from_stamp', camera.latency_from_stamp),
                              ('from_receive', camera.latency_from_receive)):
            for quantile, value in window.percentiles((50, 95, 99), now).items():
                values.append((f'latency_{label}_p{quantile:g}_ms', f'{value:.2f}'))
        status.values = [KeyValue(key=key, value=value) for key, value in values]
        return status

    def _model_status(self, now: float) -> DiagnosticStatus:
        spec = self._detector.spec
        with self._condition:
            source = self._weights_source
            swaps_done, swaps_refused = self._swaps_done, self._swaps_refused
            last_rejection = self._last_rejection
        status = DiagnosticStatus(name=f'{self.get_name()}: model',
                                  hardware_id=str(self._detector.device))
        if source == RANDOM_INIT:
            status.level = DiagnosticStatus.WARN
            status.message = 'running on random weights; detections are meaningless'
        else:
            status.level = DiagnosticStatus.OK
            status.message = f'serving version {spec.version}'
        values = [
            ('model', spec.architecture), ('version', spec.version),
            ('score', '' if spec.score is None else f'{spec.score:.4f}'),
            ('device', str(self._detector.device)), ('half', str(self._detector.half)),
            ('input_size', str(spec.input_size)), ('class_names', ','.join(spec.class_names)),
            ('weights_source', source), ('swaps_done', str(swaps_done)),
            ('swaps_refused', str(swaps_refused)), ('last_rejection', last_rejection),
            ('batches', str(self._batches)),
            ('score_threshold', f'{self._settings.score_threshold:g}'),
            ('torch_threads', str(torch.get_num_threads())),
        ]
        for quantile, value in self._inference_ms.percentiles((50, 95, 99), now).items():
            values.append((f'inference_p{quantile:g}_ms', f'{value:.2f}'))
        status.values = [KeyValue(key=key, value=value) for key, value in values]
        return status


def detections_to_message(detections: Detections, header: Header,
                          class_names: Sequence[str]) -> Detection2DArray:
    """Build a Detection2DArray from boxes [N, 4] xyxy pixels; every detection gets ``header``."""
    message = Detection2DArray(header=header)
    for box, score, label in zip(detections.boxes.tolist(), detections.scores.tolist(),
                                 detections.labels.tolist()):
        x1, y1, x2, y2 = box
        detection = Detection2D(header=header)
        detection.bbox.center.position.x = (x1 + x2) / 2.0
        detection.bbox.center.position.y = (y1 + y2) / 2.0
        detection.bbox.size_x = x2 - x1
        detection.bbox.size_y = y2 - y1
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = class_names[label]
        hypothesis.hypothesis.score = score
        detection.results.append(hypothesis)
        message.detections.append(detection)
    return message


def _class_color(label: int) -> Tuple[int, int, int]:
    palette = ((255, 64, 64), (64, 200, 255), (255, 200, 0), (80, 255, 80), (255, 64, 255))
    return palette[label % len(palette)]


def annotated_image(rgb: np.ndarray, detections: Detections, header: Header,
                    class_names: Sequence[str]) -> Image:
    """Draw boxes [N, 4] xyxy pixels and labels on RGB uint8 [H, W, 3]; return an rgb8 Image.

    Draws into ``rgb`` itself when it is writable, since the worker no longer needs the frame.
    """
    canvas = rgb if rgb.flags.writeable and rgb.flags.c_contiguous else rgb.copy()
    for box, score, label in zip(detections.boxes, detections.scores, detections.labels):
        x1, y1, x2, y2 = (int(round(value)) for value in box)
        color = _class_color(int(label))
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 2)
        cv2.putText(canvas, f'{class_names[label]} {score:.2f}', (x1, max(y1 - 4, 10)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1, cv2.LINE_AA)

    height, width = canvas.shape[:2]
    data = array.array('B')
    data.frombytes(memoryview(canvas).cast('B'))
    return Image(header=header, height=height, width=width, encoding='rgb8', is_bigendian=0,
                 step=width * 3, data=data)


def main(args=None) -> int:
    """Run the node until shutdown; returns 1 when the configuration is invalid."""
    return run_node(PerceptionNode, NODE_NAME, args)


if __name__ == '__main__':
    raise SystemExit(main())
