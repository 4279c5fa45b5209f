"""Safetensors checkpoints with metadata, written atomically and checked on load.

A checkpoint is one ``.safetensors`` file: the model's tensors plus string metadata that names
the architecture, classes, input size, version and validation score. Nothing is ever
unpickled, so a file that came over a topic or from an unknown place is safe to open.
"""

import json
import os
import pathlib
import tempfile
from typing import Dict, Mapping, Optional, Tuple

import safetensors
import safetensors.torch
import torch

from gradclip_ros.model import build_model, ModelSpec

FORMAT_NAME = 'gradclip_ros.detector'
FORMAT_VERSION = '1'


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupt or does not match the expected model."""


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The bytes go to a temporary file in the same folder, are flushed and fsync'ed, and the file
    is renamed over ``path``. The folder is fsync'ed too, so the rename survives a power cut.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def spec_to_metadata(spec: ModelSpec, extra: Optional[Mapping[str, object]] = None) -> Dict:
    metadata = {
        'format': FORMAT_NAME,
        'format_version': FORMAT_VERSION,
        'architecture': spec.architecture,
        'class_names': json.dumps(list(spec.class_names)),
        'input_size': str(spec.input_size),
        'version': spec.version,
        'score': '' if spec.score is None else repr(float(spec.score)),
    }
    for key, value in (extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def metadata_to_spec(metadata: Mapping[str, str], source: str) -> ModelSpec:
    if metadata.get('format') != FORMAT_NAME:
        raise CheckpointError(
            f'{source}: not a gradclip_ros checkpoint (metadata format is '
            f'{metadata.get("format")!r}, expected {FORMAT_NAME!r})')
    try:
        score = metadata.get('score', '')
        return ModelSpec(
            architecture=metadata['architecture'],
            class_names=tuple(json.loads(metadata['class_names'])),
            input_size=int(metadata['input_size']),
            version=metadata.get('version', 'unknown'),
            score=float(score) if score else None)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f'{source}: invalid checkpoint metadata: {error}') from error


def save_checkpoint(path, state_dict: Mapping[str, torch.Tensor], spec: ModelSpec,
                    extra: Optional[Mapping[str, object]] = None) -> pathlib.Path:
    """Write model tensors and ``spec`` (plus ``extra`` metadata) atomically to ``path``."""
    tensors = {name: tensor.detach().to('cpu').contiguous() for name, tensor in state_dict.items()}
    data = safetensors.torch.save(tensors, metadata=spec_to_metadata(spec, extra))
    atomic_write_bytes(path, data)
    return pathlib.Path(path)


def read_metadata(path) -> Dict[str, str]:
    """Read only the metadata of a checkpoint; raises CheckpointError when unreadable."""
    try:
        with safetensors.safe_open(str(path), framework='pt') as handle:
            return dict(handle.metadata() or {})
    except (OSError, safetensors.SafetensorError) as error:
        raise CheckpointError(f'{path}: cannot read checkpoint: {error}') from error


def load_checkpoint(path, expected: Optional[ModelSpec] = None
                    ) -> Tuple[Dict[str, torch.Tensor], ModelSpec, Dict[str, str]]:
    """Load and check a checkpoint; returns (state_dict, spec, raw metadata).

    With ``expected``, the architecture, class names and input size must match it. The tensor
    names and shapes must match the architecture exactly. Every problem raises
    CheckpointError with a message that names the file and what differs.
    """
    source = str(path)
    try:
        with safetensors.safe_open(source, framework='pt') as handle:
            metadata = dict(handle.metadata() or {})
            spec = metadata_to_spec(metadata, source)
            state_dict = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, safetensors.SafetensorError, RuntimeError) as error:
        raise CheckpointError(f'{source}: cannot read checkpoint: {error}') from error

    if expected is not None:
        for name in ('architecture', 'class_names', 'input_size'):
            found, wanted = getattr(spec, name), getattr(expected, name)
            if found != wanted:
                raise CheckpointError(
                    f'{source}: {name} is {found!r}, but the model expects {wanted!r}')

    reference = build_model(spec).state_dict()
    missing = sorted(set(reference) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(reference))
    if missing or unexpected:
        raise CheckpointError(
            f'{source}: tensors do not match {spec.architecture}: '
            f'{len(missing)} missing (first: {missing[:3]}), '
            f'{len(unexpected)} unexpected (first: {unexpected[:3]})')
    for name, tensor in reference.items():
        if state_dict[name].shape != tensor.shape:
            raise CheckpointError(
                f'{source}: tensor {name} has shape {tuple(state_dict[name].shape)}, '
                f'expected {tuple(tensor.shape)}')
        if state_dict[name].is_floating_point() and not torch.isfinite(state_dict[name]).all():
            raise CheckpointError(f'{source}: tensor {name} contains NaN or Inf')
    return state_dict, spec, metadata
