"""Offline work on labeled bags: ``gradclip-ros train`` and ``gradclip-ros eval``.

Both read the labeled frames of a bag through ``gradclip_ros.bags.iter_labeled_frames``
(images on ``/<camera>/image_raw[/compressed]`` with a ``/<camera>/labels``
Detection2DArray of the same header stamp) and need no ROS install.

- ``train``: ``add_train_arguments(parser)`` and ``train_main(args)``.
- ``eval``: ``add_eval_arguments(parser)`` and ``eval_main(args)``: runs the perception node's
  inference code (``Detector.predict``) on every labeled frame and prints COCO mAP and speed.
"""

import argparse
import collections
import json
import pathlib
import sys
import time
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from gradclip_ros import bags
from gradclip_ros.checkpoints import CheckpointError, load_checkpoint
from gradclip_ros.metrics import mean_average_precision
from gradclip_ros.model import (
    ARCHITECTURES, DEFAULT_ARCHITECTURE, DEFAULT_CLASSES, Detections, Detector,
    InferenceSettings, ModelSpec)


# =============================================================================================
# eval: add_eval_arguments, eval_main
# =============================================================================================


class EvalError(RuntimeError):
    """An evaluation that cannot run; the message names the file or option."""


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` options to ``parser``."""
    parser.add_argument('--bag', required=True,
                        help='labeled bag (rosbag2 folder, .mcap, .db3 or ROS 1 .bag)')
    parser.add_argument('--checkpoint', metavar='FILE',
                        help='safetensors checkpoint to evaluate; without it a randomly '
                        'initialised model is evaluated (with a warning)')
    parser.add_argument('--cameras', nargs='+', metavar='NAME',
                        help='cameras to evaluate (default: every camera of the bag)')
    parser.add_argument('--score-threshold', type=float, default=0.05,
                        help='drop detections below this score before computing mAP, in '
                        '[0, 1] (default: 0.05)')
    parser.add_argument('--batch-size', type=int, default=4,
                        help='images per inference batch (default: 4)')
    parser.add_argument('--device', default='auto',
                        help="inference device: 'auto', 'cpu', 'cuda' or 'cuda:N' "
                        '(default: auto)')
    parser.add_argument('--architecture', default=DEFAULT_ARCHITECTURE,
                        choices=sorted(ARCHITECTURES),
                        help='architecture of the random model when there is no --checkpoint')
    parser.add_argument('--classes', nargs='+', metavar='NAME',
                        help='class names of the random model when there is no --checkpoint '
                        f'(default: {" ".join(DEFAULT_CLASSES)})')
    parser.add_argument('--max-frames', type=int, default=0, metavar='N',
                        help='stop after N labeled frames; 0 evaluates all (default: 0)')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    parser.add_argument('--json', action='store_true',
                        help='print the result as one JSON object')


def _load_detector(args) -> Detector:
    if not 0.0 <= args.score_threshold <= 1.0:
        raise EvalError(f'--score-threshold must be in [0, 1], got {args.score_threshold}')
    if args.batch_size < 1:
        raise EvalError(f'--batch-size must be >= 1, got {args.batch_size}')
    settings = InferenceSettings(score_threshold=args.score_threshold)
    try:
        if args.checkpoint:
            state_dict, spec, _ = load_checkpoint(args.checkpoint)
            return Detector(spec, args.device, settings=settings, state_dict=state_dict)
        print('warning: no --checkpoint given; evaluating a randomly initialised '
              f'{args.architecture}, so the scores only exercise the pipeline', file=sys.stderr)
        spec = ModelSpec(architecture=args.architecture,
                         class_names=tuple(args.classes or DEFAULT_CLASSES))
        return Detector(spec, args.device, settings=settings)
    except CheckpointError as error:
        raise EvalError(str(error)) from error
    except ValueError as error:
        raise EvalError(f'cannot build the detector: {error}') from error


def evaluate(detector: Detector, bag_path, cameras: Optional[Sequence[str]] = None,
             batch_size: int = 4, max_frames: int = 0, progress: bool = True) -> dict:
    """Run ``detector`` over every labeled frame of a bag and compute COCO mAP.

    Returns a dict with ``map50``, ``map`` (mAP@[.5:.95]), ``per_class`` (AP@[.5:.95] per
    class with ground truth), ``frames``, ``boxes`` (ground truth), ``detections``, ``fps``
    (frames per second of ``Detector.predict`` alone, after one untimed warm-up call on the
    first image), ``wall_fps`` (everything, including bag reading, decoding and the warm-up),
    ``seconds`` and ``skipped`` (counters of ``iter_labeled_frames``).
    Raises EvalError when the bag has no labeled frame.
    """
    class_names = detector.spec.class_names
    predictions: List[Detections] = []
    targets = []
    counters: collections.Counter = collections.Counter()
    batch = []
    predict_seconds = 0.0
    started = time.perf_counter()

    def flush():
        nonlocal predict_seconds
        if not predictions:
            # The first call allocates buffers and picks kernels; keep that out of ``fps``.
            detector.predict([batch[0].image])
        before = time.perf_counter()
        predictions.extend(detector.predict([frame.image for frame in batch]))
        predict_seconds += time.perf_counter() - before
        targets.extend((frame.boxes, frame.labels) for frame in batch)
        batch.clear()

    frames = bags.iter_labeled_frames(bag_path, class_names, cameras, counters=counters)
    with tqdm(frames, unit='frame', desc='eval', disable=not progress) as bar:
        for frame in bar:
            batch.append(frame)
            if len(batch) >= batch_size:
                flush()
            if max_frames and len(targets) + len(batch) >= max_frames:
                break
    if batch:
        flush()
    frames.close()
    if not targets:
        raise EvalError(f'no labeled frames in {bag_path} for the classes '
                        f'{list(class_names)} (skipped: {dict(counters)}); a labeled frame '
                        'needs /<camera>/labels with the same header stamp as the image')

    scores = mean_average_precision(predictions, targets, class_names)
    seconds = time.perf_counter() - started
    return {
        'map50': scores['map50'],
        'map': scores['map'],
        'per_class': scores['per_class'],
        'frames': len(targets),
        'boxes': int(sum(len(labels) for _, labels in targets)),
        'detections': int(sum(len(p) for p in predictions)),
        'fps': len(targets) / predict_seconds if predict_seconds > 0 else None,
        'wall_fps': len(targets) / seconds if seconds > 0 else None,
        'seconds': seconds,
        'skipped': {key: value for key, value in sorted(counters.items()) if value},
    }


def format_eval(result: dict) -> str:
    """Format an ``evaluate`` result as a small table."""
    lines = [
        f'model      {result["model"]}',
        f'bag        {result["bag"]} ({result["frames"]} frames, {result["boxes"]} boxes)',
        f'mAP@0.5        {result["map50"]:.4f}',
        f'mAP@[.5:.95]   {result["map"]:.4f}',
    ]
    for name, value in result['per_class'].items():
        lines.append(f'  AP {name:<12} {value:.4f}')
    lines.append(f'speed      {result["fps"]:.1f} frames/s inference, '
                 f'{result["wall_fps"]:.1f} frames/s with bag reading ({result["device"]})')
    if result['skipped']:
        lines.append('skipped    ' + ', '.join(f'{k}={v}' for k, v in result['skipped'].items()))
    return '\n'.join(lines)


def eval_main(args) -> int:
    """Run ``gradclip-ros eval``; returns 0, 1 for invalid options or checkpoint, 2 for a bag."""
    try:
        detector = _load_detector(args)
        result = evaluate(detector, args.bag, args.cameras, args.batch_size, args.max_frames,
                          progress=not args.no_progress)
    except EvalError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    except bags.BagError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    result.update({
        'bag': str(args.bag),
        'checkpoint': args.checkpoint,
        'model': f'{detector.spec.architecture} {detector.spec.version}',
        'device': str(detector.device),
        'torch_threads': torch.get_num_threads(),
        'score_threshold': args.score_threshold,
    })
    result = {key: _plain(value) for key, value in result.items()}
    print(json.dumps(result) if args.json else format_eval(result))
    return 0


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


# =============================================================================================
# train: add_train_arguments, train_main
# =============================================================================================

DEFAULT_LEARNING_YAML = pathlib.Path(__file__).resolve().parents[1] / 'config' / \
    'online_learning.yaml'
LEARNER_SECTION = 'online_learner_node'


class TrainError(RuntimeError):
    """An offline training run that cannot start; the message names the file or option."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--bag', required=True, help='labeled bag (rosbag2 folder or ROS 1)')
    parser.add_argument(
        '--config', default=str(DEFAULT_LEARNING_YAML),
        help='ROS 2 parameter YAML; its online_learner_node section sets the training '
             '(default: config/online_learning.yaml)')
    parser.add_argument('--steps', type=int, default=300, help='training steps (default 300)')
    parser.add_argument(
        '--run-dir', help='folder for logs, plots, checkpoints and accepted models '
                          '(default: runs/train-<date>-<time>)')
    parser.add_argument('--cameras', nargs='+', help='cameras to read (default: all)')
    parser.add_argument('--checkpoint', help='starting weights (overrides the YAML)')
    parser.add_argument('--device', help="'cpu', 'cuda', 'cuda:N' or 'auto' (overrides the YAML)")
    parser.add_argument('--no-resume', action='store_true',
                        help='ignore checkpoints already in RUN_DIR/checkpoints')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')


def load_learner_parameters(path) -> dict:
    """Return the ``online_learner_node: ros__parameters:`` mapping of a YAML file."""
    import yaml
    path = pathlib.Path(path)
    if not path.is_file():
        raise TrainError(f'config file not found: {path}')
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TrainError(f'{path}: invalid YAML: {error}') from error
    try:
        parameters = data[LEARNER_SECTION]['ros__parameters']
    except (KeyError, TypeError) as error:
        raise TrainError(
            f'{path}: no "{LEARNER_SECTION}: ros__parameters:" section') from error
    if not isinstance(parameters, dict):
        raise TrainError(f'{path}: {LEARNER_SECTION}.ros__parameters is not a mapping')
    return dict(parameters)


def _init_distributed(device: str) -> str:
    """Join the torchrun process group when WORLD_SIZE > 1; returns this rank's device."""
    import os

    import torch.distributed as dist
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1 or dist.is_initialized():
        return device
    use_cuda = device.startswith('cuda') or (device == 'auto' and torch.cuda.is_available())
    dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    if use_cuda:
        local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        torch.cuda.set_device(local_rank)
        return f'cuda:{local_rank}'
    return 'cpu'


def _build_trainer(args, parameters: dict, run_dir: pathlib.Path):
    from gradclip_ros.training import config_from_parameters, Trainer
    if args.device:
        parameters['device'] = args.device
    parameters['device'] = _init_distributed(str(parameters.get('device', 'cpu')))
    parameters['checkpoint_dir'] = str(run_dir / 'checkpoints')
    parameters['handover_dir'] = str(run_dir / 'models')
    config = config_from_parameters(parameters)
    spec = ModelSpec(
        architecture=parameters.get('model', DEFAULT_ARCHITECTURE),
        class_names=tuple(parameters.get('class_names', DEFAULT_CLASSES)),
        input_size=int(parameters.get('input_size', 320)))
    state_dict = None
    checkpoint = args.checkpoint or parameters.get('checkpoint') or ''
    if checkpoint:
        state_dict, spec, _ = load_checkpoint(checkpoint, spec)
    return Trainer(config, spec, state_dict=state_dict, run_dir=str(run_dir),
                   resume=not args.no_resume)


def train_main(args) -> int:
    """Fine-tune on a bag's labeled frames with the online trainer; returns the exit code."""
    from gradclip_ros import report
    if args.steps < 1:
        print(f'gradclip-ros train: --steps must be >= 1, got {args.steps}', file=sys.stderr)
        return 2
    run_dir = pathlib.Path(args.run_dir or time.strftime('runs/train-%Y%m%d-%H%M%S'))
    try:
        parameters = load_learner_parameters(args.config)
        trainer = _build_trainer(args, parameters, run_dir)
    except (TrainError, CheckpointError, ValueError) as error:
        print(f'gradclip-ros train: {error}', file=sys.stderr)
        return 2
    main_rank = trainer.is_main
    say = print if main_rank else (lambda *a, **k: None)

    # The whole bag goes through the buffers first; beyond max_frames the reservoir decides.
    counters = collections.Counter()
    places = collections.Counter()
    try:
        frames = bags.iter_labeled_frames(args.bag, trainer.spec.class_names, args.cameras,
                                          counters=counters)
        for frame in tqdm(frames, desc='reading bag', unit='frame',
                          disable=args.no_progress or not main_rank):
            places[trainer.add_frame(frame.image, frame.boxes, frame.labels, frame.camera,
                                     frame.stamp_ns)] += 1
    except bags.BagError as error:
        print(f'gradclip-ros train: {error}', file=sys.stderr)
        return 2
    skipped = {key: value for key, value in counters.items() if value}
    say(f'read {places["train"]} training and {places["holdout"]} hold-out frames'
        + (f'; skipped {skipped}' if skipped else ''))
    if not trainer.ready():
        print(f'gradclip-ros train: {args.bag} gave {places["train"]} training frames, fewer '
              f'than min_buffer_frames={trainer.config.min_buffer_frames}', file=sys.stderr)
        return 1

    start_step = trainer.step
    progress = tqdm(total=args.steps, desc='training', unit='step',
                    disable=args.no_progress or not main_rank)
    try:
        for _ in range(args.steps):
            record = trainer.train_step()
            validation = trainer.maybe_validate()
            postfix = {'loss': record['loss']}
            if trainer.last_validation:
                postfix['map50'] = round(trainer.last_validation['map50'], 3)
            progress.set_postfix(postfix, refresh=False)
            progress.update()
            if validation is not None and validation['accepted']:
                progress.write(f'step {validation["step"]}: hold-out mAP@0.5 '
                               f'{validation["map50"]:.3f} accepted')
        if trainer.last_validation is None or trainer.last_validation['step'] != trainer.step:
            trainer.validate()
    except KeyboardInterrupt:
        say('interrupted; writing a checkpoint')
    finally:
        progress.close()
        trainer.save_checkpoint()
        trainer.close()

    if not main_rank:
        return 0
    statistics = trainer.statistics()
    summary = {
        'steps': trainer.step - start_step,
        'step': trainer.step,
        'holdout_map50': statistics['holdout_map50'],
        'holdout_map': statistics['holdout_map'],
        'deployed_version': statistics['deployed_version'],
        'deployed_map50': statistics['deployed_map50'],
        'deployed_path': trainer.deployed_path,
        'skipped_steps': sum(v for k, v in statistics.items() if k.startswith('skipped_')),
        'rollbacks': statistics.get('rollbacks', 0),
        'run_dir': str(run_dir),
    }
    try:
        report.make_report(run_dir)
    except (report.ReportError, OSError) as error:
        print(f'gradclip-ros train: no plots: {error}', file=sys.stderr)
    print(json.dumps(summary, default=_plain))
    return 0
