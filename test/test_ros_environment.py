"""The pip-based ROS 2 environment is real: two processes talk over Fast DDS."""

import os
import pathlib
import subprocess
import sys
import textwrap
import time
from xml.etree import ElementTree

import rclpy
from rclpy.executors import SingleThreadedExecutor
from sensor_msgs.msg import Image
from vision_msgs.msg import Detection2DArray

TALKER = textwrap.dedent("""
    import sys
    import time

    import rclpy
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose

    rclpy.init()
    node = rclpy.create_node('env_talker')
    image_pub = node.create_publisher(Image, 'env_test/image_raw', 10)
    detection_pub = node.create_publisher(Detection2DArray, 'env_test/detections', 10)

    image = Image(height=2, width=3, encoding='rgb8', step=9, data=bytes(range(18)))
    image.header.frame_id = 'camera_front'
    detections = Detection2DArray()
    detections.header.frame_id = 'camera_front'
    detection = Detection2D(id='7')
    detection.bbox.center.position.x = 12.5
    detection.bbox.size_x = 4.0
    hypothesis = ObjectHypothesisWithPose()
    hypothesis.hypothesis.class_id = 'vehicle'
    hypothesis.hypothesis.score = 0.75
    detection.results.append(hypothesis)
    detections.detections.append(detection)

    # Publish until the listener has both messages or the deadline passes.
    deadline = time.monotonic() + 20.0
    sequence = 0
    while time.monotonic() < deadline:
        image.header.stamp.sec = sequence
        detections.header.stamp.sec = sequence
        image_pub.publish(image)
        detection_pub.publish(detections)
        sequence += 1
        rclpy.spin_once(node, timeout_sec=0.05)
        if sys.stdin.closed:
            break
    node.destroy_node()
    rclpy.shutdown()
""")


def test_image_and_detections_cross_processes():
    talker = subprocess.Popen([sys.executable, '-c', TALKER], stdin=subprocess.PIPE)
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node('env_listener', context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        received = {}
        node.create_subscription(
            Image, 'env_test/image_raw', lambda msg: received.setdefault('image', msg), 10)
        node.create_subscription(
            Detection2DArray, 'env_test/detections',
            lambda msg: received.setdefault('detections', msg), 10)

        deadline = time.monotonic() + 30.0
        while len(received) < 2 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
            assert talker.poll() is None or len(received) == 2, 'talker process exited early'
    finally:
        talker.kill()
        talker.wait()
        rclpy.shutdown(context=context)

    assert 'image' in received, 'no sensor_msgs/Image arrived over DDS'
    assert 'detections' in received, 'no vision_msgs/Detection2DArray arrived over DDS'
    image = received['image']
    assert (image.height, image.width, image.encoding, image.step) == (2, 3, 'rgb8', 9)
    assert bytes(image.data) == bytes(range(18))
    assert image.header.frame_id == 'camera_front'
    detection = received['detections'].detections[0]
    assert detection.id == '7'
    assert detection.bbox.center.position.x == 12.5
    assert detection.results[0].hypothesis.class_id == 'vehicle'
    assert abs(detection.results[0].hypothesis.score - 0.75) < 1e-12


def test_fastdds_profile_is_valid_xml():
    # Fast DDS only logs a parse error and falls back to its defaults, so check it here.
    path = pathlib.Path(__file__).resolve().parents[1] / 'config' / 'fastdds_localhost_shm.xml'
    root = ElementTree.parse(path).getroot()
    namespace = '{http://www.eprosima.com}'
    sizes = [int(e.text) for e in root.iter(f'{namespace}segment_size')]
    assert sizes and min(sizes) >= 8 * 1024 * 1024, 'shared-memory segment too small'
    addresses = [e.text for e in root.iter(f'{namespace}address')]
    assert addresses == ['127.0.0.1'], f'UDP must stay on loopback, got {addresses}'
    assert os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE') == str(path), \
        'tools/env.sh does not point FASTDDS_DEFAULT_PROFILES_FILE at the profile'
