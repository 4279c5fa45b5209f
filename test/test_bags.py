"""Bag reading core: tiny bags written to tmp_path, read back; the real ROS 1 bags; damage."""

import collections
import shutil

import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from gradclip_ros import bags

CLASSES = ('vehicle', 'pedestrian', 'cyclist', 'traffic_light')


def _image(seed: int, height: int = 16, width: int = 24) -> np.ndarray:
    """Return a smooth RGB test image (JPEG keeps it close) that differs per ``seed``."""
    rows = np.linspace(0, 120, height)[:, None, None]
    cols = np.linspace(0, 90, width)[None, :, None]
    channels = np.array([0, 40, 80])[None, None, :]
    return (rows + cols + channels + 7 * seed).astype(np.uint8)


def write_labeled_bag(path, storage='mcap', compressed=False):
    """Write two cameras, three frames each; labels on frames 0 and 2 only.

    Frame 2 of camera ``front`` also has a box of an unknown class; a labels message without
    an image sits at stamp 999.
    """
    typestore = bags.get_bag_typestore()
    images = {}
    with bags.BagWriter(path, storage) as writer:
        for index in range(3):
            for offset, camera in enumerate(('front', 'rear')):
                stamp = 1_000_000_000 + index * 100_000_000 + offset
                image = _image(index * 2 + offset)
                images[(camera, stamp)] = image
                frame_id = f'{camera}_optical_frame'
                if compressed:
                    msg = bags.make_compressed_image(typestore, image, stamp, frame_id)
                else:
                    msg = bags.make_image(typestore, image, stamp, frame_id)
                writer.write(bags.image_topic(camera, compressed), msg, stamp)
                if index in (0, 2):
                    boxes = [[1.0, 1.0, 4.0, 5.0]]
                    names = ['vehicle']
                    if index == 2 and camera == 'front':
                        boxes.append([0.0, 0.0, 2.0, 2.0])
                        names.append('dog')
                    writer.write(bags.labels_topic(camera), bags.make_detections(
                        typestore, stamp, frame_id, boxes, names), stamp)
        writer.write('/front/labels', bags.make_detections(
            typestore, 999, 'front_optical_frame', [[0, 0, 1, 1]], ['vehicle']), 2_000_000_000)
    return images


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_labeled_frames_round_trip(tmp_path, storage):
    path = tmp_path / 'labeled'
    images = write_labeled_bag(path, storage)
    counters = collections.Counter()

    frames = list(bags.iter_labeled_frames(path, CLASSES, counters=counters))

    assert [(f.camera, f.stamp_ns) for f in frames] == [
        ('front', 1_000_000_000), ('rear', 1_000_000_001),
        ('front', 1_200_000_000), ('rear', 1_200_000_001)]
    for frame in frames:
        assert np.array_equal(frame.image, images[(frame.camera, frame.stamp_ns)])
        assert frame.image.flags.writeable
        assert frame.frame_id == f'{frame.camera}_optical_frame'
        assert frame.boxes.dtype == np.float32
        assert frame.boxes.shape == (1, 4)
        assert frame.labels.dtype == np.int64
        np.testing.assert_allclose(frame.boxes[0], [1.0, 1.0, 4.0, 5.0])
        assert frame.labels.tolist() == [0]
    assert counters['unknown_class_boxes'] == 1
    assert counters['unlabeled_images'] == 2
    assert counters['unmatched_labels'] == 1


def test_labeled_frames_camera_filter(tmp_path):
    path = tmp_path / 'labeled'
    write_labeled_bag(path)

    frames = list(bags.iter_labeled_frames(path, CLASSES, cameras=['rear']))

    assert {frame.camera for frame in frames} == {'rear'}
    assert len(frames) == 2
    with pytest.raises(bags.BagError, match='camera.*side.*not found.*front, rear'):
        list(bags.iter_labeled_frames(path, CLASSES, cameras=['side']))


def test_labeled_frames_compressed(tmp_path):
    path = tmp_path / 'compressed'
    images = write_labeled_bag(path, compressed=True)

    frames = list(bags.iter_labeled_frames(path, CLASSES))

    assert len(frames) == 4
    for frame in frames:
        expected = images[(frame.camera, frame.stamp_ns)].astype(np.int16)
        # Random noise is the worst case for JPEG; quality 90 keeps it within this bound.
        assert np.abs(frame.image.astype(np.int16) - expected).mean() < 40


def test_bag_embeds_definitions(tmp_path):
    path = tmp_path / 'labeled'
    write_labeled_bag(path)

    # No default typestore: everything must come from the definitions stored in the bag.
    with AnyReader([path]) as reader:
        connection = next(c for c in reader.connections if c.topic == '/front/labels')
        raw = next(raw for _, _, raw in reader.messages([connection]))
        msg = reader.deserialize(raw, connection.msgtype)

    assert connection.msgtype == bags.DETECTIONS_TYPE
    assert msg.detections[0].results[0].hypothesis.class_id == 'vehicle'
    assert msg.detections[0].results[0].hypothesis.score == 1.0
    assert msg.detections[0].bbox.center.position.x == pytest.approx(2.5)
    assert msg.detections[0].bbox.size_y == pytest.approx(4.0)


def test_list_topics_and_cameras(tmp_path):
    path = tmp_path / 'labeled'
    write_labeled_bag(path)

    topics = bags.list_topics(path)

    assert topics['/front/image_raw'] == (bags.IMAGE_TYPE, 3)
    assert topics['/front/labels'] == (bags.DETECTIONS_TYPE, 3)
    assert bags.list_cameras(path) == ['front', 'rear']


def test_iter_frames_all_images(tmp_path):
    path = tmp_path / 'labeled'
    images = write_labeled_bag(path)

    frames = list(bags.iter_frames(path))

    assert len(frames) == 6
    assert [f.bag_time_ns for f in frames] == sorted(f.bag_time_ns for f in frames)
    for frame in frames:
        assert np.array_equal(frame.image, images[(frame.camera, frame.stamp_ns)])


def test_writer_failure_leaves_nothing(tmp_path):
    path = tmp_path / 'out'

    with pytest.raises(RuntimeError, match='boom'):
        with bags.BagWriter(path) as writer:
            writer.write('/a/image_raw', bags.make_image(
                writer.typestore, _image(0), 1, 'a'), 1)
            raise RuntimeError('boom')

    assert list(tmp_path.iterdir()) == []


def test_writer_overwrite(tmp_path):
    path = tmp_path / 'out'
    write_labeled_bag(path)

    with pytest.raises(bags.BagError, match='already exists.*--overwrite'):
        bags.BagWriter(path)
    with bags.BagWriter(path, overwrite=True) as writer:
        writer.write('/a/image_raw', bags.make_image(writer.typestore, _image(0), 5, 'a'), 5)

    assert bags.list_topics(path) == {'/a/image_raw': (bags.IMAGE_TYPE, 1)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


def test_cdr_header_matches_deserialized(tmp_path):
    typestore = bags.get_bag_typestore()
    msg = bags.make_image(typestore, _image(3), 1_234_567_890_123, 'cam_optical_frame')

    cdr = bytes(typestore.serialize_cdr(msg, bags.IMAGE_TYPE))

    assert bags.cdr_header(cdr) == (1_234_567_890_123, 'cam_optical_frame')


def test_missing_and_garbage_bags(tmp_path):
    garbage = tmp_path / 'garbage.mcap'
    garbage.write_bytes(b'not a bag at all' * 10)

    with pytest.raises(bags.BagError, match='bag not found: .*nothing'):
        bags.list_topics(tmp_path / 'nothing')
    with pytest.raises(bags.BagError, match='garbage.mcap'):
        bags.list_topics(garbage)
    with pytest.raises(bags.BagError, match='garbage.mcap'):
        bags.BagSource(garbage)


def test_truncated_mcap_partly_readable(tmp_path):
    path = tmp_path / 'full'
    typestore = bags.get_bag_typestore()
    with bags.BagWriter(path) as writer:
        for index in range(40):
            image = np.full((200, 200, 3), index, np.uint8)
            writer.write('/cam/image_raw', bags.make_image(typestore, image, index, 'c'), index)
    damaged = tmp_path / 'damaged'
    shutil.copytree(path, damaged)
    mcap_file = next(damaged.glob('*.mcap'))
    with open(mcap_file, 'r+b') as handle:
        handle.truncate(mcap_file.stat().st_size - 5000)

    with pytest.raises(bags.BagError, match='damaged'):
        bags.list_topics(damaged)
    source = bags.BagSource(damaged)
    received = []
    with pytest.raises(bags.BagReadError, match=r'damaged/full.mcap is truncated') as error:
        for message in source.messages():
            received.append(message)
    source.close()

    assert source.salvaged is not None
    assert 0 < len(received) < 40
    assert error.value.messages_read == len(received)
    assert error.value.last_timestamp_ns == received[-1].bag_time_ns
    for index, message in enumerate(received):
        assert message.bag_time_ns == index
        msg = typestore.deserialize_cdr(message.cdr, message.msgtype)
        assert int(msg.data[0]) == index


def test_ros1_rgb8_big_endian_flag(shared_data):
    path = shared_data / 'bags' / 'spot_hand_color_rgb8.bag'

    frames = list(bags.iter_frames(path, cameras=None))
    with bags.open_bag(path) as reader:
        connection = reader.connections[0]
        msg = reader.deserialize(next(reader.messages())[2], connection.msgtype)

    # The topic is not /<camera>/image_raw, so iter_frames finds no camera in it.
    assert frames == []
    assert msg.is_bigendian == 1
    assert msg.encoding == 'rgb8'
    image = bags.decode_rgb(msg)
    assert image.shape == (480, 640, 3)
    assert image.dtype == np.uint8
    assert image[240, 320].tolist() == [172, 175, 171]
    assert bags.stamp_to_ns(msg.header.stamp) == 1648052479616566426


def test_ros1_color_and_depth_values(shared_data):
    path = shared_data / 'bags' / 'realsense_color_depth.bag'
    depth_topic = '/device_0/sensor_0/Depth_0/image/data'
    color_topic = '/device_0/sensor_1/Color_0/image/data'

    decoded = collections.defaultdict(list)
    with bags.open_bag(path) as reader:
        connections = [c for c in reader.connections if c.topic in (depth_topic, color_topic)]
        for connection, _, raw in reader.messages(connections):
            msg = reader.deserialize(raw, connection.msgtype)
            decoded[connection.topic].append((msg.encoding, bags.decode_image_native(msg)))

    encoding, color = decoded[color_topic][0]
    assert encoding == 'rgb8'
    assert color.shape == (480, 640, 3)
    assert color[240, 320].tolist() == [77, 46, 3]
    assert len(decoded[depth_topic]) == 2
    for encoding, depth in decoded[depth_topic]:
        assert encoding == 'mono16'
        assert depth.shape == (480, 640)
        assert depth.dtype == np.uint16
        valid = depth[depth > 0]
        # Millimetres: an indoor office between about 0.3 and 3.2 m, most pixels valid.
        assert valid.size / depth.size > 0.9
        assert 300 <= valid.min()
        assert valid.max() <= 3300
        assert 1200 <= np.median(valid) <= 1700
    assert decoded[depth_topic][0][1][240, 320] == 1536


def test_ros1_source_converts_to_ros2_cdr(shared_data):
    path = shared_data / 'bags' / 'realsense_color_depth.bag'
    typestore = bags.get_bag_typestore()

    with bags.BagSource(path) as source:
        messages = list(source.messages(['/device_0/sensor_0/Depth_0/image/data',
                                         '/device_0/sensor_1/Color_0/info/camera_info']))
        unsupported = dict(source.unsupported)
        assert source.is_ros1

    assert unsupported['/device_0/sensor_1/Color_0/info'] == 'realsense_msgs/msg/StreamInfo'
    assert [m.msgtype for m in messages] == [
        'sensor_msgs/msg/CameraInfo', 'sensor_msgs/msg/Image', 'sensor_msgs/msg/Image']
    info = typestore.deserialize_cdr(messages[0].cdr, messages[0].msgtype)
    assert info.k[0] == pytest.approx(613.20, abs=0.01)
    depth = typestore.deserialize_cdr(messages[1].cdr, messages[1].msgtype)
    assert not hasattr(depth.header, 'seq')
    assert bags.cdr_header(messages[1].cdr) == (360_815_089_000, '0')
    assert bags.decode_image_native(depth)[240, 320] == 1536


def test_truncated_ros1_bag_partly_readable(shared_data, tmp_path):
    original = shared_data / 'bags' / 'realsense_color_depth.bag'
    damaged = tmp_path / 'realsense_cut.bag'
    data = original.read_bytes()
    damaged.write_bytes(data[:int(len(data) * 0.9)])

    source = bags.BagSource(damaged)
    received = []
    with pytest.raises(bags.BagReadError, match='realsense_cut.bag is truncated') as error:
        for message in source.messages():
            received.append(message)
    source.close()

    with bags.BagSource(original) as intact:
        expected = {(m.topic, m.bag_time_ns, m.cdr) for m in intact.messages()}

    assert 'cannot open bag' in source.salvaged
    assert len(received) > 50
    assert error.value.messages_read >= len(received)
    # Salvaged messages come in file order, which need not be time order; each one must be
    # exactly a message of the intact bag.
    assert all((m.topic, m.bag_time_ns, m.cdr) in expected for m in received)
