"""Tests of trainer checkpoints: resume, pruning, corrupt files and SIGKILL during a save."""

import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from gradclip_ros.checkpoint_manager import CheckpointManager
from gradclip_ros.checkpoints import CheckpointError, load_checkpoint
from gradclip_ros.model import ModelSpec
from gradclip_ros.training import prepare_frame, Trainer, TrainerConfig

torch.set_num_threads(1)

SPEC = ModelSpec(class_names=('vehicle',), input_size=128)


@pytest.fixture(scope='module')
def frames(shared_data):
    """Six Apollo frames at 128 px with their ground-truth vehicle boxes."""
    import json

    import cv2
    root = shared_data / 'driving' / 'apollo'
    coco = json.loads((root / 'labels.json').read_text())
    result = []
    for image in sorted(coco['images'], key=lambda item: item['stamp_ns'])[:6]:
        rgb = cv2.imread(str(root / image['file_name']))[:, :, ::-1].copy()
        boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (
            a['bbox'] for a in coco['annotations'] if a['image_id'] == image['id'])],
            np.float32)
        result.append(prepare_frame(rgb, boxes, np.zeros(len(boxes), np.int64), 128,
                                    stamp_ns=image['stamp_ns'])[0])
    return result


def make_trainer(tmp_path, frames, **settings) -> Trainer:
    values = {'checkpoint_dir': str(tmp_path / 'checkpoints'), 'min_buffer_frames': 1,
              'holdout_every': 3, 'min_holdout_frames': 1, 'keep_last': 2,
              'handover_dir': str(tmp_path / 'models'), **settings}
    trainer = Trainer(TrainerConfig.from_dict(values), SPEC, run_dir=str(tmp_path))
    for frame in frames:
        trainer.add_prepared(frame)
    return trainer


def test_resume_restores_weights_and_state(tmp_path, frames):
    first = make_trainer(tmp_path, frames)
    for _ in range(3):
        first.train_step()
    first.validate()
    first.save_checkpoint()
    weights = {name: tensor.clone() for name, tensor in first.model.state_dict().items()}
    first.close()

    second = make_trainer(tmp_path, frames)
    assert second.resumed_from == 'step-000003'
    assert second.step == 3
    assert second.updates == first.updates
    assert second.deployed_version == first.deployed_version
    assert second.deployed_path == first.deployed_path
    for name, tensor in second.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    momentum = [state['momentum_buffer'] for state in second.optimizer.state.values()]
    assert momentum
    assert second.clipper.state_dict() == first.clipper.state_dict()
    record = second.train_step()
    assert record['step'] == 4


def test_resume_skips_corrupt_files(tmp_path, frames):
    trainer = make_trainer(tmp_path, frames, keep_last=5)
    for _ in range(3):
        trainer.train_step()
        trainer.save_checkpoint()
    trainer.close()
    directory = tmp_path / 'checkpoints'
    # Newest model file: garbage; second newest: corrupt trainer state.
    (directory / 'step-000003.safetensors').write_bytes(b'not a safetensors file')
    (directory / 'step-000002.state.pt').write_bytes(b'\x80\x04garbage')

    resumed = make_trainer(tmp_path, frames, keep_last=5)
    assert resumed.resumed_from == 'step-000001'
    assert resumed.step == 1
    assert resumed.counters['corrupt_checkpoints'] == 2
    assert resumed.checkpoints.corrupt_files == [
        str(directory / 'step-000003.safetensors'), str(directory / 'step-000002.state.pt')]


def test_pruning_keeps_last_and_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    model_state = {'weight': torch.zeros(2)}
    scores = {1: 0.1, 2: 0.9, 3: 0.2, 4: None, 5: 0.3, 6: 0.4}
    spec = ModelSpec(class_names=('vehicle',), input_size=128)

    # save() checks nothing about the tensors; load_latest would, so only names are checked.
    for step, score in scores.items():
        manager.save(step, model_state, spec, {'step': step}, score=score,
                     protected=('step-000001',))
    assert [version for _, version in manager.versions()] == [
        'step-000006', 'step-000005', 'step-000002', 'step-000001']
    assert manager.best_version() == 'step-000002'
    assert sorted(path.name for path in tmp_path.glob('*.state.pt')) == [
        'step-000001.state.pt', 'step-000002.state.pt', 'step-000005.state.pt',
        'step-000006.state.pt']


SAVER = textwrap.dedent("""
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    from gradclip_ros.model import ModelSpec
    from gradclip_ros.training import Frame, Trainer, TrainerConfig
    data = np.load(sys.argv[2])
    config = TrainerConfig.from_dict({
        'checkpoint_dir': sys.argv[1] + '/checkpoints', 'handover_dir': sys.argv[1] + '/models',
        'min_buffer_frames': 1, 'holdout_every': 3, 'min_holdout_frames': 1,
        'keep_last': 2, 'validate_every': 1, 'max_map_drop': 1.0})
    trainer = Trainer(config, ModelSpec(class_names=('vehicle',), input_size=128))
    for image, boxes in zip(data['images'], data['boxes']):
        trainer.add_prepared(Frame(image, boxes, np.zeros(len(boxes), np.int64), (1920, 1080)))
    print('start', trainer.step, flush=True)
    while True:
        trainer.train_step()
        trainer.maybe_validate()  # accepted every time: a hand-over and a checkpoint per step
""")


def check_directory(tmp_path: pathlib.Path) -> int:
    """Assert every checkpoint file loads or is a tmp leftover; returns the newest pair's step."""
    newest = 0
    for path in sorted((tmp_path / 'checkpoints').iterdir()):
        if path.name.endswith('.tmp'):
            assert path.name.startswith('.step-'), path
        elif path.suffix == '.safetensors':
            load_checkpoint(path, SPEC)
            state = path.with_name(path.name.replace('.safetensors', '.state.pt'))
            if state.exists():
                loaded = torch.load(state, weights_only=True)
                newest = max(newest, loaded['step'])
        else:
            assert path.name.endswith('.state.pt'), path
            torch.load(path, weights_only=True)
    for path in (tmp_path / 'models').glob('*.safetensors'):
        load_checkpoint(path, SPEC)
    return newest


def test_sigkill_during_saves_leaves_loadable_files(tmp_path, frames):
    data = tmp_path / 'frames.npz'
    np.savez(data, images=np.stack([frame.image for frame in frames]),
             boxes=np.stack([frame.boxes for frame in frames]))
    rng = random.Random(7)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    last_step = 0
    for round_index in range(3):
        process = subprocess.Popen(
            [sys.executable, '-c', SAVER, str(tmp_path), str(data)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = process.stdout.readline()
            assert line.startswith('start'), line
            started = int(line.split()[1])
            # Each round resumes from where the previous kill left the checkpoints.
            assert started == last_step
            time.sleep(rng.uniform(1.5, 3.5))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        last_step = check_directory(tmp_path)
        assert last_step > started, f'round {round_index}: no checkpoint written'

    trainer = Trainer(TrainerConfig.from_dict({
        'checkpoint_dir': str(tmp_path / 'checkpoints'), 'keep_last': 2}), SPEC)
    assert trainer.step == last_step
    assert trainer.counters['corrupt_checkpoints'] <= 1  # a model file whose state never came


def test_load_state_rejects_pickled_object(tmp_path):
    manager = CheckpointManager(tmp_path)
    import pickle
    (tmp_path / 'step-000001.state.pt').write_bytes(pickle.dumps(object()))
    with pytest.raises(CheckpointError):
        manager.load_state('step-000001')
