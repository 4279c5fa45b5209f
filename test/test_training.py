"""Tests of the ROS-free trainer: config checks, buffers, augmentation, safety gates, learning.

The learning test fine-tunes the random-init detector on the 42 Apollo frames (2 ground-truth
vehicles each) and checks that hold-out mAP@0.5 rises clearly; the gate tests reuse that run.
"""

import json
import pathlib

import cv2
import numpy as np
import pytest
import torch

from gradclip_ros.checkpoints import load_checkpoint
from gradclip_ros.clip_config import ClipConfig
from gradclip_ros.model import build_model, ModelSpec
from gradclip_ros.training import (
    config_from_parameters, Frame, HANDOVER_PREFIX, HoldoutSet, prepare_frame, ReplayBuffer,
    Trainer, TrainerConfig)

torch.set_num_threads(1)

LEARN_STEPS = 150
# Settings of the learning run; everything else is the TrainerConfig default.
LEARN_SETTINGS = {'validate_every': 50, 'scale_min': 1.0, 'scale_max': 1.0}


def load_apollo(shared_data: pathlib.Path):
    """Return the Apollo frames in stamp order as (camera, stamp_ns, rgb, boxes xyxy)."""
    root = shared_data / 'driving' / 'apollo'
    coco = json.loads((root / 'labels.json').read_text())
    frames = []
    for image in sorted(coco['images'], key=lambda item: item['stamp_ns']):
        bgr = cv2.imread(str(root / image['file_name']))
        boxes = [[x, y, x + w, y + h] for x, y, w, h in
                 (a['bbox'] for a in coco['annotations'] if a['image_id'] == image['id'])]
        frames.append((image['camera'], image['stamp_ns'], bgr[:, :, ::-1].copy(),
                       np.asarray(boxes, np.float32)))
    return frames


@pytest.fixture(scope='module')
def apollo(shared_data):
    return load_apollo(shared_data)


@pytest.fixture(scope='module')
def learned(apollo, tmp_path_factory):
    """Train on Apollo from random weights; returns (trainer, start metrics, run dir)."""
    run_dir = tmp_path_factory.mktemp('run')
    config = TrainerConfig.from_dict({
        **LEARN_SETTINGS,
        'checkpoint_dir': str(run_dir / 'checkpoints'),
        'handover_dir': str(run_dir / 'models'),
    })
    spec = ModelSpec(class_names=('vehicle',), input_size=320)
    trainer = Trainer(config, spec, run_dir=str(run_dir))
    for camera, stamp, image, boxes in apollo:
        trainer.add_frame(image, boxes, np.zeros(len(boxes), np.int64), camera, stamp)
    start = trainer.evaluate()
    for _ in range(LEARN_STEPS):
        trainer.train_step()
        trainer.maybe_validate()
    yield trainer, start, run_dir
    trainer.close()


def read_lines(path: pathlib.Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Configuration


def test_config_defaults_are_valid():
    config = TrainerConfig.from_dict({})
    assert config.batch_size == 4
    assert config.holdout_every == 5
    assert config.max_map_drop == 0.0


@pytest.mark.parametrize('values, field', [
    ({'optimizer': 'lion'}, 'optimizer'),
    ({'learning_rate': 0.0}, 'learning_rate'),
    ({'batch_size': 0}, 'batch_size'),
    ({'batch_size': 2.5}, 'batch_size'),
    ({'max_map_drop': 1.5}, 'max_map_drop'),
    ({'lr_schedule': 'step'}, 'lr_schedule'),
    ({'scale_min': 1.2, 'scale_max': 1.1}, 'scale_min'),
    ({'colour_jitter': 0.1}, 'colour_jitter'),
])
def test_config_rejects_bad_value(values, field):
    with pytest.raises(ValueError, match=field):
        TrainerConfig.from_dict(values)


def test_config_rejects_bad_clipping():
    with pytest.raises(ValueError, match='rel_tol'):
        TrainerConfig.from_dict({'clipping': {'mode': 'unitwise', 'rel_tol': -1.0}})


def test_config_from_parameters_maps_names():
    config = config_from_parameters({
        'buffer_max_frames': 77, 'buffer_max_bytes': 1 << 24, 'clip_mode': 'norm',
        'clip_max_norm': 3.0, 'learning_rate': 0.01, 'cameras': ['front'], 'train_threads': 1})
    assert config.max_frames == 77
    assert config.max_bytes == 1 << 24
    assert config.clipping == {'mode': 'norm', 'max_norm': 3.0}
    assert config.learning_rate == 0.01


def test_yaml_defaults_match_config():
    """config/online_learning.yaml contains the TrainerConfig defaults for every trainer field."""
    import yaml
    path = pathlib.Path(__file__).resolve().parents[1] / 'config' / 'online_learning.yaml'
    parameters = yaml.safe_load(path.read_text())['online_learner_node']['ros__parameters']
    config = config_from_parameters(parameters)
    defaults = TrainerConfig()
    for name, value in defaults.to_dict().items():
        if name in ('checkpoint_dir', 'handover_dir'):
            continue
        if name == 'clipping':
            assert ClipConfig.from_dict(config.clipping) == ClipConfig.from_dict(value)
            continue
        assert getattr(config, name) == value, name


# ---------------------------------------------------------------------------------------------
# Buffers


def make_frame(index: int, side: int = 32) -> Frame:
    image = np.full((side, side, 3), index % 256, np.uint8)
    return Frame(image=image, boxes=np.array([[1, 1, 9, 9]], np.float32),
                 labels=np.zeros(1, np.int64), original_size=(side, side), stamp_ns=index)


def test_replay_buffer_bounded_by_frames():
    buffer = ReplayBuffer(max_frames=50, max_bytes=1 << 30, seed=1)
    for index in range(1000):
        buffer.add(make_frame(index))
    assert len(buffer) == 50
    stamps = sorted(frame.stamp_ns for frame in buffer.sample(50, np.random.default_rng(0)))
    # Reservoir sampling keeps old scenes alongside new ones.
    assert stamps[0] < 300
    assert stamps[-1] > 700
    assert buffer.seen == 1000


def test_replay_buffer_bounded_by_bytes():
    frame_bytes = make_frame(0).nbytes
    buffer = ReplayBuffer(max_frames=1000, max_bytes=frame_bytes * 10 + 5, seed=1)
    for index in range(100):
        buffer.add(make_frame(index))
    assert len(buffer) == 10
    assert buffer.nbytes <= frame_bytes * 10 + 5
    big = make_frame(0, side=64)
    for _ in range(20):
        buffer.add(big)
    assert buffer.nbytes <= frame_bytes * 10 + 5


def test_holdout_is_fifo_and_bounded():
    holdout = HoldoutSet(max_frames=3)
    for index in range(5):
        holdout.add(make_frame(index))
    assert [frame.stamp_ns for frame in holdout.frames()] == [2, 3, 4]
    assert holdout.version == 5


def test_holdout_frames_never_trained_on():
    config = TrainerConfig.from_dict({'holdout_every': 5, 'min_buffer_frames': 1})
    trainer = Trainer(config, ModelSpec(class_names=('vehicle',), input_size=64))
    places = [trainer.add_prepared(make_frame(index, side=64)) for index in range(1, 51)]
    assert places.count('holdout') == 10
    assert len(trainer.holdout) == 10
    held = {frame.stamp_ns for frame in trainer.holdout.frames()}
    trained = {frame.stamp_ns for frame in trainer.buffer.sample(40, np.random.default_rng(0))}
    assert held == {5, 10, 15, 20, 25, 30, 35, 40, 45, 50}
    assert not held & trained


def test_replayed_frames_keep_their_side():
    config = TrainerConfig.from_dict({'holdout_every': 5, 'min_buffer_frames': 1})
    trainer = Trainer(config, ModelSpec(class_names=('vehicle',), input_size=64))
    first = [trainer.add_prepared(make_frame(index, side=64)) for index in range(1, 8)]

    # A looping replay offers the same (camera, stamp) frames again.
    again = [trainer.add_prepared(make_frame(index, side=64)) for index in range(1, 8)]

    assert first.count('holdout') == 1
    assert again == ['duplicate'] * 7
    assert len(trainer.holdout) == 1
    assert len(trainer.buffer) == 6
    assert trainer.statistics()['duplicate_frames'] == 7
    held = {frame.stamp_ns for frame in trainer.holdout.frames()}
    trained = {frame.stamp_ns for frame in trainer.buffer.sample(20, np.random.default_rng(0))}
    assert not held & trained


def test_prepare_frame_scales_boxes(apollo):
    camera, stamp, image, boxes = apollo[0]
    frame, dropped = prepare_frame(image, boxes, np.zeros(len(boxes), np.int64), 320)
    assert frame.image.shape == (320, 320, 3)
    assert frame.image.dtype == np.uint8
    assert frame.original_size == (1920, 1080)
    assert dropped == 0
    np.testing.assert_allclose(frame.original_boxes(), boxes, rtol=1e-5)


def test_prepare_frame_drops_nonfinite_box(apollo):
    _, _, image, _ = apollo[0]
    boxes = np.array([[10, 10, 200, 200], [np.nan, 1, 5, 5]], np.float32)
    frame, dropped = prepare_frame(image, boxes, np.zeros(2, np.int64), 128)
    assert dropped == 1
    assert len(frame.boxes) == 1


def test_augmentation_moves_boxes_with_pixels():
    side = 96
    image = np.zeros((side, side, 3), np.uint8)
    image[20:50, 10:40] = 255  # a white box, xyxy (10, 20, 40, 50)
    frame = Frame(image=image, boxes=np.array([[10, 20, 40, 50]], np.float32),
                  labels=np.zeros(1, np.int64), original_size=(side, side))
    config = TrainerConfig.from_dict({'hflip_prob': 0.5, 'scale_min': 0.8, 'scale_max': 1.25})
    trainer = Trainer(config, ModelSpec(class_names=('vehicle',), input_size=side))
    flipped = 0
    for _ in range(40):
        tensor, boxes, labels = trainer._augment(frame)
        assert tensor.shape == (3, side, side)
        assert len(boxes) == len(labels) == 1
        x1, y1, x2, y2 = boxes[0]
        inner = tensor[0, int(y1) + 2:int(y2) - 2, int(x1) + 2:int(x2) - 2]
        assert inner.numel() > 0
        assert float(inner.mean()) > 0.9
        flipped += x1 > side / 2 - 10
    assert 0 < flipped < 40


# ---------------------------------------------------------------------------------------------
# Safety gates


def tiny_trainer(tmp_path, **settings) -> Trainer:
    values = {'hflip_prob': 0.0, 'scale_min': 1.0, 'scale_max': 1.0, 'min_buffer_frames': 1,
              'holdout_every': 0, 'snapshot_every': 2, 'max_consecutive_bad': 3,
              'handover_dir': str(tmp_path / 'models'), **settings}
    return Trainer(TrainerConfig.from_dict(values),
                   ModelSpec(class_names=('vehicle',), input_size=128), run_dir=str(tmp_path))


def real_frame(apollo, index: int, side: int = 128) -> Frame:
    _, stamp, image, boxes = apollo[index]
    return prepare_frame(image, boxes, np.zeros(len(boxes), np.int64), side,
                         stamp_ns=stamp)[0]


def weights_of(trainer: Trainer):
    return {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}


def test_nan_box_skips_step_and_rolls_back(apollo, tmp_path):
    trainer = tiny_trainer(tmp_path)
    trainer.add_prepared(real_frame(apollo, 0))
    trainer.add_prepared(real_frame(apollo, 1))
    for _ in range(2):
        assert trainer.train_step()['skipped'] == ''
    good = weights_of(trainer)

    # A NaN box coordinate that slipped past validation, straight into the buffer.
    frame = real_frame(apollo, 2)
    frame.boxes[0, 2] = np.nan
    trainer.buffer = ReplayBuffer(10, 1 << 30)
    trainer.add_prepared(frame)
    records = [trainer.train_step() for _ in range(3)]
    assert [record['skipped'] for record in records] == ['nonfinite_loss'] * 3
    assert [record['rollback'] for record in records] == [False, False, True]
    assert trainer.counters['skipped_nonfinite_loss'] == 3
    assert trainer.counters['rollbacks'] == 1
    for name, tensor in trainer.model.state_dict().items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
            assert torch.equal(tensor, good[name]), name
    assert not list((tmp_path / 'models').glob('*.safetensors'))

    lines = read_lines(tmp_path / 'train_log.jsonl')
    assert len(lines) == 5
    assert lines[-1]['skipped'] == 'nonfinite_loss'
    assert lines[-1]['loss'] is None


def test_nan_activation_skips_step(apollo, tmp_path):
    trainer = tiny_trainer(tmp_path, max_consecutive_bad=5)
    trainer.add_prepared(real_frame(apollo, 0))
    before = weights_of(trainer)

    def poison(module, inputs, output):
        return {key: value * float('nan') for key, value in output.items()}

    handle = trainer.model.head.register_forward_hook(poison)
    record = trainer.train_step()
    handle.remove()
    assert record['skipped'] == 'nonfinite_loss'
    assert record['updates'] == 0
    for name, tensor in trainer.model.state_dict().items():
        if tensor.is_floating_point() and 'running' not in name:
            assert torch.equal(tensor, before[name]), name
    assert trainer.train_step()['skipped'] == ''


def test_loss_spikes_counted_then_rolled_back(apollo, tmp_path):
    trainer = tiny_trainer(tmp_path, spike_window=10, snapshot_every=10)
    for index in range(4):
        trainer.add_prepared(real_frame(apollo, index))
    for _ in range(10):
        assert not trainer.train_step()['spike']
    snapshot = weights_of(trainer)

    def amplify(module, inputs, output):
        return {key: value * 1e4 for key, value in output.items()}

    handle = trainer.model.head.register_forward_hook(amplify)
    records = [trainer.train_step() for _ in range(3)]
    handle.remove()
    assert [record['spike'] for record in records] == [True, True, True]
    assert trainer.counters['spikes'] == 3
    assert records[-1]['rollback']
    for name, tensor in trainer.model.state_dict().items():
        if tensor.is_floating_point() and 'running' not in name:
            assert torch.equal(tensor, snapshot[name]), name


def test_forward_error_skips_step(apollo, tmp_path):
    trainer = tiny_trainer(tmp_path)
    frame = real_frame(apollo, 0)
    frame.boxes[0] = [50, 50, 40, 60]  # x2 < x1: torchvision rejects degenerate boxes
    trainer.add_prepared(frame)
    record = trainer.train_step()
    assert record['skipped'] == 'forward_error'
    assert trainer.counters['skipped_forward_error'] == 1


# ---------------------------------------------------------------------------------------------
# Learning on real frames and the hand-over gate


def test_learning_raises_holdout_map(learned):
    trainer, start, run_dir = learned
    validations = read_lines(run_dir / 'validation_log.jsonl')
    final = validations[-1]
    print(f'hold-out mAP@0.5 start {start["map50"]:.3f}, after {LEARN_STEPS} steps '
          f'{final["map50"]:.3f} (mAP {final["map"]:.3f})')
    assert start['map50'] < 0.05
    assert final['step'] == LEARN_STEPS
    assert final['map50'] >= 0.3
    assert final['holdout_frames'] == 8


def test_training_log_has_every_statistic(learned):
    _, _, run_dir = learned
    lines = read_lines(run_dir / 'train_log.jsonl')
    assert len(lines) == LEARN_STEPS
    for key in ('step', 'wall_time', 'loss', 'loss_bbox_regression', 'loss_classification',
                'lr', 'grad_norm_before', 'grad_norm_after', 'threshold', 'clipped',
                'clip_fraction', 'nonfinite_count', 'skipped', 'spike', 'step_time_s',
                'samples_per_s'):
        assert key in lines[-1], key
    assert lines[-1]['loss'] < lines[0]['loss']
    assert lines[0]['grad_norm_after'] <= lines[0]['grad_norm_before']


def test_accepted_candidates_are_handed_over(learned):
    trainer, _, run_dir = learned
    handed = sorted((run_dir / 'models').glob(f'{HANDOVER_PREFIX}*.safetensors'))
    assert handed
    assert not list((run_dir / 'models').glob('*.tmp'))
    state_dict, spec, metadata = load_checkpoint(handed[-1], trainer.spec)
    assert spec.version == trainer.deployed_version
    assert spec.score == pytest.approx(trainer.deployed_score)
    assert str(handed[-1]) == trainer.deployed_path


def test_gate_rejects_worse_candidate(learned):
    trainer, _, run_dir = learned
    deployed_version = trainer.deployed_version
    handed_before = sorted((run_dir / 'models').glob('*.safetensors'))
    kept = weights_of(trainer)
    try:
        # Random weights as the candidate: clearly worse on the hold-out set.
        trainer.model.load_state_dict(build_model(trainer.spec).state_dict())
        trainer.step += 1
        record = trainer.validate()
    finally:
        trainer.model.load_state_dict(kept)
    assert record['map50'] < record['deployed_map50']
    assert not record['accepted']
    assert record['handed_over'] is None
    assert trainer.deployed_version == deployed_version
    assert sorted((run_dir / 'models').glob('*.safetensors')) == handed_before
    assert trainer.counters['rejected'] >= 1


def test_gate_allowed_drop_accepts(learned):
    trainer, _, run_dir = learned
    kept = weights_of(trainer)
    old_drop = trainer.config.max_map_drop
    try:
        trainer.model.load_state_dict(build_model(trainer.spec).state_dict())
        trainer.config.max_map_drop = 1.0
        trainer.step += 1
        record = trainer.validate()
    finally:
        trainer.config.max_map_drop = old_drop
        trainer.model.load_state_dict(kept)
    assert record['accepted']
    assert pathlib.Path(record['handed_over']).is_file()
