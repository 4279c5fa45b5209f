"""``make demo``: replay real driving frames through both nodes and show what was learned.

The demo converts the labeled Apollo frames into a rosbag2, or takes ``DEMO_BAG``. It starts
the perception and online-learning nodes as child processes with the YAML configuration,
replays the bag in a loop and watches the graph with a monitor node. Then it stops everything
cleanly and writes a run directory with logs, plots, annotated frames before and after
fine-tuning, and ``summary.json``. The run directory's path is the last line printed.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

import cv2
import numpy as np
import torch
from tqdm import tqdm

from gradclip_ros import bags
from gradclip_ros.checkpoints import atomic_write_bytes, load_checkpoint, save_checkpoint
from gradclip_ros.model import build_model, Detector, InferenceSettings, ModelSpec
from gradclip_ros.run_graph import node_command, stop_children

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = PACKAGE_ROOT.parent / 'shared' / 'data'
APOLLO = SHARED_DATA / 'driving' / 'apollo'
# The demo validates twice as often as the YAML default, so a few minutes show hand-overs,
# and lets the learner use more of the CPU than a vehicle would (perception at 30 frames/s
# still keeps up on two cores).
DEMO_OVERRIDES = ('online_learner_node:validate_every:=50',
                  'online_learner_node:max_duty_cycle:=0.8')
SUMMARY_KEYS = (
    'frames_processed', 'detections_published', 'train_steps', 'steps_clipped',
    'steps_skipped', 'rollbacks', 'checkpoints_handed_over', 'latency_p50_ms',
    'latency_p99_ms', 'map50_start', 'map50_end')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--bag', default=os.environ.get('DEMO_BAG', ''),
                        help='labeled bag to replay (default: $DEMO_BAG, else a bag converted '
                             'from the Apollo frames in ../shared/data)')
    parser.add_argument('--run-dir', help='output folder (default: runs/demo-<time>)')
    parser.add_argument('--budget', type=float, default=float(os.environ.get('DEMO_BUDGET', 420)),
                        help='seconds the nodes run after start-up (default: $DEMO_BUDGET or '
                             '420)')
    parser.add_argument('--target-steps', type=int, default=0,
                        help='stop early once the learner has run this many steps (0 = no)')
    parser.add_argument('--target-map50', type=float, default=0.0,
                        help='stop early once perception serves weights whose hold-out '
                             'mAP@0.5 reached this (0 = no)')
    parser.add_argument('--resize', default='960x540',
                        help='frame size of the converted bag, WxH (default 960x540)')
    parser.add_argument('--rate', type=float, default=1.0, help='replay speed factor')
    parser.add_argument('--set', action='append', default=[], metavar='NODE:NAME:=VALUE',
                        help='extra parameter override, e.g. online_learner_node:batch_size:=2 '
                             f'(applied after the demo\'s own: {" ".join(DEMO_OVERRIDES)})')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')


class GraphMonitor:
    """A ROS node that counts detections and reads both nodes' diagnostics."""

    def __init__(self, cameras: List[str]):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from vision_msgs.msg import Detection2DArray

        self._rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('demo_monitor', context=self.context)
        self.lock = threading.Lock()
        self.frames: Dict[str, int] = dict.fromkeys(cameras, 0)
        self.detections = 0
        self.stamps: Dict[str, set] = {camera: set() for camera in cameras}
        self.frame_ids: Dict[str, set] = {camera: set() for camera in cameras}
        self.perception: Dict[str, Dict[str, str]] = {}
        self.learner: Dict[str, str] = {}
        self.latency_p50: List[float] = []
        self.latency_p99: List[float] = []
        self.training_stats = 0
        self.training_stats_keys: set = set()

        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        for camera in cameras:
            self.node.create_subscription(
                Detection2DArray, f'{camera}/detections',
                lambda msg, camera=camera: self._on_detections(camera, msg), qos)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 20)
        self.node.create_subscription(
            DiagnosticStatus, 'training_stats', self._on_training_stats, 50)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self):
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.1)
            except Exception:  # the context was shut down while spinning
                return

    def _on_detections(self, camera, msg):
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with self.lock:
            self.frames[camera] += 1
            self.detections += len(msg.detections)
            self.stamps[camera].add(stamp)
            self.frame_ids[camera].add(msg.header.frame_id)

    def _on_training_stats(self, msg):
        with self.lock:
            self.training_stats += 1
            self.training_stats_keys.update(kv.key for kv in msg.values)

    def _on_diagnostics(self, msg):
        with self.lock:
            for status in msg.status:
                values = {kv.key: kv.value for kv in status.values}
                if status.name.startswith('perception_node'):
                    self.perception[status.name] = values
                    for key, target in (('latency_from_receive_p50_ms', self.latency_p50),
                                        ('latency_from_receive_p99_ms', self.latency_p99)):
                        if key in values and values[key] not in ('', 'nan'):
                            target.append(float(values[key]))
                elif status.name.startswith('online_learner_node'):
                    self.learner.update(values)

    def model_version(self) -> str:
        with self.lock:
            for name, values in self.perception.items():
                if name.endswith(': model'):
                    return values.get('version', '')
        return ''

    def close(self):
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self._rclpy.try_shutdown(context=self.context)
        self.thread.join(timeout=2.0)


def prepare_bag(args, run_dir: pathlib.Path) -> Optional[pathlib.Path]:
    """Return the bag to replay: ``--bag``/``DEMO_BAG``, or one converted from Apollo frames."""
    if args.bag:
        bag = pathlib.Path(args.bag)
        if not bag.exists():
            print(f'demo: bag not found: {bag}', file=sys.stderr)
            return None
        return bag
    if not (APOLLO / 'labels.json').is_file():
        print(f'demo: no bag given and no real data at {APOLLO}.\n'
              'Pass a labeled bag (images on /<camera>/image_raw, vision_msgs/Detection2DArray '
              'on /<camera>/labels), e.g. one made with `gradclip-ros convert`:\n'
              '  make demo DEMO_BAG=/path/to/bag', file=sys.stderr)
        return None
    bag = run_dir / 'bag'
    command = [sys.executable, '-m', 'gradclip_ros.cli', 'convert',
               '--camera-dir', f'narrow={APOLLO / "narrow"}',
               '--camera-dir', f'obstacle={APOLLO / "obstacle"}',
               '--coco', str(APOLLO / 'labels.json'), '--resize', args.resize,
               '--output', str(bag)]
    print('demo: converting the Apollo frames:', ' '.join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        print('demo: conversion failed; see the message above', file=sys.stderr)
        return None
    return bag


def parse_overrides(pairs: List[str]) -> Dict[str, Dict[str, str]]:
    overrides: Dict[str, Dict[str, str]] = {'perception_node': {}, 'online_learner_node': {}}
    for pair in pairs:
        node, _, assignment = pair.partition(':')
        name, sep, value = assignment.partition(':=')
        if node not in overrides or not sep or not name:
            raise ValueError(f'invalid --set {pair!r}; expected NODE:NAME:=VALUE with NODE one '
                             f'of {", ".join(overrides)}')
        overrides[node][name] = value
    return overrides


def read_jsonl(path: pathlib.Path) -> List[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by the stop; the rest of the log is still valid
    return records


def draw(image: np.ndarray, boxes, color, labels=None) -> np.ndarray:
    canvas = image.copy()
    for index, box in enumerate(boxes):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 2)
        if labels is not None:
            cv2.putText(canvas, labels[index], (x1, max(12, y1 - 4)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1, cv2.LINE_AA)
    return canvas


def annotate_frames(bag: pathlib.Path, spec: ModelSpec, start_ckpt: pathlib.Path,
                    end_ckpt: Optional[pathlib.Path], out_dir: pathlib.Path,
                    count: int = 3, top: int = 3) -> List[str]:
    """Save frames with ground truth (white) and the top detections before and after (green).

    A model trained for a few minutes from random weights ranks the right boxes first long
    before its scores pass the node's score_threshold, so the ``top`` highest-scored boxes
    are drawn whatever their score, each labeled with it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    for frame in bags.iter_labeled_frames(bag, spec.class_names):
        frames.append(frame)
        if len(frames) >= count * 4:
            break
    frames = frames[::4][:count]
    settings = InferenceSettings(score_threshold=0.0, max_detections=top)
    detectors = {}
    for name, path in (('before', start_ckpt), ('after', end_ckpt)):
        if path is None:
            continue
        state, loaded_spec, _ = load_checkpoint(path, spec)
        detectors[name] = Detector(loaded_spec, device='cpu', settings=settings, state_dict=state)
    written = []
    for index, frame in enumerate(frames):
        panels = []
        for name, detector in detectors.items():
            result = detector.predict([frame.image])[0]
            names = [f'{spec.class_names[label]} {score:.2f}'
                     for label, score in zip(result.labels, result.scores)]
            panel = draw(frame.image, frame.boxes, (255, 255, 255))
            panel = draw(panel, result.boxes, (0, 255, 0), names)
            cv2.putText(panel, f'{name}: {detector.spec.version}', (10, 30),
                        cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 0), 2, cv2.LINE_AA)
            panels.append(panel)
        path = out_dir / f'{frame.camera}_{frame.stamp_ns}.png'
        ok, data = cv2.imencode('.png', cv2.cvtColor(np.hstack(panels), cv2.COLOR_RGB2BGR))
        if ok:
            atomic_write_bytes(path, data.tobytes())
            written.append(str(path))
    return written


def summarize(monitor: GraphMonitor, run_dir: pathlib.Path) -> Dict[str, object]:
    steps = read_jsonl(run_dir / 'train_log.jsonl')
    validations = read_jsonl(run_dir / 'validation_log.jsonl')
    trained = [r for r in steps if not r.get('skipped')]
    with monitor.lock:
        frames = sum(monitor.frames.values())
        detections = monitor.detections
        p50 = statistics.median(monitor.latency_p50) if monitor.latency_p50 else None
        p99 = statistics.median(monitor.latency_p99) if monitor.latency_p99 else None
        rollbacks = int(monitor.learner.get('rollbacks', 0) or 0)
    rollbacks = max(rollbacks, sum(1 for r in steps if r.get('rollback')))
    map50_start = validations[0]['deployed_map50'] if validations else None
    map50_end = None
    if validations:
        last = validations[-1]
        map50_end = last['map50'] if last.get('accepted') else last['deployed_map50']
    return {
        'frames_processed': frames,
        'detections_published': detections,
        'train_steps': len(trained),
        'steps_clipped': sum(1 for r in trained if r.get('clipped')),
        'steps_skipped': len(steps) - len(trained),
        'rollbacks': rollbacks,
        'checkpoints_handed_over': sum(1 for r in validations if r.get('handed_over')),
        'latency_p50_ms': p50,
        'latency_p99_ms': p99,
        'map50_start': map50_start,
        'map50_end': map50_end,
    }


def camera_details(monitor: GraphMonitor, bag: pathlib.Path,
                   cameras: List[str]) -> Dict[str, Dict[str, object]]:
    """Per camera: detection messages, and whether their headers are the images' headers."""
    recorded: Dict[str, set] = {camera: set() for camera in cameras}
    frame_ids: Dict[str, set] = {camera: set() for camera in cameras}
    for frame in bags.iter_frames(bag, cameras):
        recorded[frame.camera].add(frame.stamp_ns)
        frame_ids[frame.camera].add(frame.frame_id)
    details = {}
    with monitor.lock:
        for camera in cameras:
            seen = monitor.stamps[camera]
            details[camera] = {
                'detection_messages': monitor.frames[camera],
                'distinct_stamps': len(seen),
                'stamps_not_in_bag': len(seen - recorded[camera]),
                'frame_ids': sorted(monitor.frame_ids[camera]),
                'bag_frame_ids': sorted(frame_ids[camera]),
            }
    return details


def main(args) -> int:
    run_dir = pathlib.Path(args.run_dir or PACKAGE_ROOT / 'runs' /
                           time.strftime('demo-%Y%m%d-%H%M%S')).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir, checkpoint_dir = run_dir / 'models', run_dir / 'checkpoints'
    model_dir.mkdir(exist_ok=True)
    try:
        overrides = parse_overrides(list(DEMO_OVERRIDES) + args.set)
    except ValueError as error:
        print(f'demo: {error}', file=sys.stderr)
        return 2

    bag = prepare_bag(args, run_dir)
    if bag is None:
        return 2
    cameras = bags.list_cameras(bag)
    if not cameras:
        print(f'demo: {bag} has no /<camera>/image_raw topic', file=sys.stderr)
        return 2

    # Both nodes start from the same random weights, so "before" is what perception served.
    torch.manual_seed(0)
    spec = ModelSpec(version='start')
    start_ckpt = save_checkpoint(model_dir / 'start.safetensors',
                                 build_model(spec).state_dict(), spec)

    params = [str(PACKAGE_ROOT / 'config' / 'perception.yaml'),
              str(PACKAGE_ROOT / 'config' / 'online_learning.yaml')]
    camera_list = '[' + ','.join(f"'{camera}'" for camera in cameras) + ']'
    perception = {'cameras': camera_list, 'model_dir': str(model_dir),
                  'checkpoint': str(start_ckpt), **overrides['perception_node']}
    learner = {'cameras': camera_list, 'handover_dir': str(model_dir),
               'checkpoint_dir': str(checkpoint_dir), 'run_dir': str(run_dir),
               'checkpoint': str(start_ckpt), **overrides['online_learner_node']}
    commands = {
        'perception': node_command('gradclip_ros.perception_node', params, perception, ''),
        'learner': node_command('gradclip_ros.online_learner_node', params, learner, ''),
        'replay': [sys.executable, '-m', 'gradclip_ros.cli', 'replay', str(bag),
                   '--loop', '0', '--rate', str(args.rate), '--no-progress'],
    }

    monitor = GraphMonitor(cameras)
    children = {}
    logs = []
    print(f'demo: cameras {", ".join(cameras)}; nodes run for {args.budget:.0f} s; '
          f'logs in {run_dir}', flush=True)
    try:
        for name in ('perception', 'learner', 'replay'):
            log = open(run_dir / f'{name}.log', 'w')
            logs.append(log)
            children[name] = subprocess.Popen(
                commands[name], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        watch(monitor, children, run_dir, args)
    except KeyboardInterrupt:
        print('demo: interrupted; stopping the nodes', flush=True)
    finally:
        stop_children(children)
        for log in logs:
            log.close()

    summary = summarize(monitor, run_dir)
    summary['cameras'] = camera_details(monitor, bag, cameras)
    summary['final_model_version'] = monitor.model_version()
    with monitor.lock:
        summary['training_stats_messages'] = monitor.training_stats
        summary['training_stats_keys'] = sorted(monitor.training_stats_keys)
    monitor.close()

    handed = sorted(model_dir.glob('*step-*.safetensors'))
    summary['annotated_frames'] = annotate_frames(
        bag, spec, start_ckpt, handed[-1] if handed else None, run_dir / 'frames')
    report = subprocess.run([sys.executable, '-m', 'gradclip_ros.cli', 'report', str(run_dir)])
    summary['plots'] = sorted(str(p) for p in run_dir.glob('*.png'))
    atomic_write_bytes(run_dir / 'summary.json', json.dumps(summary, indent=2).encode())

    print('\nsummary:')
    for key in SUMMARY_KEYS:
        value = summary[key]
        print(f'  {key:<26} {value:.3f}' if isinstance(value, float) else
              f'  {key:<26} {value}')
    if report.returncode != 0:
        print('demo: report plots failed; see the message above', file=sys.stderr)
    print(run_dir)
    return 0


def watch(monitor: GraphMonitor, children, run_dir: pathlib.Path, args) -> None:
    """Show progress until the budget is spent, the target is reached or a node exits."""
    start = time.monotonic()
    bar = tqdm(total=int(args.budget), unit='s', disable=args.no_progress,
               bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} s {postfix}')
    try:
        while time.monotonic() - start < args.budget:
            time.sleep(1.0)
            bar.n = min(int(time.monotonic() - start), int(args.budget))
            with monitor.lock:
                frames = sum(monitor.frames.values())
                learner = dict(monitor.learner)
            version = monitor.model_version()
            bar.set_postfix_str(
                f'frames {frames} step {learner.get("step", 0)} '
                f'hold-out mAP50 {learner.get("holdout_map50") or "-"} serving {version}')
            dead = [name for name, child in children.items() if child.poll() is not None]
            if dead:
                tqdm.write(f'demo: {", ".join(dead)} exited early; see {run_dir}/{dead[0]}.log')
                return
            if args.target_steps and int(learner.get('step', 0) or 0) >= args.target_steps:
                return
            deployed = float(learner.get('deployed_map50') or 0.0)
            if (args.target_map50 > 0 and deployed >= args.target_map50
                    and version == learner.get('deployed_version')):
                tqdm.write(f'demo: perception serves {version} with hold-out mAP@0.5 '
                           f'{deployed:.3f}; stopping early')
                return
    finally:
        bar.close()


def cli_main() -> int:
    parser = argparse.ArgumentParser(prog='python -m gradclip_ros.demo', description=__doc__)
    add_arguments(parser)
    return main(parser.parse_args())


if __name__ == '__main__':
    sys.exit(cli_main())
