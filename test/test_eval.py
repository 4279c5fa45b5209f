"""``gradclip-ros eval`` on a slice of the real Apollo frames with a saved random-init model."""

import argparse
import json

import pytest
import torch

from gradclip_ros import convert, offline
from gradclip_ros.checkpoints import save_checkpoint
from gradclip_ros.model import build_model, ModelSpec


def run_eval(*argv):
    parser = argparse.ArgumentParser()
    offline.add_eval_arguments(parser)
    return offline.eval_main(parser.parse_args(['--no-progress', *map(str, argv)]))


@pytest.fixture(scope='module')
def apollo_bag(shared_data, tmp_path_factory):
    """Two labeled full-HD frames per camera (8 vehicle boxes) as an mcap bag."""
    apollo = shared_data / 'driving' / 'apollo'
    output = tmp_path_factory.mktemp('eval') / 'apollo'
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    code = convert.main(parser.parse_args([
        '--camera-dir', f'narrow={apollo / "narrow"}', '--camera-dir',
        f'obstacle={apollo / "obstacle"}', '--coco', str(apollo / 'labels.json'),
        '--max-frames', '2', '--no-progress', '--output', str(output)]))
    assert code == 0
    return output


@pytest.fixture(scope='module')
def random_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    spec = ModelSpec(version='random-test')
    path = tmp_path_factory.mktemp('ckpt') / 'random.safetensors'
    save_checkpoint(path, build_model(spec).state_dict(), spec)
    return path


def test_eval_json_on_real_frames(apollo_bag, random_checkpoint, capsys):
    torch.set_num_threads(1)

    code = run_eval('--bag', apollo_bag, '--checkpoint', random_checkpoint, '--device', 'cpu',
                    '--json')

    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ('map50', 'map', 'per_class', 'frames', 'boxes', 'fps', 'wall_fps', 'model'):
        assert key in result
    assert result['frames'] == 4
    assert result['boxes'] == 8
    assert result['model'] == 'ssdlite320_mobilenet_v3_large random-test'
    # Random weights find none of the two labeled vehicles per frame.
    assert 0.0 <= result['map50'] < 0.05
    assert 0.0 <= result['map'] <= result['map50']
    assert set(result['per_class']) == {'vehicle'}
    assert result['fps'] > 0
    assert result['wall_fps'] > 0
    assert result['skipped'] == {}


def test_eval_table_one_camera_random_init(apollo_bag, capsys):
    torch.set_num_threads(1)

    code = run_eval('--bag', apollo_bag, '--cameras', 'narrow', '--device', 'cpu',
                    '--score-threshold', 0.5)

    assert code == 0
    captured = capsys.readouterr()
    assert 'no --checkpoint given' in captured.err
    assert '(2 frames, 4 boxes)' in captured.out
    assert 'mAP@0.5' in captured.out
    assert 'AP vehicle' in captured.out


def test_eval_bad_inputs(apollo_bag, tmp_path, capsys):
    broken = tmp_path / 'broken.safetensors'
    broken.write_bytes(b'\x00' * 64)

    assert run_eval('--bag', apollo_bag, '--checkpoint', broken) == 1
    assert 'broken.safetensors' in capsys.readouterr().err

    assert run_eval('--bag', tmp_path / 'missing') == 2
    assert 'bag not found' in capsys.readouterr().err

    assert run_eval('--bag', apollo_bag, '--cameras', 'rear') == 2
    assert 'camera(s) rear not found' in capsys.readouterr().err

    assert run_eval('--bag', apollo_bag, '--score-threshold', 2) == 1
    assert '--score-threshold must be in [0, 1]' in capsys.readouterr().err


def test_eval_bag_without_labels(shared_data, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    output = tmp_path / 'unlabeled'
    assert convert.main(parser.parse_args([
        '--input', str(shared_data / 'driving' / 'apollo' / 'narrow'), '--max-frames', '1',
        '--no-progress', '--output', str(output)])) == 0

    assert run_eval('--bag', output, '--device', 'cpu') == 1
    assert 'no labeled frames' in capsys.readouterr().err
