"""``gradclip-ros train`` on a bag converted from real Apollo frames, with a small config."""

import argparse
import json
import pathlib

import pytest
import torch
import yaml

from gradclip_ros import convert, offline
from gradclip_ros.checkpoints import load_checkpoint

torch.set_num_threads(1)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def apollo_bag(shared_data, tmp_path_factory):
    """Five labeled full-HD frames per camera (20 vehicle boxes) as an mcap bag."""
    apollo = shared_data / 'driving' / 'apollo'
    output = tmp_path_factory.mktemp('bag') / 'apollo'
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    code = convert.main(parser.parse_args([
        '--camera-dir', f'narrow={apollo / "narrow"}', '--camera-dir',
        f'obstacle={apollo / "obstacle"}', '--coco', str(apollo / 'labels.json'),
        '--max-frames', '5', '--no-progress', '--output', str(output)]))
    assert code == 0
    return output


def small_config(tmp_path: pathlib.Path, **changes) -> pathlib.Path:
    """Write the package YAML with a 128 px model and quick validation; returns its path."""
    data = yaml.safe_load((REPO / 'config' / 'online_learning.yaml').read_text())
    parameters = data['online_learner_node']['ros__parameters']
    parameters.update({'input_size': 128, 'validate_every': 3, 'min_buffer_frames': 2,
                       'min_holdout_frames': 1, 'class_names': ['vehicle'], **changes})
    path = tmp_path / 'learning.yaml'
    path.write_text(yaml.safe_dump(data))
    return path


def run_train(*argv) -> int:
    parser = argparse.ArgumentParser()
    offline.add_train_arguments(parser)
    return offline.train_main(parser.parse_args(['--no-progress', *map(str, argv)]))


def test_train_writes_logs_checkpoints_and_plots(apollo_bag, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    code = run_train('--bag', apollo_bag, '--config', small_config(tmp_path), '--steps', 6,
                     '--run-dir', run_dir)
    output = capsys.readouterr().out
    assert code == 0
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary['steps'] == 6
    assert summary['step'] == 6
    assert 'read 8 training and 2 hold-out frames' in output

    lines = (run_dir / 'train_log.jsonl').read_text().splitlines()
    assert len(lines) == 6
    validations = [json.loads(line) for line in
                   (run_dir / 'validation_log.jsonl').read_text().splitlines()]
    assert [record['step'] for record in validations] == [3, 6]
    for name in ('loss.png', 'grad_norm.png', 'clip_rate.png', 'holdout_map.png',
                 'samples_per_s.png'):
        assert (run_dir / name).stat().st_size > 1000, name
    checkpoints = sorted((run_dir / 'checkpoints').glob('step-*.safetensors'))
    assert checkpoints[-1].name == 'step-000006.safetensors'
    _, spec, _ = load_checkpoint(checkpoints[-1])
    assert spec.input_size == 128
    assert spec.class_names == ('vehicle',)
    assert summary['deployed_path'] is None or pathlib.Path(summary['deployed_path']).is_file()


def test_train_resumes_in_same_run_dir(apollo_bag, tmp_path, capsys):
    config = small_config(tmp_path)
    run_dir = tmp_path / 'run'
    assert run_train('--bag', apollo_bag, '--config', config, '--steps', 2,
                     '--run-dir', run_dir) == 0
    assert run_train('--bag', apollo_bag, '--config', config, '--steps', 2,
                     '--run-dir', run_dir) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary['step'] == 4
    assert summary['steps'] == 2
    assert len((run_dir / 'train_log.jsonl').read_text().splitlines()) == 4


def test_train_rejects_bad_inputs(apollo_bag, tmp_path, capsys):
    assert run_train('--bag', apollo_bag, '--config', tmp_path / 'missing.yaml') == 2
    assert 'config file not found' in capsys.readouterr().err

    bad = small_config(tmp_path, learning_rate=-1.0)
    assert run_train('--bag', apollo_bag, '--config', bad, '--run-dir', tmp_path / 'r1') == 2
    assert 'learning_rate' in capsys.readouterr().err

    assert run_train('--bag', tmp_path / 'no_bag', '--config', small_config(tmp_path),
                     '--run-dir', tmp_path / 'r2') == 2
    assert 'no_bag' in capsys.readouterr().err

    assert run_train('--bag', apollo_bag, '--steps', 0) == 2
    assert '--steps' in capsys.readouterr().err
