"""``gradclip-ros convert`` on the real data: round trips, labels, stamps and bad input."""

import argparse
import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from gradclip_ros import bags, convert

CLASSES = ('vehicle', 'pedestrian', 'cyclist', 'traffic_light')


def run_convert(*argv):
    """Parse ``argv`` like the command line does and run the conversion in this process."""
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    return convert.main(parser.parse_args(['--no-progress', *map(str, argv)]))


def coco_boxes(coco_file, file_name):
    """Return the xyxy boxes of ``file_name`` in a COCO file."""
    data = json.loads(pathlib.Path(coco_file).read_text())
    image_id = next(i['id'] for i in data['images'] if i['file_name'] == file_name)
    boxes = [a['bbox'] for a in data['annotations'] if a['image_id'] == image_id]
    return np.array([[x, y, x + w, y + h] for x, y, w, h in boxes], np.float32).reshape(-1, 4)


def sorted_boxes(boxes):
    return boxes[np.lexsort(boxes.T[::-1])]


def read_all(bag_path):
    """Return ``{topic: [deserialized messages]}`` in bag order."""
    messages = collections.defaultdict(list)
    with bags.open_bag(bag_path) as reader:
        for connection, timestamp, raw in reader.messages():
            msg = reader.deserialize(raw, connection.msgtype)
            assert bags.stamp_to_ns(msg.header.stamp) == timestamp
            messages[connection.topic].append(msg)
    return messages


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_apollo_round_trip(shared_data, tmp_path, capsys, storage):
    apollo = shared_data / 'driving' / 'apollo'
    output = tmp_path / 'apollo'

    code = run_convert('--camera-dir', f'narrow={apollo / "narrow"}',
                       '--camera-dir', f'obstacle={apollo / "obstacle"}',
                       '--coco', apollo / 'labels.json', '--max-frames', 3,
                       '--storage', storage, '--output', output)

    assert code == 0
    out = capsys.readouterr().out
    assert 'frames: 6 (narrow=3, obstacle=3)' in out
    assert 'boxes written: 12' in out
    assert 'skipped: 0' in out
    frames = list(bags.iter_labeled_frames(output, CLASSES))
    assert len(frames) == 6
    assert [f.stamp_ns for f in frames] == sorted(f.stamp_ns for f in frames)
    for frame in frames:
        source = apollo / frame.camera / f'{frame.stamp_ns}.jpg'
        expected = cv2.cvtColor(cv2.imread(str(source)), cv2.COLOR_BGR2RGB)
        assert np.array_equal(frame.image, expected)
        assert frame.frame_id == f'{frame.camera}_optical_frame'
        truth = coco_boxes(apollo / 'labels.json', f'{frame.camera}/{frame.stamp_ns}.jpg')
        np.testing.assert_allclose(sorted_boxes(frame.boxes), sorted_boxes(truth), atol=1e-3)
        assert frame.labels.tolist() == [0, 0]
    assert next(output.glob('*.db3' if storage == 'sqlite3' else '*.mcap')).is_file()


def test_apollo_compressed_resized(shared_data, tmp_path):
    apollo = shared_data / 'driving' / 'apollo'
    output = tmp_path / 'small'

    code = run_convert('--input', apollo / 'obstacle', '--camera', 'front', '--coco',
                       apollo / 'labels.json', '--max-frames', 2, '--compressed',
                       '--resize', '960x540', '--frame-id', 'cam_{camera}', '--output', output)

    assert code == 0
    messages = read_all(output)
    assert set(messages) == {'/front/image_raw/compressed', '/front/labels'}
    frames = list(bags.iter_labeled_frames(output, CLASSES))
    assert len(frames) == 2
    for frame in frames:
        assert frame.image.shape == (540, 960, 3)
        assert frame.frame_id == 'cam_front'
        source = cv2.imread(str(apollo / 'obstacle' / f'{frame.stamp_ns}.jpg'))
        expected = cv2.cvtColor(cv2.resize(source, (960, 540), interpolation=cv2.INTER_AREA),
                                cv2.COLOR_BGR2RGB)
        assert np.abs(frame.image.astype(np.int16) - expected).mean() < 3.0
        truth = coco_boxes(apollo / 'labels.json', f'obstacle/{frame.stamp_ns}.jpg') / 2.0
        np.testing.assert_allclose(sorted_boxes(frame.boxes), sorted_boxes(truth), atol=1e-3)


def test_udacity_video_teacher_labels(shared_data, tmp_path, capsys):
    udacity = shared_data / 'driving' / 'udacity'
    output = tmp_path / 'video'

    code = run_convert('--input', udacity / 'solidWhiteRight.mp4', '--camera', 'dash',
                       '--coco', udacity / 'teacher_labels.json', '--max-frames', 5,
                       '--encoding', 'bgr8', '--output', output)

    assert code == 0
    assert 'frames: 5 (dash=5)' in capsys.readouterr().out
    images = read_all(output)['/dash/image_raw']
    assert [msg.encoding for msg in images] == ['bgr8'] * 5
    capture = cv2.VideoCapture(str(udacity / 'solidWhiteRight.mp4'))
    frames = list(bags.iter_labeled_frames(output, CLASSES))
    assert [f.stamp_ns for f in frames] == [i * 40_000_000 for i in range(5)]
    for index, frame in enumerate(frames):
        ok, bgr = capture.read()
        assert ok
        assert np.array_equal(frame.image, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        truth = coco_boxes(udacity / 'teacher_labels.json', f'solidWhiteRight.mp4#{index}')
        np.testing.assert_allclose(sorted_boxes(frame.boxes), sorted_boxes(truth), atol=1e-3)
    capture.release()
    labels = read_all(output)['/dash/labels']
    scores = [d.results[0].hypothesis.score for msg in labels for d in msg.detections]
    assert scores
    assert all(0.65 < score <= 1.0 for score in scores)


def test_udacity_stills_need_fps(shared_data, tmp_path, capsys):
    udacity = shared_data / 'driving' / 'udacity'

    code = run_convert('--input', udacity / 'images', '--coco',
                       udacity / 'teacher_labels.json', '--output', tmp_path / 'stills')
    assert code == 1
    assert 'pass --fps' in capsys.readouterr().err
    assert not (tmp_path / 'stills').exists()

    code = run_convert('--input', udacity / 'images', '--coco', udacity / 'teacher_labels.json',
                       '--fps', 2, '--start-ns', 5_000_000_000, '--output', tmp_path / 'stills')
    assert code == 0
    frames = list(bags.iter_labeled_frames(tmp_path / 'stills', CLASSES))
    assert len(frames) == 14
    assert frames[0].stamp_ns == 5_000_000_000
    assert frames[1].stamp_ns == 5_500_000_000
    assert sum(len(f.boxes) for f in frames) == 16


def make_kitti_case(shared_data, tmp_path):
    """Copy three real stills and write KITTI labels with every kind of problem."""
    images = tmp_path / 'images'
    images.mkdir()
    for name in ('test1', 'test2', 'test3'):
        shutil.copy(shared_data / 'driving' / 'udacity' / 'images' / f'{name}.jpg',
                    images / f'{name}.jpg')
    labels = tmp_path / 'labels'
    labels.mkdir()
    tail = '1.5 1.6 3.9 1.0 1.7 12.0 0.1'
    (labels / 'test1.txt').write_text(
        f'Car 0.0 0 -1.5 800.0 400.0 950.5 500.0 {tail}\n'
        f'Pedestrian 0.0 0 0.2 100.0 380.0 140.0 470.0 {tail} 0.8\n'
        f'DontCare -1 -1 -10 10.0 10.0 50.0 50.0 {tail}\n'
        f'Tram 0.0 0 0.1 300.0 300.0 400.0 400.0 {tail}\n')
    (labels / 'test2.txt').write_text(
        f'Car 0.0 0 0.0 1200.0 600.0 1400.0 700.0 {tail}\n'
        f'Car 0.0 0 0.0 1300.0 800.0 1500.0 900.0 {tail}\n'
        'Car 0.0 0\n')
    (labels / 'missing_frame.txt').write_text(f'Car 0 0 0 1 1 5 5 {tail}\n')
    return images, labels


def test_kitti_labels_with_bad_items(shared_data, tmp_path, capsys):
    images, labels = make_kitti_case(shared_data, tmp_path)
    output = tmp_path / 'kitti'

    code = run_convert('--input', images, '--camera', 'cam', '--kitti', labels, '--fps', 10,
                       '--json', '--output', output)

    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary['frames'] == {'cam': 3}
    assert summary['labeled_frames'] == {'cam': 2}
    assert summary['boxes'] == {'cam': 3}
    assert summary['skipped'] == {'unmapped_class': 1, 'box_outside_image': 1,
                                  'invalid_annotation': 1, 'label_without_image': 1}
    assert summary['notes'] == {'kitti_dont_care': 1, 'boxes_clipped_to_image': 1}
    assert "class 'Tram' maps to no detector class" in captured.err
    assert 'test2.txt:2' in captured.err
    assert 'outside the 1280x720 image' in captured.err
    assert 'test2.txt:3: 3 columns' in captured.err
    assert 'missing_frame.txt: no image' in captured.err

    frames = {f.stamp_ns: f for f in bags.iter_labeled_frames(output, CLASSES)}
    first, second = frames[0], frames[100_000_000]
    assert first.labels.tolist() == [0, 1]
    np.testing.assert_allclose(first.boxes[0], [800.0, 400.0, 950.5, 500.0])
    np.testing.assert_allclose(second.boxes, [[1200.0, 600.0, 1280.0, 700.0]])
    scores = [d.results[0].hypothesis.score
              for d in read_all(output)['/cam/labels'][0].detections]
    assert scores == pytest.approx([1.0, 0.8])


def test_class_map_file(shared_data, tmp_path, capsys):
    images, labels = make_kitti_case(shared_data, tmp_path)
    class_map = tmp_path / 'map.yaml'
    class_map.write_text('Car: vehicle\nPedestrian: ""\nTram: vehicle\n')

    code = run_convert('--input', images, '--kitti', labels, '--fps', 10, '--class-map',
                       class_map, '--json', '--output', tmp_path / 'mapped')

    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['boxes'] == {'camera': 3}
    assert summary['skipped']['unmapped_class'] == 1
    frames = list(bags.iter_labeled_frames(tmp_path / 'mapped', CLASSES, ['camera']))
    assert frames[0].labels.tolist() == [0, 0]


def test_class_map_to_unknown_class(shared_data, tmp_path, capsys):
    images, labels = make_kitti_case(shared_data, tmp_path)
    class_map = tmp_path / 'map.yaml'
    class_map.write_text('dataset_class_map:\n  Car: truck\n')

    code = run_convert('--input', images, '--kitti', labels, '--fps', 10, '--class-map',
                       class_map, '--output', tmp_path / 'mapped')

    assert code == 1
    assert "sends 'Car' to 'truck'" in capsys.readouterr().err
    assert not (tmp_path / 'mapped').exists()


def test_bad_image_and_missing_coco_image(shared_data, tmp_path, capsys):
    apollo = shared_data / 'driving' / 'apollo'
    folder = tmp_path / 'narrow'
    folder.mkdir()
    names = sorted(p.name for p in (apollo / 'narrow').iterdir())[:3]
    for name in names[:2]:
        os.symlink(apollo / 'narrow' / name, folder / name)
    (folder / '1531984546999999999.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    coco = json.loads((apollo / 'labels.json').read_text())
    (tmp_path / 'labels.json').write_text(json.dumps(coco))

    code = run_convert('--camera-dir', f'narrow={folder}', '--coco', tmp_path / 'labels.json',
                       '--json', '--output', tmp_path / 'out')

    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary['frames'] == {'narrow': 2}
    assert summary['skipped']['unreadable_image'] == 1
    # 21 narrow frames are labeled in the COCO file, only 2 of them exist in this folder.
    assert summary['skipped']['label_without_image'] == 19
    assert '1531984546999999999.jpg: OpenCV cannot decode the image' in captured.err
    assert f"image 'narrow/{names[2]}' has labels but no such frame" in captured.err


def test_box_outside_image_coco(shared_data, tmp_path, capsys):
    apollo = shared_data / 'driving' / 'apollo'
    coco = json.loads((apollo / 'labels.json').read_text())
    first_narrow = next(i for i in coco['images'] if i['camera'] == 'narrow')
    coco['annotations'].append({'id': 999, 'image_id': first_narrow['id'], 'category_id': 1,
                                'bbox': [2000, 100, 50, 50]})
    coco['annotations'].append({'id': 998, 'image_id': first_narrow['id'], 'category_id': 7,
                                'bbox': [10, 10, 50, 50]})
    coco['annotations'].append({'id': 997, 'image_id': 4242, 'category_id': 1,
                                'bbox': [10, 10, 50, 50]})
    labels = tmp_path / 'labels.json'
    labels.write_text(json.dumps(coco))
    # The COCO file names are relative to its folder, so link the camera folder next to it.
    os.symlink(apollo / 'narrow', tmp_path / 'narrow')

    code = run_convert('--camera-dir', f'narrow={tmp_path / "narrow"}', '--coco', labels,
                       '--max-frames', 1, '--json', '--output', tmp_path / 'out')

    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary['boxes'] == {'narrow': 2}
    assert summary['skipped'] == {'box_outside_image': 1, 'unknown_category': 1,
                                  'annotation_without_image': 1}
    assert 'annotation 999 on' in captured.err
    assert 'outside the 1920x1080 image' in captured.err
    assert 'annotation 998: category_id 7' in captured.err
    assert 'annotation 997: image_id 4242' in captured.err


def test_missing_input_fails_cleanly(tmp_path, capsys):
    code = run_convert('--input', tmp_path / 'nope.mp4', '--output', tmp_path / 'out')

    assert code == 1
    assert f'input not found: {tmp_path / "nope.mp4"}' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_corrupt_video_leaves_no_bag(shared_data, tmp_path):
    video = tmp_path / 'broken.mp4'
    data = (shared_data / 'driving' / 'udacity' / 'solidWhiteRight.mp4').read_bytes()
    video.write_bytes(data[:len(data) // 3])

    # Through the real command line, as a user would run it.
    result = subprocess.run(
        [sys.executable, '-m', 'gradclip_ros.cli', 'convert', '--input', str(video),
         '--no-progress', '--output', str(tmp_path / 'out')],
        capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert 'broken.mp4' in result.stderr
    assert 'no bag was written' in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['broken.mp4']


def test_existing_output_needs_overwrite(shared_data, tmp_path, capsys):
    apollo = shared_data / 'driving' / 'apollo'
    output = tmp_path / 'out'
    output.mkdir()
    (output / 'keep.txt').write_text('old')

    code = run_convert('--input', apollo / 'narrow', '--max-frames', 1, '--output', output)
    assert code == 1
    assert 'already exists; pass --overwrite' in capsys.readouterr().err
    assert (output / 'keep.txt').read_text() == 'old'

    code = run_convert('--input', apollo / 'narrow', '--max-frames', 1, '--overwrite',
                       '--output', output)
    assert code == 0
    assert not (output / 'keep.txt').exists()
    assert bags.list_topics(output) == {'/camera/image_raw': (bags.IMAGE_TYPE, 1)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']
