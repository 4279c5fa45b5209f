"""The online trainer: replay buffer in, clipped optimizer steps, gated hand-over out.

ROS-free. ``Trainer`` owns a training copy of the detector, the optimizer, the LR schedule, a
``GradientClipper``, the replay buffer and the hold-out set. The learner node and
``gradclip-ros train`` both drive it with ``add_frame``, ``train_step`` and
``maybe_validate``.

Safety gates, in the order a step meets them:

1. A forward pass that raises, or a non-finite loss, skips the step (no optimizer step).
2. The clipper's ``skip_step`` (non-finite gradients) skips the step.
3. A loss above ``loss_spike_factor`` times the running median of recent losses is counted
   as a spike. The step is still applied, since the clipped update is bounded.
4. After ``max_consecutive_bad`` bad steps (1-3) in a row, the trainer restores the last
   in-memory snapshot of weights, optimizer, LR schedule and clipper state. A snapshot is
   taken at start, every ``snapshot_every`` good steps and after each accepted validation.
5. Every ``validate_every`` steps, the candidate weights and the deployed weights are both
   scored on the current hold-out set (the set changes as frames arrive, so an old score of
   the deployed weights would not be comparable). The candidate is handed over only when its
   mAP@0.5 is at most ``max_map_drop`` below the deployed weights' mAP@0.5.

Under ``torch.distributed`` (world size > 1) the model is wrapped in
DistributedDataParallel. DDP averages the gradients during backward, so every rank clips the
same gradients the same way. Loss checks use the loss averaged over ranks, so every rank skips
the same steps. Only rank 0 validates, writes logs and writes checkpoints.
"""

import collections
import copy
import json
import logging
import math
import pathlib
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.distributed as dist

from gradclip_ros.checkpoint_manager import CheckpointManager, version_name
from gradclip_ros.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from gradclip_ros.clipping import ClipConfig, GradientClipper
from gradclip_ros.metrics import mean_average_precision
from gradclip_ros.model import build_model, Detections, images_to_batch, ModelSpec, resolve_device
from gradclip_ros.replay_buffer import Frame, HoldoutSet, prepare_frame, ReplayBuffer
from gradclip_ros.trainer_config import TrainerConfig

LOGGER = logging.getLogger(__name__)

HANDOVER_PREFIX = 'learner-'
PAD_VALUE = 114  # grey used where scale jitter shrinks the image
EVAL_BATCH = 8  # hold-out frames per inference batch during validation
# (camera, stamp) identities remembered to keep replayed frames on their first side; about
# 100 bytes each, and far more than the buffers hold.
MAX_REMEMBERED_FRAMES = 100_000


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


class JsonLinesLog:
    """Append-only JSON-lines file; each record is flushed as soon as it is written."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, 'a', encoding='utf-8')

    def write(self, record: Dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, allow_nan=False) + '\n')
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class Trainer:
    """Fine-tune a detector online from labeled frames; see the module docstring.

    ``state_dict`` gives the starting weights (random init when None); they are also the
    deployed weights until the first hand-over. With ``config.checkpoint_dir`` set and
    ``resume`` True, training resumes from the newest valid checkpoint there. ``run_dir``
    receives ``train_log.jsonl`` and ``validation_log.jsonl`` (rank 0 only).
    """

    def __init__(self, config: TrainerConfig, spec: ModelSpec,
                 state_dict: Optional[Dict[str, torch.Tensor]] = None,
                 run_dir: Optional[str] = None, resume: bool = True):
        self.config = config
        self.spec = spec
        self.device = resolve_device(config.device)
        self.distributed = dist.is_available() and dist.is_initialized() and \
            dist.get_world_size() > 1
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.is_main = self.rank == 0

        # Same seed on every rank: identical initial weights (DDP also broadcasts them).
        torch.manual_seed(config.seed)
        self.model = build_model(spec)
        if state_dict is not None:
            self.model.load_state_dict(state_dict, strict=True)
        if config.bn_momentum > 0.0:
            for module in self.model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.momentum = config.bn_momentum
        self.model.to(self.device).train()
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.clip_config = ClipConfig.from_dict(dict(config.clipping))
        self.clipper = GradientClipper(self.model.named_parameters(), self.clip_config)

        self.buffer = ReplayBuffer(config.max_frames, config.max_bytes, seed=config.seed)
        self.holdout = HoldoutSet(config.holdout_max)
        # Different batches per rank, so one DDP step trains on world_size * batch_size frames.
        self.rng = np.random.default_rng(config.seed + 7919 * self.rank)
        self.counters: collections.Counter = collections.Counter()
        self.step = 0
        self.updates = 0
        self.frames_offered = 0
        self._frame_sides: 'collections.OrderedDict[Tuple[str, int], str]' = (
            collections.OrderedDict())
        self._losses: collections.deque = collections.deque(maxlen=config.spike_window)
        self._consecutive_bad = 0
        self._good_steps = 0
        self._validated_at = -1

        # Deployed weights: what the perception node runs now, kept for the hand-over gate.
        self.deployed_state = self._cpu_copy(self.model.state_dict())
        self.deployed_version = spec.version
        self.deployed_path: Optional[str] = None
        self.deployed_score: Optional[float] = spec.score
        self._deployed_cache: Optional[Tuple[int, Dict[str, float]]] = None
        self._eval_model: Optional[torch.nn.Module] = None
        self.last_validation: Optional[Dict[str, Any]] = None
        self.resumed_from: Optional[str] = None

        self.checkpoints = None
        if config.checkpoint_dir:
            self.checkpoints = CheckpointManager(config.checkpoint_dir, config.keep_last)
            if resume:
                self._resume()
        self._snapshot = self._take_snapshot()

        self.ddp_model: torch.nn.Module = self.model
        if self.distributed:
            device_ids = [self.device.index] if self.device.type == 'cuda' else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=device_ids)

        self.train_log = self.validation_log = None
        if run_dir and self.is_main:
            self.train_log = JsonLinesLog(pathlib.Path(run_dir) / 'train_log.jsonl')
            self.validation_log = JsonLinesLog(pathlib.Path(run_dir) / 'validation_log.jsonl')

    # -----------------------------------------------------------------------------------------
    # Set-up helpers

    def _build_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        if config.optimizer == 'sgd':
            return torch.optim.SGD(
                self.model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                weight_decay=config.weight_decay)
        return torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, betas=(config.momentum, 0.999),
            weight_decay=config.weight_decay)

    def _lr_factor(self, update: int) -> float:
        """Return the LR multiplier after ``update`` optimizer steps (LambdaLR's epoch)."""
        config = self.config
        if config.warmup_steps and update < config.warmup_steps:
            return (update + 1) / config.warmup_steps
        if config.lr_schedule == 'constant':
            return 1.0
        span = max(1, config.schedule_steps - config.warmup_steps)
        progress = min(1.0, (update - config.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return config.final_lr_ratio + (1.0 - config.final_lr_ratio) * cosine

    @staticmethod
    def _cpu_copy(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {name: tensor.detach().to('cpu', copy=True) for name, tensor in state_dict.items()}

    def _take_snapshot(self) -> Dict[str, Any]:
        return {
            'model': copy.deepcopy(self.model.state_dict()),
            'optimizer': copy.deepcopy(self.optimizer.state_dict()),
            'scheduler': copy.deepcopy(self.scheduler.state_dict()),
            'clipper': copy.deepcopy(self.clipper.state_dict()),
            'updates': self.updates,
        }

    def _restore_snapshot(self) -> None:
        snapshot = self._snapshot
        self.model.load_state_dict(snapshot['model'])
        self.optimizer.load_state_dict(copy.deepcopy(snapshot['optimizer']))
        self.scheduler.load_state_dict(copy.deepcopy(snapshot['scheduler']))
        self.clipper.load_state_dict(copy.deepcopy(snapshot['clipper']))
        self.updates = snapshot['updates']

    # -----------------------------------------------------------------------------------------
    # Frames

    def add_frame(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                  camera: str = '', stamp_ns: int = 0) -> str:
        """Store a labeled frame; returns 'train' or 'holdout' (where it went).

        ``image`` RGB uint8 [H, W, 3]; ``boxes`` float32 [N, 4] xyxy pixels of ``image``;
        ``labels`` int64 [N] 0-based into the spec's class names. Every ``holdout_every``-th
        frame goes to the hold-out set and is never trained on.
        """
        frame, dropped = prepare_frame(
            image, boxes, labels, self.spec.input_size, camera=camera, stamp_ns=stamp_ns)
        if dropped:
            self.counters['dropped_boxes'] += dropped
        return self.add_prepared(frame)

    def add_prepared(self, frame: Frame) -> str:
        """Store a frame already at the training size (see ``replay_buffer.prepare_frame``)."""
        if frame.image.shape[:2] != (self.spec.input_size, self.spec.input_size):
            raise ValueError(
                f'frame is {frame.image.shape[1]}x{frame.image.shape[0]}, expected '
                f'{self.spec.input_size}x{self.spec.input_size}; use prepare_frame first')
        if len(frame.labels) and (frame.labels.min() < 0 or
                                  frame.labels.max() >= len(self.spec.class_names)):
            raise ValueError(
                f'label indices {frame.labels.tolist()} outside [0, '
                f'{len(self.spec.class_names) - 1}] for classes {self.spec.class_names}')
        # A replayed bag shows the same frames again on every loop. Each (camera, stamp)
        # keeps the side it got first, so a hold-out frame is never trained on later, and a
        # repeat is not stored twice. Frames without a stamp are always new.
        key = (frame.camera, frame.stamp_ns) if frame.stamp_ns else None
        if key is not None and key in self._frame_sides:
            self.counters['duplicate_frames'] += 1
            return 'duplicate'

        self.frames_offered += 1
        every = self.config.holdout_every
        side = 'holdout' if every and self.frames_offered % every == 0 else 'train'
        if side == 'holdout':
            self.holdout.add(frame)
        else:
            self.buffer.add(frame)
        if key is not None:
            self._frame_sides[key] = side
            if len(self._frame_sides) > MAX_REMEMBERED_FRAMES:
                self._frame_sides.popitem(last=False)
        return side

    def ready(self) -> bool:
        """Return True once the buffer contains ``min_buffer_frames`` frames."""
        return len(self.buffer) >= self.config.min_buffer_frames

    def _augment(self, frame: Frame) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Random flip and scale jitter; returns image [3, S, S] float in [0, 1], boxes, labels.

        Boxes stay float32 [N, 4] xyxy pixels of the augmented image; boxes cut to less than
        2 px by the crop are dropped with their labels.
        """
        config = self.config
        side = self.spec.input_size
        image = frame.image
        boxes = frame.boxes.copy()
        labels = frame.labels

        if config.hflip_prob > 0.0 and self.rng.random() < config.hflip_prob:
            image = image[:, ::-1]
            boxes[:, [0, 2]] = side - boxes[:, [2, 0]]

        if config.scale_max > config.scale_min:
            scale = float(self.rng.uniform(config.scale_min, config.scale_max))
            size = max(8, int(round(side * scale)))
            resized = cv2.resize(np.ascontiguousarray(image), (size, size),
                                 interpolation=cv2.INTER_LINEAR)
            boxes = boxes * (size / side)
            if size >= side:
                offset_x, offset_y = self.rng.integers(0, size - side + 1, size=2)
                image = resized[offset_y:offset_y + side, offset_x:offset_x + side]
                boxes = boxes - np.array([offset_x, offset_y] * 2, np.float32)
            else:
                offset_x, offset_y = self.rng.integers(0, side - size + 1, size=2)
                image = np.full((side, side, 3), PAD_VALUE, np.uint8)
                image[offset_y:offset_y + size, offset_x:offset_x + size] = resized
                boxes = boxes + np.array([offset_x, offset_y] * 2, np.float32)
            boxes = np.clip(boxes, 0.0, float(side)).astype(np.float32)
            keep = (boxes[:, 2] - boxes[:, 0] >= 2.0) & (boxes[:, 3] - boxes[:, 1] >= 2.0)
            boxes, labels = boxes[keep], labels[keep]

        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return tensor.to(self.device).float().div_(255.0), boxes, labels

    def _make_batch(self, frames: Sequence[Frame]
                    ) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
        images, targets = [], []
        for frame in frames:
            image, boxes, labels = self._augment(frame)
            images.append(image)
            # torchvision reserves label 0 for the background class.
            targets.append({
                'boxes': torch.from_numpy(boxes).to(self.device),
                'labels': torch.from_numpy(labels + 1).to(self.device),
            })
        return images, targets

    # -----------------------------------------------------------------------------------------
    # Training step

    def train_step(self) -> Optional[Dict[str, Any]]:
        """Run one step on a batch from the replay buffer; returns its record.

        Returns None (and does nothing) while the buffer contains fewer than
        ``min_buffer_frames`` frames. Under DDP every rank must call it the same number of
        times, so ranks must receive their frames in the same way.
        """
        if not self.ready():
            return None
        start = time.perf_counter()
        self.step += 1
        lr = self.optimizer.param_groups[0]['lr']
        frames = self.buffer.sample(self.config.batch_size, self.rng)
        images, targets = self._make_batch(frames)
        self.optimizer.zero_grad(set_to_none=True)

        skipped = ''
        spike = False
        loss_parts: Dict[str, float] = {}
        try:
            loss_dict = self.ddp_model(images, targets)
        except (RuntimeError, ValueError, AssertionError) as error:
            if self.distributed:
                raise  # other ranks are waiting in collectives; cannot skip alone
            LOGGER.warning('training step %d: forward pass failed, step skipped: %s',
                           self.step, error)
            loss_dict = None
            skipped = 'forward_error'

        loss_value = float('nan')
        if loss_dict is not None:
            loss = sum(loss_dict.values())
            for key, value in loss_dict.items():
                name = key if key.startswith('loss_') else f'loss_{key}'
                loss_parts[name] = _finite_or_none(float(value.detach()))
            loss_value, finite = self._reduce_loss(loss.detach())
            if not finite:
                skipped = 'nonfinite_loss'
                if self.distributed:
                    # DDP expects a backward after each forward; the gradients are discarded.
                    (loss * 0.0).backward()
            else:
                spike = self._is_spike(loss_value)
                loss.backward()

        stats_dict: Dict[str, Any] = {}
        clip_time = 0.0
        if not skipped:
            clip_start = time.perf_counter()
            stats = self.clipper.clip()
            clip_time = time.perf_counter() - clip_start
            stats_dict = stats.as_dict()
            if stats.skip_step:
                skipped = 'nonfinite_grad'
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.counters[f'skipped_{skipped}'] += 1
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.updates += 1
        if spike:
            self.counters['spikes'] += 1
        elif not skipped:
            self._losses.append(loss_value)

        rollback = self._account(bad=bool(skipped) or spike)
        step_time = time.perf_counter() - start
        self.counters['steps'] += 1
        self.counters['samples_trained'] += len(frames) * self.world_size

        record = {
            'step': self.step,
            'wall_time': time.time(),
            'loss': _finite_or_none(loss_value),
            **loss_parts,
            'lr': lr,
            'grad_norm_before': stats_dict.get('norm_before'),
            'grad_norm_after': stats_dict.get('norm_after'),
            'threshold': stats_dict.get('threshold'),
            'clipped': bool(stats_dict.get('clipped', False)),
            'clip_fraction': stats_dict.get('clip_fraction'),
            'clip_rate': stats_dict.get('clip_rate'),
            'nonfinite_count': stats_dict.get('nonfinite_count', 0),
            'skipped': skipped,
            'spike': spike,
            'rollback': rollback,
            'updates': self.updates,
            'batch_size': len(frames) * self.world_size,
            'step_time_s': step_time,
            'clip_time_s': clip_time,
            'samples_per_s': len(frames) * self.world_size / step_time,
            'buffer_frames': len(self.buffer),
            'holdout_frames': len(self.holdout),
        }
        record = {key: self._plain(value) for key, value in record.items()}
        if self.train_log is not None:
            self.train_log.write(record)
        return record

    @staticmethod
    def _plain(value):
        if isinstance(value, float):
            return _finite_or_none(value)
        if isinstance(value, (np.floating, np.integer, np.bool_)):
            return value.item()
        if isinstance(value, torch.Tensor):
            return _finite_or_none(float(value)) if value.is_floating_point() else value.item()
        return value

    def _reduce_loss(self, loss: torch.Tensor) -> Tuple[float, bool]:
        """Return (loss averaged over ranks, whether it is finite on every rank)."""
        finite = bool(torch.isfinite(loss))
        if not self.distributed:
            return float(loss), finite
        packed = torch.tensor(
            [float(loss) if finite else 0.0, 0.0 if finite else 1.0], device=self.device,
            dtype=torch.float64)
        dist.all_reduce(packed)
        if packed[1] > 0:
            return float('nan'), False
        return float(packed[0]) / self.world_size, True

    def _is_spike(self, loss_value: float) -> bool:
        # Needs a few losses first: the first steps from random weights fall steeply.
        if len(self._losses) < min(10, self.config.spike_window):
            return False
        return loss_value > self.config.loss_spike_factor * statistics.median(self._losses)

    def _account(self, bad: bool) -> bool:
        """Track bad steps in a row, take snapshots, roll back; returns True on rollback."""
        if not bad:
            self._consecutive_bad = 0
            self._good_steps += 1
            if self._good_steps % self.config.snapshot_every == 0:
                self._snapshot = self._take_snapshot()
            return False
        self._consecutive_bad += 1
        if self._consecutive_bad < self.config.max_consecutive_bad:
            return False
        LOGGER.warning(
            'training step %d: %d bad steps in a row; restoring the snapshot taken at update %d',
            self.step, self._consecutive_bad, self._snapshot['updates'])
        self._restore_snapshot()
        self._consecutive_bad = 0
        self.counters['rollbacks'] += 1
        return True

    # -----------------------------------------------------------------------------------------
    # Validation and hand-over

    def validation_due(self) -> bool:
        return self.step > 0 and self.step % self.config.validate_every == 0

    def maybe_validate(self) -> Optional[Dict[str, Any]]:
        """Validate when ``validation_due``; returns the validation record or None."""
        if not self.validation_due() or self._validated_at == self.step:
            return None
        self._validated_at = self.step
        return self.validate()

    def evaluate(self, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                 frames: Optional[Sequence[Frame]] = None) -> Dict[str, Any]:
        """Score weights on hold-out frames: mAP@0.5 and mAP@[.5:.95] in original pixels.

        ``state_dict`` None scores the training weights. Inference runs in eval mode on the
        stored frames, which were resized like the perception node resizes its input.
        """
        frames = self.holdout.frames() if frames is None else frames
        if state_dict is None:
            model = self.model
        else:
            if self._eval_model is None:
                self._eval_model = build_model(self.spec).to(self.device)
            model = self._eval_model
            model.load_state_dict(state_dict)
        predictions = self._predict(model, frames)
        targets = [(frame.original_boxes(), frame.labels) for frame in frames]
        return mean_average_precision(predictions, targets, self.spec.class_names)

    def _predict(self, model: torch.nn.Module, frames: Sequence[Frame]) -> List[Detections]:
        was_training = model.training
        model.eval()
        # Both torchvision families apply the score threshold inside forward().
        head = model.roi_heads if hasattr(model, 'roi_heads') else model
        head.score_thresh = self.config.val_score_threshold
        head.detections_per_img = 100  # the COCO evaluation reads at most 100 per image
        side = self.spec.input_size
        results = []
        try:
            with torch.inference_mode():
                for begin in range(0, len(frames), EVAL_BATCH):
                    chunk = frames[begin:begin + EVAL_BATCH]
                    batch = images_to_batch([frame.image for frame in chunk], side, self.device)
                    for frame, output in zip(chunk, model(list(batch))):
                        width, height = frame.original_size
                        scale = torch.tensor([width / side, height / side] * 2)
                        results.append(Detections(
                            boxes=(output['boxes'].float().cpu() * scale).numpy(),
                            scores=output['scores'].float().cpu().numpy(),
                            labels=(output['labels'].cpu() - 1).numpy().astype(np.int64)))
        finally:
            model.train(was_training)
        return results

    def validate(self) -> Optional[Dict[str, Any]]:
        """Score candidate and deployed weights on the hold-out set and gate the hand-over.

        Returns the validation record (also appended to ``validation_log.jsonl``), or None
        when the hold-out set is too small or has no box. Under DDP, rank 0 validates and
        broadcasts to the other ranks whether the candidate was accepted.
        """
        record = None
        if self.is_main:
            record = self._validate_main()
        accepted = bool(record and record['accepted'])
        if self.distributed:
            flag = torch.tensor([1 if accepted else 0], device=self.device)
            dist.broadcast(flag, src=0)
            accepted = bool(flag.item())
        if accepted:
            self._snapshot = self._take_snapshot()
        return record

    def _validate_main(self) -> Optional[Dict[str, Any]]:
        frames = self.holdout.frames()
        if len(frames) < self.config.min_holdout_frames or self.holdout.box_count(frames) == 0:
            self.counters['validations_skipped'] += 1
            return None
        start = time.perf_counter()
        candidate = self.evaluate(None, frames)
        deployed = self._deployed_metrics(frames)
        deployed_map50 = deployed['map50']
        accepted = candidate['map50'] >= deployed_map50 - self.config.max_map_drop
        version = version_name(self.step)
        self.counters['validations'] += 1

        handover_path = None
        if accepted:
            state = self._cpu_copy(self.model.state_dict())
            handover_path = self._hand_over(state, version, candidate['map50'])
            self.deployed_state = state
            self.deployed_version = version
            self.deployed_score = candidate['map50']
            self.deployed_path = str(handover_path) if handover_path else None
            self._deployed_cache = (self.holdout.version, candidate)
            self.counters['accepted'] += 1
        else:
            self.deployed_score = deployed_map50  # rescored on the current hold-out set
            self.counters['rejected'] += 1
            LOGGER.info('candidate %s rejected: hold-out mAP@0.5 %.3f < deployed %s %.3f - %.3f',
                        version, candidate['map50'], self.deployed_version, deployed_map50,
                        self.config.max_map_drop)

        checkpoint_path = None
        if self.checkpoints is not None:
            checkpoint_path = self.save_checkpoint(score=candidate['map50'])
        record = {
            'step': self.step,
            'wall_time': time.time(),
            'version': version,
            'map50': candidate['map50'],
            'map': candidate['map'],
            'deployed_version': self.deployed_version if not accepted else version,
            'deployed_map50': deployed_map50,
            'deployed_map': deployed['map'],
            'accepted': bool(accepted),
            'handed_over': str(handover_path) if handover_path else None,
            'checkpoint': str(checkpoint_path) if checkpoint_path else None,
            'holdout_frames': len(frames),
            'holdout_boxes': self.holdout.box_count(frames),
            'eval_time_s': time.perf_counter() - start,
        }
        self.last_validation = record
        if self.validation_log is not None:
            self.validation_log.write(record)
        return record

    def _deployed_metrics(self, frames: Sequence[Frame]) -> Dict[str, Any]:
        # The hold-out set changes as frames arrive; rescore unless it is unchanged.
        if self._deployed_cache is not None and self._deployed_cache[0] == self.holdout.version:
            return self._deployed_cache[1]
        metrics = self.evaluate(self.deployed_state, frames)
        self._deployed_cache = (self.holdout.version, metrics)
        return metrics

    def _hand_over(self, state: Dict[str, torch.Tensor], version: str,
                   score: float) -> Optional[pathlib.Path]:
        """Write the accepted weights, complete, into ``handover_dir``; returns the path."""
        if not self.config.handover_dir:
            return None
        directory = pathlib.Path(self.config.handover_dir)
        path = directory / f'{HANDOVER_PREFIX}{version}.safetensors'
        save_checkpoint(path, state, self.spec.with_version(version, score),
                        {'step': str(self.step), 'holdout_map50': repr(score)})
        self.counters['handovers'] += 1
        # Older hand-overs were loaded (or skipped) long ago; keep a few for inspection.
        older = sorted(directory.glob(f'{HANDOVER_PREFIX}step-*.safetensors'), reverse=True)
        for stale in older[self.config.keep_last:]:
            stale.unlink(missing_ok=True)
        return path

    # -----------------------------------------------------------------------------------------
    # Checkpoints

    def trainer_state(self) -> Dict[str, Any]:
        """Return everything but the weights needed to resume; plain values and tensors."""
        return {
            'step': self.step,
            'updates': self.updates,
            'frames_offered': self.frames_offered,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'clipper': self.clipper.state_dict(),
            'counters': dict(self.counters),
            'deployed_version': self.deployed_version,
            'deployed_score': self.deployed_score,
            'deployed_path': self.deployed_path,
            'buffer': self.buffer.state(),
            'holdout': {'frames': len(self.holdout), 'seen': self.holdout.seen},
            'rng': self.rng.bit_generator.state,
        }

    def save_checkpoint(self, score: Optional[float] = None) -> Optional[pathlib.Path]:
        """Write a checkpoint pair for the current step (rank 0 only); returns the model path."""
        if self.checkpoints is None or not self.is_main:
            return None
        protected = (self.deployed_version,)
        path = self.checkpoints.save(
            self.step, self.model.state_dict(), self.spec, self.trainer_state(), score=score,
            protected=protected)
        self.counters['checkpoints'] += 1
        return path

    def _resume(self) -> None:
        loaded = self.checkpoints.load_latest(self.spec)
        self.counters['corrupt_checkpoints'] += len(self.checkpoints.corrupt_files)
        if loaded is None:
            return
        state_dict, spec, state = loaded
        self.model.load_state_dict(state_dict)
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.clipper.load_state_dict(state['clipper'])
        self.step = int(state['step'])
        self.updates = int(state['updates'])
        self.frames_offered = int(state.get('frames_offered', 0))
        for key, value in state.get('counters', {}).items():
            if key != 'corrupt_checkpoints':
                self.counters[key] = value
        if 'rng' in state:
            self.rng.bit_generator.state = state['rng']
        self.resumed_from = spec.version

        # The deployed weights: the checkpoint of that version, unless it was never saved
        # here (then the starting weights are still the deployed ones).
        deployed_version = state.get('deployed_version')
        deployed_file = self.checkpoints.model_path(deployed_version or '')
        if deployed_version and deployed_file.exists():
            try:
                deployed_state, _, _ = load_checkpoint(deployed_file, self.spec)
            except CheckpointError as error:
                LOGGER.warning('deployed checkpoint unreadable, keeping starting weights: %s',
                               error)
            else:
                self.deployed_state = deployed_state
                self.deployed_version = deployed_version
                self.deployed_score = state.get('deployed_score')
                path = state.get('deployed_path')
                self.deployed_path = path if path and pathlib.Path(path).exists() else None
        LOGGER.info('resumed from checkpoint %s (step %d); deployed version %s',
                    spec.version, self.step, self.deployed_version)

    # -----------------------------------------------------------------------------------------
    # Reporting and shutdown

    def statistics(self) -> Dict[str, Any]:
        """Return counters and sizes for diagnostics; cheap, callable from another thread."""
        validation = self.last_validation or {}
        return {
            'step': self.step,
            'updates': self.updates,
            'frames_offered': self.frames_offered,
            'buffer_frames': len(self.buffer),
            'buffer_bytes': self.buffer.nbytes,
            'holdout_frames': len(self.holdout),
            'holdout_map50': validation.get('map50'),
            'holdout_map': validation.get('map'),
            'deployed_version': self.deployed_version,
            'deployed_map50': self.deployed_score,
            **self.counters,
        }

    def close(self) -> None:
        """Close the log files; the caller saves a final checkpoint first if it wants one."""
        for log in (self.train_log, self.validation_log):
            if log is not None:
                log.close()
        self.train_log = self.validation_log = None
