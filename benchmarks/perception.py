"""End-to-end latency of perception_node against the bare detector, on real 640x480 frames.

The node runs in a subprocess (``python -m gradclip_ros.perception_node``) with three cameras
(``cam0`` streamed alone, ``cam1`` and ``cam2`` streamed together), reliable image
subscriptions and the weights of a checkpoint written to a temporary folder. This process
publishes the frames over Fast DDS and receives the detections. It also times
``Detector.predict`` in a plain loop on the same frames while the node is idle, alternating
short timing and streaming blocks so that load from other processes hits both alike. That
detector is built with ``build_detector``, the node's own code, with the same weights,
threshold and torch thread count. Frames are the 42 Apollo frames of the real data kit,
resized to 640x480 and sent as rgb8 ``sensor_msgs/Image``.

Figures (``--json`` prints them as one object):

- ``bare_predict_ms``: median ``Detector.predict`` time for one frame.
- ``latency_ms_p50/p95/p99``: time from the image header stamp (set just before publishing)
  to the arrival of its detections back in this process, one camera at ``--rate`` Hz.
- ``overhead_ratio``: ``latency_ms_p50 / bare_predict_ms`` (target <= 1.15).
- ``p99_over_p50``: ``latency_ms_p99 / latency_ms_p50`` (target <= 2.0).
- ``frames_sent``: frames published by this process. The node's counters on /diagnostics
  give ``frames_reached_node``, ``frames_published`` (detections the node published),
  ``frames_dropped`` (superseded in the node's mailbox), ``frames_malformed`` and
  ``frames_failed``.
  ``counts_add_up`` checks published + dropped + malformed + failed == reached_node;
  ``frames_lost_in_transport`` is sent - reached_node (0 expected with reliable QoS).
- ``node_latency_from_*_ms_p50``: the node's own figures for ``cam0`` over its last 30 s.
- ``two_camera_batch_ms`` / ``two_single_forwards_ms``: median time of one ``predict`` on two
  frames and of two ``predict`` calls on one frame each; ``batch_vs_two_singles`` is their
  ratio (target < 1).
- ``two_camera_*``: the stream figures of the camera pair, against ``two_camera_batch_ms``;
  ``two_camera_mean_batch_size`` is frames per batch the node ran for the pair.

``--dds-profile large-shm`` (the default) gives Fast DDS shared-memory segments large enough
for a frame; ``default`` keeps Fast DDS's defaults, under which each frame travels as UDP
fragments (see LARGE_SHM_PROFILE). The weights are random (seeded), so at
``--score-threshold 0.3`` few boxes survive and non-maximum suppression is cheap; a trained
checkpoint (``--checkpoint``) gives more boxes. Run: ``python benchmarks/perception.py
[--json]``; about 75 s. ROS traffic stays on this machine; set ROS_DOMAIN_ID to a private
value when others share the machine.
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
from diagnostic_msgs.msg import DiagnosticArray
import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
import torch
from vision_msgs.msg import Detection2DArray

from gradclip_ros.checkpoints import load_checkpoint, save_checkpoint
from gradclip_ros.model import build_model, InferenceSettings, ModelSpec
from gradclip_ros.perception_node import build_detector
from gradclip_ros.runtime import tune_malloc

# Fast DDS's default shared-memory segment (512 KB) is smaller than one 640x480 rgb8 frame
# (900 KB), so without this profile every frame travels as UDP fragments over loopback. That
# took about 12 ms per frame with reliable QoS here, and best-effort frames almost never
# arrived complete (2-core VM, Fast DDS 3.2.3). UDP stays on the loopback interface.
LARGE_SHM_PROFILE = """<?xml version="1.0" encoding="UTF-8" ?>
<profiles xmlns="http://www.eprosima.com">
  <transport_descriptors>
    <transport_descriptor>
      <transport_id>shm_large</transport_id>
      <type>SHM</type>
      <segment_size>33554432</segment_size>
    </transport_descriptor>
    <transport_descriptor>
      <transport_id>udp_loopback</transport_id>
      <type>UDPv4</type>
      <interfaceWhiteList><address>127.0.0.1</address></interfaceWhiteList>
    </transport_descriptor>
  </transport_descriptors>
  <participant profile_name="large_shm" is_default_profile="true">
    <rtps>
      <userTransports>
        <transport_id>shm_large</transport_id>
        <transport_id>udp_loopback</transport_id>
      </userTransports>
      <useBuiltinTransports>false</useBuiltinTransports>
    </rtps>
  </participant>
</profiles>
"""
REPO = pathlib.Path(__file__).resolve().parents[1]
APOLLO = REPO.parent / 'shared' / 'data' / 'driving' / 'apollo'
SINGLE = ('cam0',)  # streamed alone
PAIR = ('cam1', 'cam2')  # streamed together
CAMERAS = SINGLE + PAIR
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50,
                      reliability=ReliabilityPolicy.RELIABLE)


def load_frames(size=(640, 480)):
    """Return the Apollo frames resized to ``size`` as RGB uint8 [H, W, 3] arrays."""
    paths = sorted(APOLLO.glob('*/*.jpg'))
    if not paths:
        raise SystemExit(f'no frames found under {APOLLO}')
    return [np.ascontiguousarray(cv2.resize(cv2.imread(str(path)), size,
                                            interpolation=cv2.INTER_AREA)[:, :, ::-1])
            for path in paths]


def image_message(rgb):
    height, width = rgb.shape[:2]
    data = array.array('B')
    data.frombytes(rgb.tobytes())
    return Image(height=height, width=width, encoding='rgb8', is_bigendian=0, step=width * 3,
                 data=data)


def median_ms(samples):
    return 1000.0 * statistics.median(samples)


def time_bare_predict(detector, frames, rounds):
    """Time predict on 1 frame, on 2 frames and as 2 single calls, interleaved.

    Returns three lists of durations in seconds, one entry per round each.
    """
    single, batch, two_singles = [], [], []
    for index in range(rounds):
        first, second = frames[index % len(frames)], frames[(index + 1) % len(frames)]
        start = time.perf_counter()
        detector.predict([first])
        single.append(time.perf_counter() - start)
        start = time.perf_counter()
        detector.predict([first, second])
        batch.append(time.perf_counter() - start)
        start = time.perf_counter()
        detector.predict([first])
        detector.predict([second])
        two_singles.append(time.perf_counter() - start)
    return single, batch, two_singles


class StreamClient:
    """Publishes frames to the node and records when each frame's detections return."""

    def __init__(self, frames):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('perception_benchmark', context=self.context)
        self.messages = [image_message(rgb) for rgb in frames]
        self.lock = threading.Lock()
        self.latencies = {camera: [] for camera in CAMERAS}
        self.diagnostics = None
        self.publishers = {}
        for camera in CAMERAS:
            self.publishers[camera] = self.node.create_publisher(
                Image, f'{camera}/image_raw', RELIABLE)
            self.node.create_subscription(
                Detection2DArray, f'{camera}/detections',
                lambda msg, camera=camera: self._on_detections(camera, msg), RELIABLE)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 10)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_detections(self, camera, msg):
        arrived = time.time_ns()
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        with self.lock:
            self.latencies[camera].append((arrived - stamp) / 1e6)

    def _on_diagnostics(self, msg):
        with self.lock:
            self.diagnostics = msg

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)

    def wait_ready(self, node_process, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node_process.poll() is not None:
                raise SystemExit(f'perception_node exited with code {node_process.returncode}')
            if all(pub.get_subscription_count() > 0 for pub in self.publishers.values()) \
                    and self.diagnostics is not None:
                return
            time.sleep(0.1)
        raise SystemExit(f'perception_node was not ready after {timeout} s')

    def stream(self, cameras, rate, duration):
        """Publish one frame per camera at ``rate`` Hz for ``duration`` s; return the count."""
        period = 1.0 / rate
        start = time.monotonic()
        ticks = 0
        while ticks * period < duration:
            delay = start + ticks * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for offset, camera in enumerate(cameras):
                msg = self.messages[(ticks + offset) % len(self.messages)]
                msg.header.stamp = self.node.get_clock().now().to_msg()
                msg.header.frame_id = camera
                self.publishers[camera].publish(msg)
            ticks += 1
        return ticks * len(cameras)

    def node_values(self, name):
        with self.lock:
            diagnostics = self.diagnostics
        for status in diagnostics.status:
            if status.name == f'perception_node: {name}':
                return {item.key: item.value for item in status.values}
        raise SystemExit(f'no diagnostics status for {name}')

    def settled_counters(self, timeout=60.0):
        """Wait until nothing is pending and the counters stop changing; return them."""
        keys = ('received', 'processed', 'dropped', 'malformed', 'failed', 'pending')
        previous = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.6)  # a bit longer than the diagnostics period
            current = {camera: {key: int(self.node_values(f'camera {camera}')[key])
                                for key in keys} for camera in CAMERAS}
            current['batches'] = int(self.node_values('model')['batches'])
            if current == previous and all(current[c]['pending'] == 0 for c in CAMERAS):
                return current
            previous = current
        raise SystemExit('the node counters did not settle')


def stream_figures(latencies, sent, before, after, cameras, reference_ms):
    """Return latency and counter figures of the frames streamed on ``cameras``."""
    delta = {key: sum(after[c][key] - before[c][key] for c in cameras)
             for key in ('received', 'processed', 'dropped', 'malformed', 'failed')}
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {
        'latency_ms_p50': round(float(p50), 2), 'latency_ms_p95': round(float(p95), 2),
        'latency_ms_p99': round(float(p99), 2),
        'overhead_ratio': round(float(p50) / reference_ms, 3),
        'p99_over_p50': round(float(p99 / p50), 3),
        'frames_sent': sent, 'frames_reached_node': delta['received'],
        'frames_published': delta['processed'], 'frames_dropped': delta['dropped'],
        'frames_malformed': delta['malformed'], 'frames_failed': delta['failed'],
        'frames_answered': len(latencies),
        'frames_lost_in_transport': sent - delta['received'],
        'counts_add_up': delta['received'] == (delta['processed'] + delta['dropped']
                                               + delta['malformed'] + delta['failed']),
    }


def write_checkpoint(folder, input_size, checkpoint):
    if checkpoint:
        return pathlib.Path(checkpoint)
    torch.manual_seed(0)
    spec = ModelSpec(input_size=input_size, version='benchmark-random')
    return save_checkpoint(pathlib.Path(folder) / 'benchmark.safetensors',
                           build_model(spec).state_dict(), spec)


def start_node(path, args):
    command = [
        sys.executable, '-m', 'gradclip_ros.perception_node', '--ros-args',
        '-p', f'checkpoint:={path}', '-p', f'input_size:={args.input_size}',
        '-p', f'device:={args.device}', '-p', f'torch_threads:={args.torch_threads}',
        '-p', f'score_threshold:={args.score_threshold}',
        '-p', f'cameras:=[{",".join(CAMERAS)}]', '-p', 'reliability:=[reliable]',
        '-p', 'diagnostics_period:=0.5', '--log-level', 'warn']
    return subprocess.Popen(command, env=dict(os.environ))


def run(args):
    frames = load_frames()
    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory(prefix='perception_benchmark_') as folder:
        if args.dds_profile == 'large-shm':
            # Set before the first rclpy.init; the node subprocess inherits it.
            profile = pathlib.Path(folder) / 'fastdds_large_shm.xml'
            profile.write_text(LARGE_SHM_PROFILE)
            os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] = str(profile)
        path = write_checkpoint(folder, args.input_size, args.checkpoint)
        state_dict, spec, _ = load_checkpoint(path)
        settings = InferenceSettings(score_threshold=args.score_threshold)
        detector = build_detector(spec, args.device, False, settings, state_dict)

        node_process = start_node(path, args)
        client = StreamClient(frames)
        try:
            client.wait_ready(node_process)

            # Warm-up: oneDNN builds its kernels per input shape, so run both batch sizes.
            time_bare_predict(detector, frames, 10)
            client.stream(CAMERAS, args.rate, 3.0)
            before = client.settled_counters()
            with client.lock:
                client.latencies = {camera: [] for camera in CAMERAS}

            # Alternate bare timing and streaming in short blocks, so that load from other
            # processes affects both sides of each ratio alike. They never run at once.
            single, batch, two_singles = [], [], []
            sent_single = sent_pair = 0
            for _ in range(args.blocks):
                times = time_bare_predict(detector, frames, args.rounds)
                single += times[0]
                batch += times[1]
                two_singles += times[2]
                sent_single += client.stream(SINGLE, args.rate, args.block_seconds)
                time.sleep(0.3)  # let the last frames finish
                sent_pair += client.stream(PAIR, args.rate, args.block_seconds)
                time.sleep(0.3)
            after = client.settled_counters()
            with client.lock:
                latencies = dict(client.latencies)
            node_camera = client.node_values(f'camera {SINGLE[0]}')
        finally:
            client.close()
            node_process.terminate()
            node_process.wait(timeout=30)

    one_camera = stream_figures(latencies[SINGLE[0]], sent_single, before, after, SINGLE,
                                median_ms(single))
    two_cameras = stream_figures(latencies[PAIR[0]] + latencies[PAIR[1]], sent_pair, before,
                                 after, PAIR, median_ms(batch))
    pair_batches = (after['batches'] - before['batches']) - one_camera['frames_published']
    two_cameras['mean_batch_size'] = round(two_cameras['frames_published'] / pair_batches, 3)

    result = {
        'dds_profile': args.dds_profile, 'torch_threads': args.torch_threads,
        'input_size': spec.input_size, 'rate_hz': args.rate,
        'bare_predict_ms': round(median_ms(single), 2),
        **one_camera,
        'node_latency_from_stamp_ms_p50': float(node_camera['latency_from_stamp_p50_ms']),
        'node_latency_from_receive_ms_p50': float(node_camera['latency_from_receive_p50_ms']),
        'two_camera_batch_ms': round(median_ms(batch), 2),
        'two_single_forwards_ms': round(median_ms(two_singles), 2),
        'batch_vs_two_singles': round(median_ms(batch) / median_ms(two_singles), 3),
    }
    result.update({f'two_camera_{key}': value for key, value in two_cameras.items()})
    return result


def print_table(result):
    targets = {'overhead_ratio': '<= 1.15', 'p99_over_p50': '<= 2.0',
               'batch_vs_two_singles': '< 1', 'counts_add_up': 'True'}
    width = max(len(key) for key in result)
    for key, value in result.items():
        target = targets.get(key, '')
        print(f'{key:<{width}}  {value!s:>10}  {("target " + target) if target else ""}')


def main(argv=None):
    # The node does the same at start, so both timings run with the same malloc settings.
    tune_malloc()
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--json', action='store_true', help='print one JSON object')
    parser.add_argument('--rate', type=float, default=30.0, help='frames per second per camera')
    parser.add_argument('--blocks', type=int, default=6,
                        help='number of alternating bare-timing and streaming blocks')
    parser.add_argument('--block-seconds', type=float, default=4.0,
                        help='seconds of streaming per block, for one camera and for two')
    parser.add_argument('--rounds', type=int, default=15,
                        help='bare predict rounds per block (1 frame, 2 frames, 2 x 1 frame)')
    parser.add_argument('--torch-threads', type=int, default=1,
                        help='torch threads for the node and the bare loop')
    parser.add_argument('--input-size', type=int, default=320, help='model input side, px')
    parser.add_argument('--score-threshold', type=float, default=0.3)
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'auto'")
    parser.add_argument('--dds-profile', choices=('large-shm', 'default'), default='large-shm',
                        help='Fast DDS transport set-up: shared memory with 32 MB segments '
                             '(UDP on loopback only), or the unchanged defaults')
    parser.add_argument('--checkpoint', default='',
                        help='weights to use; default: seeded random weights')
    args = parser.parse_args(argv)

    # Turn SIGTERM (e.g. from `timeout`) into SystemExit, so the node subprocess is stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
