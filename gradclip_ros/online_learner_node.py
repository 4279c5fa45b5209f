"""ROS 2 node that fine-tunes the detector from labeled camera frames while the car drives.

Per camera it subscribes to ``<camera>/image_raw`` (or ``<camera>/image_raw/compressed``) and
``<camera>/labels`` (vision_msgs/Detection2DArray), pairs them by header stamp, checks the
label boxes one by one and feeds the pairs to a ``training.Trainer``. Training runs in a
background thread, limited to ``train_threads`` torch threads and to ``max_duty_cycle`` of
wall time, so the perception node on the same machine keeps its latency. Weights that pass
the hold-out gate are written into ``handover_dir`` and their path is published on
``model_updates``.
"""

import collections
import json
import threading
import time
from typing import Any, Dict, List

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, SetParametersResult)
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy, HistoryPolicy, qos_profile_sensor_data, QoSProfile, ReliabilityPolicy)
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
import torch
from vision_msgs.msg import Detection2DArray

from gradclip_ros.checkpoints import load_checkpoint
from gradclip_ros.images import ImageError, message_to_rgb
from gradclip_ros.label_validation import BAD_LABEL_KINDS, validate_boxes
from gradclip_ros.model import ARCHITECTURES, DEFAULT_ARCHITECTURE, DEFAULT_CLASSES, ModelSpec
from gradclip_ros.node_main import per_camera, run_node
from gradclip_ros.pairing import StampPairer
from gradclip_ros.training import config_from_parameters, Trainer, TrainerConfig

NODE_NAME = 'online_learner_node'
TRANSPORTS = ('raw', 'compressed')
RELIABILITIES = ('best_effort', 'reliable')
_DEFAULTS = TrainerConfig()
_DEFAULT_CLIP = _DEFAULTS.clipping


def _float(description: str, low: float, high: float, read_only: bool = True,
           step: float = 0.0) -> ParameterDescriptor:
    return ParameterDescriptor(
        type=ParameterType.PARAMETER_DOUBLE, description=description, read_only=read_only,
        floating_point_range=[FloatingPointRange(from_value=low, to_value=high, step=step)])


def _int(description: str, low: int, high: int, read_only: bool = True) -> ParameterDescriptor:
    return ParameterDescriptor(
        type=ParameterType.PARAMETER_INTEGER, description=description, read_only=read_only,
        integer_range=[IntegerRange(from_value=low, to_value=high, step=1)])


def _string(description: str, read_only: bool = True) -> ParameterDescriptor:
    return ParameterDescriptor(
        type=ParameterType.PARAMETER_STRING, description=description, read_only=read_only)


def _strings(description: str) -> ParameterDescriptor:
    return ParameterDescriptor(
        type=ParameterType.PARAMETER_STRING_ARRAY, description=description, read_only=True)


def _bool(description: str) -> ParameterDescriptor:
    return ParameterDescriptor(
        type=ParameterType.PARAMETER_BOOL, description=description, read_only=True)


INT_MAX = 2 ** 31 - 1

# name -> (default, descriptor). The defaults of trainer settings come from TrainerConfig,
# so the node, the YAML file and `gradclip-ros train` share them.
PARAMETERS: Dict[str, tuple] = {
    # Model.
    'model': (DEFAULT_ARCHITECTURE, _string(
        f'detector architecture; one of {", ".join(sorted(ARCHITECTURES))}')),
    'class_names': (list(DEFAULT_CLASSES), _strings(
        'detector classes in label-index order; label class_id strings must be one of these')),
    'input_size': (320, _int('side in pixels of the square training and inference input',
                             64, 2048)),
    'checkpoint': ('', _string(
        'starting weights (safetensors); empty = random weights. Ignored when checkpoint_dir '
        'contains a checkpoint to resume from')),
    'device': ('cpu', _string("training device: 'auto', 'cpu', 'cuda' or 'cuda:N'")),

    # Inputs.
    'cameras': (['front'], _strings(
        'camera names; each subscribes <camera>/image_raw and <camera>/labels')),
    'transports': (['raw'], _strings(
        "'raw' or 'compressed', one for all cameras or one per camera")),
    'reliability': (['best_effort'], _strings(
        "image QoS: 'best_effort' or 'reliable', one for all cameras or one per camera")),
    'image_queue_depth': (5, _int('image subscription queue depth (messages)', 1, 1000)),
    'sync_tolerance': (0.01, _float(
        'largest image/labels header-stamp difference that still pairs (seconds)', 0.0, 10.0)),
    'max_wait': (2.0, _float(
        'seconds an unpaired image or label set waits for its partner before it expires',
        0.01, 600.0)),
    'max_pending': (10, _int(
        'unpaired messages kept per camera and kind; the oldest is dropped beyond', 1, 1000)),
    'box_tolerance': (1.0, _float(
        'pixels a label box may overlap the image and still count as outside', 0.0, 100.0)),

    # Optimizer and schedule.
    'optimizer': (_DEFAULTS.optimizer, _string("'sgd' (with momentum) or 'adamw'")),
    'learning_rate': (_DEFAULTS.learning_rate, _float(
        'peak learning rate after warm-up', 1e-8, 10.0)),
    'momentum': (_DEFAULTS.momentum, _float('SGD momentum; AdamW beta1', 0.0, 0.999)),
    'weight_decay': (_DEFAULTS.weight_decay, _float('weight decay', 0.0, 1.0)),
    'batch_size': (_DEFAULTS.batch_size, _int('frames per training step', 1, 1024)),
    'warmup_steps': (_DEFAULTS.warmup_steps, _int(
        'optimizer steps of linear learning-rate warm-up', 0, INT_MAX)),
    'lr_schedule': (_DEFAULTS.lr_schedule, _string(
        "learning rate after warm-up: 'constant' or 'cosine'")),
    'schedule_steps': (_DEFAULTS.schedule_steps, _int(
        'optimizer steps until the cosine schedule reaches final_lr_ratio', 1, INT_MAX)),
    'final_lr_ratio': (_DEFAULTS.final_lr_ratio, _float(
        'end of the cosine schedule as a share of learning_rate', 0.0, 1.0)),
    'bn_momentum': (_DEFAULTS.bn_momentum, _float(
        "batch-norm running-statistics momentum while training; 0 keeps the model's",
        0.0, 1.0)),

    # Clipping (clip_<key> goes to the clipping engine as <key>; keys the mode does not
    # use are ignored).
    'clip_mode': (_DEFAULT_CLIP['mode'], _string(
        "gradient clipping mode: 'value', 'norm', 'relative', 'unitwise', 'percentile' or "
        "'zscore'")),
    'clip_abs_tol': (_DEFAULT_CLIP.get('abs_tol', 1e-3), _float(
        'element bound (value) or floor of the bound (relative, unitwise), gradient units',
        0.0, 1e6)),
    'clip_rel_tol': (_DEFAULT_CLIP.get('rel_tol', 0.01), _float(
        'bound per unit of weight magnitude (relative, unitwise); a ratio', 0.0, 1e3)),
    'clip_max_norm': (10.0, _float(
        'global gradient-norm bound (norm); warm-up bound (percentile, zscore)', 1e-9, 1e9)),
    'clip_percentile': (90.0, _float('percentile of recent norms (percentile)', 0.001, 100.0)),
    'clip_window': (1000, _int('recent norms kept (percentile)', 1, 1000000)),
    'clip_warmup': (25, _int('norms seen before adaptive clipping starts', 1, 1000000)),
    'clip_z_max': (2.5, _float('z-score bound (zscore)', 0.001, 1000.0)),
    'clip_alpha': (0.97, _float('EMA decay of the norm statistics (zscore)', 0.001, 0.999)),
    'clip_on_nonfinite': ('skip', _string(
        "non-finite gradients: 'skip' the step, 'zero' them, or raise an 'error'")),

    # Buffer, hold-out set, validation.
    'buffer_max_frames': (_DEFAULTS.max_frames, _int(
        'frames in the replay buffer (reservoir sampling beyond)', 1, INT_MAX)),
    'buffer_max_bytes': (_DEFAULTS.max_bytes, _int(
        'bytes of the replay buffer', 1 << 20, 2 ** 62)),
    'holdout_every': (_DEFAULTS.holdout_every, _int(
        'every n-th labeled frame goes to the hold-out set, never trained on; 0 = none',
        0, 1000)),
    'holdout_max': (_DEFAULTS.holdout_max, _int(
        'hold-out frames kept (newest first out)', 1, 100000)),
    'min_buffer_frames': (_DEFAULTS.min_buffer_frames, _int(
        'no training before the replay buffer contains this many frames', 1, INT_MAX)),
    'min_holdout_frames': (_DEFAULTS.min_holdout_frames, _int(
        'no validation before the hold-out set contains this many frames', 1, INT_MAX)),
    'validate_every': (_DEFAULTS.validate_every, _int(
        'training steps between hold-out validations', 1, INT_MAX)),
    'max_map_drop': (_DEFAULTS.max_map_drop, _float(
        'hand over only if hold-out mAP@0.5 is at most this much below the deployed model',
        0.0, 1.0, read_only=False)),
    'val_score_threshold': (_DEFAULTS.val_score_threshold, _float(
        'score threshold of the detections scored during validation', 0.0, 1.0)),

    # Safety gates.
    'loss_spike_factor': (_DEFAULTS.loss_spike_factor, _float(
        'a loss above this many times the running median is a spike', 1.0001, 1e6)),
    'spike_window': (_DEFAULTS.spike_window, _int(
        'recent losses in the running median', 2, 100000)),
    'max_consecutive_bad': (_DEFAULTS.max_consecutive_bad, _int(
        'bad steps (non-finite or spike) in a row before a rollback', 1, 100000)),
    'snapshot_every': (_DEFAULTS.snapshot_every, _int(
        'good steps between in-memory rollback snapshots', 1, INT_MAX)),

    # Augmentation.
    'hflip_prob': (_DEFAULTS.hflip_prob, _float('probability of a horizontal flip', 0.0, 1.0)),
    'scale_min': (_DEFAULTS.scale_min, _float('smallest scale-jitter factor', 0.5, 2.0)),
    'scale_max': (_DEFAULTS.scale_max, _float('largest scale-jitter factor', 0.5, 2.0)),
    'seed': (_DEFAULTS.seed, _int('random seed of sampling and augmentation', 0, INT_MAX)),

    # Files.
    'checkpoint_dir': ('/tmp/gradclip_ros/checkpoints', _string(
        "folder of the learner's own checkpoints; it resumes from the newest valid one; "
        'empty = no checkpoints')),
    'keep_last': (_DEFAULTS.keep_last, _int(
        'checkpoints (and handed-over files) kept besides the best and the deployed', 1, 1000)),
    'handover_dir': ('/tmp/gradclip_ros/models', _string(
        "folder for handed-over checkpoints: the perception node's model_dir")),
    'run_dir': ('/tmp/gradclip_ros/run', _string(
        'folder of train_log.jsonl and validation_log.jsonl; empty = no logs')),

    # Compute budget.
    'train_threads': (1, _int('torch threads of the training thread', 1, 256)),
    'max_duty_cycle': (0.5, _float(
        'share of wall time the training thread may compute; it sleeps the rest',
        0.01, 1.0, read_only=False)),
    'diagnostics_period': (1.0, _float('seconds between /diagnostics messages', 0.1, 60.0)),
}


def detections_to_raw_boxes(msg: Detection2DArray) -> List[tuple]:
    """Turn a Detection2DArray into (class_name, center_x, center_y, size_x, size_y) tuples.

    A detection with several hypotheses uses the one with the highest score; one with none
    gets class None, which the validator counts as an unknown class.
    """
    raw = []
    for detection in msg.detections:
        class_name = None
        if detection.results:
            best = max(detection.results, key=lambda result: result.hypothesis.score)
            class_name = best.hypothesis.class_id
        box = detection.bbox
        raw.append((class_name, float(box.center.position.x), float(box.center.position.y),
                    float(box.size_x), float(box.size_y)))
    return raw


def _stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


class OnlineLearnerNode(Node):
    """Pair images and labels, train in a background thread, publish accepted checkpoints."""

    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        for name, (default, descriptor) in PARAMETERS.items():
            self.declare_parameter(name, default, descriptor)
        values = {name: self.get_parameter(name).value for name in PARAMETERS}
        self.values = values

        # Everything that can be wrong in the configuration fails here, before any thread.
        self.cameras = list(values['cameras'])
        if not self.cameras or len(set(self.cameras)) != len(self.cameras) or \
                not all(self.cameras):
            raise ValueError(f'parameter cameras: invalid value {self.cameras!r}; expected a '
                             'non-empty list of unique, non-empty camera names')
        self.transports = per_camera(values['transports'], self.cameras, 'transports',
                                     TRANSPORTS)
        self.reliability = per_camera(values['reliability'], self.cameras, 'reliability',
                                      RELIABILITIES)
        self.spec = ModelSpec(architecture=values['model'],
                              class_names=tuple(values['class_names']),
                              input_size=values['input_size'])
        self.config = config_from_parameters(values)
        self.duty_cycle = float(values['max_duty_cycle'])
        self.train_threads = int(values['train_threads'])

        start_state = None
        if values['checkpoint']:
            start_state, start_spec, _ = load_checkpoint(values['checkpoint'], self.spec)
            self.spec = start_spec
        self.trainer = Trainer(self.config, self.spec, state_dict=start_state,
                               run_dir=values['run_dir'] or None)

        self.pairer = StampPairer(values['sync_tolerance'], values['max_pending'],
                                  values['max_wait'])
        self.counters = collections.Counter()
        self.dropped_labels = collections.Counter(dict.fromkeys(BAD_LABEL_KINDS, 0))
        self._throughput = collections.deque(maxlen=50)  # (wall time, samples) per step

        self._create_interfaces(values)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._train_loop, name='trainer', daemon=True)
        self._thread.start()

        self.get_logger().info(
            f'online learner: cameras {self.cameras} ({", ".join(self.transports)}), model '
            f'{self.spec.architecture} {self.spec.input_size}px {list(self.spec.class_names)} '
            f'version {self.trainer.deployed_version}, resumed from '
            f'{self.trainer.resumed_from or "nothing"}, train_threads {self.train_threads}, '
            f'max_duty_cycle {self.duty_cycle}, handover_dir {values["handover_dir"]!r}, '
            f'trainer config {json.dumps(self.config.to_dict(), sort_keys=True)}')
        if self.trainer.deployed_path:
            # A restarted perception node gets the deployed weights from this latched message.
            self._publish_update(self.trainer.deployed_path)

    def _create_interfaces(self, values: Dict[str, Any]) -> None:
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.update_publisher = self.create_publisher(String, 'model_updates', latched)
        self.stats_publisher = self.create_publisher(DiagnosticStatus, 'training_stats', 10)
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, '/diagnostics', 10)

        labels_qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE,
                                history=HistoryPolicy.KEEP_LAST)
        self._camera_subscriptions = []
        for camera, transport, reliability in zip(self.cameras, self.transports,
                                                  self.reliability):
            image_qos = QoSProfile(
                depth=values['image_queue_depth'], history=HistoryPolicy.KEEP_LAST,
                durability=qos_profile_sensor_data.durability,
                reliability=(ReliabilityPolicy.RELIABLE if reliability == 'reliable'
                             else ReliabilityPolicy.BEST_EFFORT))
            if transport == 'compressed':
                topic, message_type = f'{camera}/image_raw/compressed', CompressedImage
            else:
                topic, message_type = f'{camera}/image_raw', Image
            self._camera_subscriptions.append(self.create_subscription(
                message_type, topic, lambda msg, c=camera: self._on_image(c, msg), image_qos))
            self._camera_subscriptions.append(self.create_subscription(
                Detection2DArray, f'{camera}/labels',
                lambda msg, c=camera: self._on_labels(c, msg), labels_qos))
        self.create_timer(values['diagnostics_period'], self._publish_diagnostics)

    def _on_set_parameters(self, parameters: List[Parameter]) -> SetParametersResult:
        for parameter in parameters:
            if parameter.name == 'max_duty_cycle':
                self.duty_cycle = float(parameter.value)
            elif parameter.name == 'max_map_drop':
                self.trainer.config.max_map_drop = float(parameter.value)
        return SetParametersResult(successful=True)

    # -----------------------------------------------------------------------------------------
    # Inputs

    def _on_image(self, camera: str, msg) -> None:
        self.counters['images'] += 1
        pair = self.pairer.add_image(camera, _stamp_ns(msg.header), msg)
        if pair is not None:
            self._add_pair(pair)

    def _on_labels(self, camera: str, msg: Detection2DArray) -> None:
        self.counters['label_sets'] += 1
        pair = self.pairer.add_labels(camera, _stamp_ns(msg.header), msg)
        if pair is not None:
            self._add_pair(pair)

    def _add_pair(self, pair) -> None:
        # Decoding waits until the image has a partner, so unpaired frames cost no CPU.
        try:
            image = message_to_rgb(pair.image)
        except ImageError as error:
            self.counters['bad_images'] += 1
            self.get_logger().warning(
                f'{pair.camera}: image at stamp {pair.image_stamp_ns} ns dropped: {error}',
                throttle_duration_sec=5.0)
            return
        height, width = image.shape[:2]
        boxes, labels, dropped = validate_boxes(
            detections_to_raw_boxes(pair.labels), self.spec.class_names, width, height,
            self.values['box_tolerance'])
        if dropped:
            self.dropped_labels.update(dropped)
            self.get_logger().warning(
                f'{pair.camera}: dropped {sum(dropped.values())} label box(es) at stamp '
                f'{pair.labels_stamp_ns} ns: {dict(dropped)} (class names allowed: '
                f'{list(self.spec.class_names)}, image {width}x{height})',
                throttle_duration_sec=5.0)
        self.trainer.add_frame(image, boxes, labels, camera=pair.camera,
                               stamp_ns=pair.image_stamp_ns)
        self.counters['pairs_added'] += 1

    # -----------------------------------------------------------------------------------------
    # Training thread

    def _train_loop(self) -> None:
        torch.set_num_threads(self.train_threads)
        while not self._stop.is_set():
            if not self.trainer.ready():
                self._stop.wait(0.2)
                continue
            try:
                record = self.trainer.train_step()
                validation = self.trainer.maybe_validate()
            except Exception as error:  # noqa: B902 - keep the node alive, report, retry
                self.counters['training_errors'] += 1
                self.get_logger().error(f'training step failed: {error!r}',
                                        throttle_duration_sec=5.0)
                self._stop.wait(1.0)
                continue
            if record is None:
                continue
            self._throughput.append((time.monotonic(), record['batch_size']))
            self._publish_step(record)
            if validation is not None and validation.get('handed_over'):
                self._publish_update(validation['handed_over'])

            # Duty cycle: after working d seconds, rest d * (1 / duty - 1).
            busy = record['step_time_s'] + (validation or {}).get('eval_time_s', 0.0)
            rest = busy * (1.0 / self.duty_cycle - 1.0)
            if rest > 0.0:
                self._stop.wait(rest)

    def _publish_step(self, record: Dict[str, Any]) -> None:
        status = DiagnosticStatus(
            level=DiagnosticStatus.OK if not record['skipped'] else DiagnosticStatus.WARN,
            name=f'{self.get_name()}: training step', hardware_id=self.spec.architecture,
            message=f'step {record["step"]}' + (
                f' skipped ({record["skipped"]})' if record['skipped'] else ''))
        status.values = [KeyValue(key=key, value=self._text(value))
                         for key, value in record.items()]
        self.stats_publisher.publish(status)

    def _publish_update(self, path: str) -> None:
        self.update_publisher.publish(String(data=str(path)))
        self.get_logger().info(f'handed over {path}')

    @staticmethod
    def _text(value) -> str:
        if isinstance(value, float):
            return f'{value:.6g}'
        return '' if value is None else str(value)

    def _publish_diagnostics(self) -> None:
        self.pairer.expire()
        stats = self.trainer.statistics()
        pending = self.pairer.pending()
        samples_per_s = 0.0
        if len(self._throughput) >= 2:
            span = self._throughput[-1][0] - self._throughput[0][0]
            samples = sum(count for _, count in list(self._throughput)[1:])
            samples_per_s = samples / span if span > 0 else 0.0

        pairing = self.pairer.counters
        values = {
            'step': stats['step'],
            'samples_seen': self.counters['pairs_added'],
            'samples_trained': stats.get('samples_trained', 0),
            'duplicate_frames': stats.get('duplicate_frames', 0),
            'buffer_frames': stats['buffer_frames'],
            'buffer_bytes': stats['buffer_bytes'],
            'holdout_frames': stats['holdout_frames'],
            'pairs': pairing['pairs'],
            'pending_images': pending['image'],
            'pending_labels': pending['labels'],
            'expired_images': pairing['expired_image'],
            'expired_labels': pairing['expired_labels'],
            'overflow_images': pairing['overflow_image'],
            'overflow_labels': pairing['overflow_labels'],
            'bad_images': self.counters['bad_images'],
            **{f'dropped_labels_{kind}': self.dropped_labels[kind] for kind in BAD_LABEL_KINDS},
            'dropped_boxes_nonfinite_after_resize': stats.get('dropped_boxes', 0),
            'skipped_nonfinite_loss': stats.get('skipped_nonfinite_loss', 0),
            'skipped_nonfinite_grad': stats.get('skipped_nonfinite_grad', 0),
            'skipped_forward_error': stats.get('skipped_forward_error', 0),
            'spikes': stats.get('spikes', 0),
            'rollbacks': stats.get('rollbacks', 0),
            'training_errors': self.counters['training_errors'],
            'samples_per_s': samples_per_s,
            'holdout_map50': stats['holdout_map50'],
            'holdout_map': stats['holdout_map'],
            'validations': stats.get('validations', 0),
            'handovers': stats.get('handovers', 0),
            'rejected_candidates': stats.get('rejected', 0),
            'corrupt_checkpoints': stats.get('corrupt_checkpoints', 0),
            'deployed_version': stats['deployed_version'],
            'deployed_map50': stats['deployed_map50'],
        }
        level = DiagnosticStatus.OK
        message = 'training' if self.trainer.ready() else 'waiting for labeled frames'
        if values['rollbacks'] or values['training_errors']:
            level, message = DiagnosticStatus.WARN, 'rolled back or failed steps; see counters'
        status = DiagnosticStatus(
            level=level, name=f'{self.get_name()}: online learning', message=message,
            hardware_id=self.spec.architecture,
            values=[KeyValue(key=key, value=self._text(value)) for key, value in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_publisher.publish(array)

    # -----------------------------------------------------------------------------------------
    # Shutdown

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the training thread between steps and write a final checkpoint."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.get_logger().error(f'training thread still busy after {timeout} s; '
                                    'no final checkpoint written')
            return
        try:
            path = self.trainer.save_checkpoint() if self.trainer.step > 0 else None
        except (OSError, RuntimeError) as error:
            self.get_logger().error(f'final checkpoint failed: {error}')
            path = None
        if path is not None:
            self.get_logger().info(f'final checkpoint written: {path}')
        self.trainer.close()


def main(args=None) -> int:
    """Run the node until shutdown; returns 1 when the configuration is invalid."""
    return run_node(OnlineLearnerNode, NODE_NAME, args)


if __name__ == '__main__':
    raise SystemExit(main())
