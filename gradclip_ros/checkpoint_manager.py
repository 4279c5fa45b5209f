"""Trainer checkpoints on disk: atomic pairs of weights and trainer state, pruning, resume.

A checkpoint is a pair in one folder:

- ``step-000120.safetensors``: the model, written by ``checkpoints.save_checkpoint`` with
  metadata (architecture, classes, input size, version, step, hold-out mAP).
- ``step-000120.state.pt``: optimizer, LR schedule, clipper state, counters and the deployed
  score, written with ``torch.save`` into bytes and then ``atomic_write_bytes``; read back
  with ``torch.load(weights_only=True)`` only.

The weights are written first and the state file last, so a state file marks a complete pair.
Both writes go to a temporary file that is fsync'ed and renamed, so a crash leaves either the
old files or whole new ones plus at most a ``.*.tmp`` leftover, which resume ignores and the
next save deletes.
"""

import io
import logging
import pathlib
import pickle
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from gradclip_ros.checkpoints import (
    atomic_write_bytes, CheckpointError, load_checkpoint, read_metadata, save_checkpoint)
from gradclip_ros.model import ModelSpec

LOGGER = logging.getLogger(__name__)

_NAME = re.compile(r'^step-(?P<step>\d{6,})\.safetensors$')


def version_name(step: int) -> str:
    """Return the checkpoint version of a step, e.g. ``step-000120``."""
    return f'step-{int(step):06d}'


class CheckpointManager:
    """Save, prune and resume trainer checkpoints in ``directory``.

    Keeps the ``keep_last`` newest pairs, the pair with the best hold-out mAP@0.5 and any
    versions passed as ``protected`` (the deployed one). ``corrupt_files`` lists every file
    that failed to load during ``load_latest``.
    """

    def __init__(self, directory, keep_last: int = 3):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = int(keep_last)
        self.corrupt_files: List[str] = []

    def model_path(self, version: str) -> pathlib.Path:
        return self.directory / f'{version}.safetensors'

    def state_path(self, version: str) -> pathlib.Path:
        return self.directory / f'{version}.state.pt'

    def versions(self) -> List[Tuple[int, str]]:
        """Return (step, version) of every model file present, newest first."""
        found = []
        for path in self.directory.glob('step-*.safetensors'):
            match = _NAME.match(path.name)
            if match:
                found.append((int(match['step']), path.name[:-len('.safetensors')]))
        return sorted(found, reverse=True)

    def save(self, step: int, state_dict: Dict[str, torch.Tensor], spec: ModelSpec,
             trainer_state: Dict[str, Any], score: Optional[float] = None,
             protected: Sequence[str] = ()) -> pathlib.Path:
        """Write the pair for ``step`` atomically, then prune; returns the model file path."""
        version = version_name(step)
        metadata = {'step': str(int(step)), 'holdout_map50': '' if score is None else repr(score)}
        model_path = save_checkpoint(
            self.model_path(version), state_dict, spec.with_version(version, score), metadata)

        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        atomic_write_bytes(self.state_path(version), buffer.getvalue())

        self.prune(protected=(version,) + tuple(protected))
        return model_path

    def prune(self, protected: Sequence[str] = ()) -> None:
        """Delete pairs beyond the newest ``keep_last``, the best and ``protected``."""
        versions = [version for _, version in self.versions()]
        keep = set(versions[:self.keep_last]) | set(protected)
        best = self.best_version()
        if best is not None:
            keep.add(best)
        for version in versions:
            if version not in keep:
                self.model_path(version).unlink(missing_ok=True)
                self.state_path(version).unlink(missing_ok=True)
        # Leftovers of writes that a crash interrupted.
        for leftover in self.directory.glob('.step-*.tmp'):
            leftover.unlink(missing_ok=True)

    def best_version(self) -> Optional[str]:
        """Return the version with the highest recorded hold-out mAP@0.5, if any has one."""
        best, best_score = None, None
        for _, version in self.versions():
            try:
                text = read_metadata(self.model_path(version)).get('holdout_map50', '')
                score = float(text) if text else None
            except (CheckpointError, ValueError):
                continue
            if score is not None and (best_score is None or score > best_score):
                best, best_score = version, score
        return best

    def load_state(self, version: str) -> Dict[str, Any]:
        """Load a trainer-state file; raises CheckpointError when it is missing or corrupt."""
        path = self.state_path(version)
        try:
            state = torch.load(io.BytesIO(path.read_bytes()), weights_only=True,
                               map_location='cpu')
        except (OSError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
                pickle.UnpicklingError) as error:
            raise CheckpointError(f'{path}: cannot read trainer state: {error}') from error
        if not isinstance(state, dict) or 'step' not in state:
            raise CheckpointError(f'{path}: trainer state has no step; not a trainer state file')
        return state

    def load_latest(self, expected: ModelSpec
                    ) -> Optional[Tuple[Dict[str, torch.Tensor], ModelSpec, Dict[str, Any]]]:
        """Load the newest complete, valid pair; returns (state_dict, spec, trainer_state).

        A pair whose model or state file fails to load is logged, added to
        ``corrupt_files`` and skipped in favour of the next newest. Returns None when no
        valid pair exists.
        """
        for _, version in self.versions():
            if not self.state_path(version).exists():
                LOGGER.warning(
                    'checkpoint %s has no trainer state file; skipped (incomplete save)',
                    self.model_path(version))
                self.corrupt_files.append(str(self.state_path(version)))
                continue
            try:
                state_dict, spec, _ = load_checkpoint(self.model_path(version), expected)
            except CheckpointError as error:
                LOGGER.warning('skipping corrupt checkpoint: %s', error)
                self.corrupt_files.append(str(self.model_path(version)))
                continue
            try:
                trainer_state = self.load_state(version)
            except CheckpointError as error:
                LOGGER.warning('skipping checkpoint with a corrupt trainer state: %s', error)
                self.corrupt_files.append(str(self.state_path(version)))
                continue
            return state_dict, spec, trainer_state
        return None
