"""Speed of the online learner and its cost to the perception node on the same CPU.

Measured on the 42 real Apollo frames (1920x1080, 2 labeled vehicles each) with the default
detector (SSDlite320-MobileNetV3-Large, 320 px) and the defaults of
config/online_learning.yaml (batch 4, one training thread):

- ``samples_per_s``: frames per second of training compute (``Trainer.train_step`` time only,
  no duty-cycle sleep), over ``--steps`` steps after 3 warm-up steps.
- ``clip_share_of_step``: time in ``GradientClipper.clip()`` over the whole step time
  (target <= 0.05).
- ``perception_p50_slowdown``: median latency of ``perception_node`` (image publish to
  detections received, over real DDS on this machine) while ``online_learner_node`` trains at
  its defaults, over the same median without the learner (target <= 1.5). Both nodes run as
  their own processes; this process publishes frames (downscaled to 960x540) and labels at
  ``--rate`` Hz on camera ``front``. Both nodes subscribe with reliable QoS, so that lost
  best-effort fragments of the 1.5 MB frames do not thin out the samples.

Run: ``python benchmarks/learner.py [--json] [--steps N] [--phase-seconds S] [--rate HZ]``
with ``ROS_DOMAIN_ID`` set to a domain no other graph uses.
"""

import argparse
import array
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import cv2
from diagnostic_msgs.msg import DiagnosticStatus
import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
import torch
from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose

from gradclip_ros.model import ModelSpec
from gradclip_ros.training import config_from_parameters, Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / 'shared' / 'data' / 'driving' / 'apollo'
PUBLISH_SIZE = (960, 540)
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                      reliability=ReliabilityPolicy.RELIABLE)


def load_frames():
    """Return Apollo frames in stamp order as (rgb [1080, 1920, 3], boxes xyxy [2, 4])."""
    coco = json.loads((DATA / 'labels.json').read_text())
    frames = []
    for image in sorted(coco['images'], key=lambda item: item['stamp_ns']):
        rgb = cv2.imread(str(DATA / image['file_name']))[:, :, ::-1].copy()
        boxes = [[x, y, x + w, y + h] for x, y, w, h in
                 (a['bbox'] for a in coco['annotations'] if a['image_id'] == image['id'])]
        frames.append((rgb, np.asarray(boxes, np.float32)))
    return frames


def learner_parameters() -> dict:
    import yaml
    data = yaml.safe_load((REPO / 'config' / 'online_learning.yaml').read_text())
    return data['online_learner_node']['ros__parameters']


def measure_training(frames, steps: int) -> dict:
    """Run the trainer at the YAML defaults; returns samples/s and the clipping share."""
    parameters = learner_parameters()
    parameters.update({'checkpoint_dir': '', 'handover_dir': '', 'device': 'cpu'})
    torch.set_num_threads(int(parameters['train_threads']))
    config = config_from_parameters(parameters)
    spec = ModelSpec(class_names=tuple(parameters['class_names']),
                     input_size=int(parameters['input_size']))
    trainer = Trainer(config, spec)
    for rgb, boxes in frames:
        trainer.add_frame(rgb, boxes, np.zeros(len(boxes), np.int64))
    for _ in range(3):
        trainer.train_step()
    records = [trainer.train_step() for _ in range(steps)]
    step_time = sum(record['step_time_s'] for record in records)
    clip_time = sum(record['clip_time_s'] for record in records)
    samples = sum(record['batch_size'] for record in records)
    return {'samples_per_s': samples / step_time, 'clip_share_of_step': clip_time / step_time,
            'step_time_s': step_time / len(records), 'clip_time_s': clip_time / len(records),
            'clip_mode': config.clipping['mode']}


class Driver:
    """Publishes frames and labels on camera ``front``; records detection latencies."""

    def __init__(self, frames):
        self.frames = [(cv2.resize(rgb, PUBLISH_SIZE, interpolation=cv2.INTER_AREA),
                        boxes * np.array([PUBLISH_SIZE[0] / 1920, PUBLISH_SIZE[1] / 1080] * 2,
                                         np.float32)) for rgb, boxes in frames]
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('learner_benchmark_driver', context=self.context)
        self.images = self.node.create_publisher(Image, 'front/image_raw', RELIABLE)
        self.labels = self.node.create_publisher(Detection2DArray, 'front/labels', RELIABLE)
        self.lock = threading.Lock()
        self.latencies = []
        self.training_steps = 0
        self.node.create_subscription(Detection2DArray, 'front/detections',
                                      self._on_detections, RELIABLE)
        self.node.create_subscription(DiagnosticStatus, 'training_stats',
                                      self._on_training_step, 10)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_detections(self, msg):
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        with self.lock:
            self.latencies.append(time.time() - stamp)

    def _on_training_step(self, msg):
        with self.lock:
            self.training_steps += 1

    def publish_for(self, seconds: float, rate: float) -> None:
        end = time.monotonic() + seconds
        index = 0
        while time.monotonic() < end:
            rgb, boxes = self.frames[index % len(self.frames)]
            now = time.time()
            stamp_sec, stamp_nanosec = int(now), int((now % 1.0) * 1e9)
            data = array.array('B')
            data.frombytes(rgb.tobytes())
            image = Image(height=rgb.shape[0], width=rgb.shape[1], encoding='rgb8',
                          step=rgb.shape[1] * 3, data=data)
            labels = Detection2DArray()
            for msg in (image, labels):
                msg.header.stamp.sec, msg.header.stamp.nanosec = stamp_sec, stamp_nanosec
                msg.header.frame_id = 'front'
            for x1, y1, x2, y2 in boxes:
                detection = Detection2D()
                detection.bbox.center.position.x = float((x1 + x2) / 2)
                detection.bbox.center.position.y = float((y1 + y2) / 2)
                detection.bbox.size_x, detection.bbox.size_y = float(x2 - x1), float(y2 - y1)
                hypothesis = ObjectHypothesisWithPose()
                hypothesis.hypothesis.class_id = 'vehicle'
                hypothesis.hypothesis.score = 1.0
                detection.results.append(hypothesis)
                labels.detections.append(detection)
            self.images.publish(image)
            self.labels.publish(labels)
            index += 1
            time.sleep(max(0.0, 1.0 / rate - (time.time() - now)))

    def take_latencies(self):
        with self.lock:
            result, self.latencies = self.latencies, []
        return result

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def start_node(module: str, params_file: pathlib.Path, overrides: dict):
    command = [sys.executable, '-m', module, '--ros-args', '--params-file', str(params_file)]
    for name, value in overrides.items():
        command += ['-p', f'{name}:={value}']
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_node(process) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def measure_perception(frames, seconds: float, rate: float, learner_overrides: dict) -> dict:
    """Median perception latency without, then with, the learner training at its defaults."""
    work = pathlib.Path(tempfile.mkdtemp(prefix='gradclip_learner_bench.'))
    (work / 'models').mkdir()
    driver = Driver(frames)
    perception = start_node('gradclip_ros.perception_node', REPO / 'config' / 'perception.yaml',
                            {'cameras': '[front]', 'model_dir': str(work / 'models'),
                             'device': 'cpu', 'reliability': '[reliable]'})
    learner = None
    try:
        # Start-up (model build) can take long on a loaded machine; then 5 s of warm-up.
        deadline = time.monotonic() + 120.0
        while not driver.take_latencies() and time.monotonic() < deadline:
            driver.publish_for(1.0, rate)
        driver.publish_for(5.0, rate)
        driver.take_latencies()
        driver.publish_for(seconds, rate)
        alone = driver.take_latencies()

        learner = start_node(
            'gradclip_ros.online_learner_node', REPO / 'config' / 'online_learning.yaml',
            {'cameras': '[front]', 'handover_dir': str(work / 'models'),
             'reliability': '[reliable]',
             'checkpoint_dir': str(work / 'checkpoints'), 'run_dir': str(work / 'run'),
             **learner_overrides})
        deadline = time.monotonic() + 120.0
        while driver.training_steps < 3 and time.monotonic() < deadline:
            driver.publish_for(1.0, rate)
        if driver.training_steps < 3:
            raise RuntimeError('the learner did not start training within 120 s')
        driver.take_latencies()
        driver.publish_for(seconds, rate)
        together = driver.take_latencies()
        steps = driver.training_steps
    finally:
        if learner is not None:
            stop_node(learner)
        stop_node(perception)
        driver.close()
    if len(alone) < 5 or len(together) < 5:
        raise RuntimeError(f'too few detections: {len(alone)} alone, {len(together)} with '
                           'the learner; is perception_node running?')
    return {
        'perception_p50_ms_alone': 1000 * statistics.median(alone),
        'perception_p50_ms_with_learner': 1000 * statistics.median(together),
        'perception_p50_slowdown': statistics.median(together) / statistics.median(alone),
        'perception_frames': [len(alone), len(together)],
        'learner_steps_during_measure': steps,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--steps', type=int, default=20, help='timed training steps')
    parser.add_argument('--phase-seconds', type=float, default=30.0,
                        help='seconds of perception measurement with and without the learner')
    parser.add_argument('--rate', type=float, default=5.0, help='published frames per second')
    parser.add_argument('--learner-param', action='append', default=[], metavar='NAME:=VALUE',
                        help='override a learner parameter in the perception measurement')
    parser.add_argument('--skip-perception', action='store_true',
                        help='measure only the trainer (no ROS nodes)')
    args = parser.parse_args()

    frames = load_frames()
    result = measure_training(frames, args.steps)
    if not args.skip_perception:
        overrides = dict(item.split(':=', 1) for item in args.learner_param)
        result.update(measure_perception(frames, args.phase_seconds, args.rate, overrides))
    result['cpu_count'] = os.cpu_count()
    if args.json:
        print(json.dumps(result))
        return 0
    targets = {'clip_share_of_step': '<= 0.05', 'perception_p50_slowdown': '<= 1.5'}
    print(f'{"metric":34} {"value":>12}  target')
    for key, value in result.items():
        text = f'{value:.4g}' if isinstance(value, float) else str(value)
        print(f'{key:34} {text:>12}  {targets.get(key, "")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
