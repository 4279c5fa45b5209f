"""Detector registry and batched inference on numpy images.

The detectors are torchvision's detection models built from scratch (no pretrained download is
ever attempted). Class index 0 is the background in torchvision; this module hides that and
reports labels as 0-based indices into ``ModelSpec.class_names``.
"""

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_320_fpn,
    ssdlite320_mobilenet_v3_large,
)

DEFAULT_CLASSES = ('vehicle', 'pedestrian', 'cyclist', 'traffic_light')
DEFAULT_ARCHITECTURE = 'ssdlite320_mobilenet_v3_large'


def _build_ssdlite(num_classes: int, input_size: int) -> nn.Module:
    model = ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes)
    # SSD resizes every image to a fixed square; the anchors follow the feature-map sizes.
    model.transform.fixed_size = (input_size, input_size)
    model.transform.min_size = (input_size,)
    model.transform.max_size = input_size
    return model


def _build_fasterrcnn(num_classes: int, input_size: int) -> nn.Module:
    return fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes,
        min_size=input_size, max_size=input_size)


# Architecture name -> builder(num_classes including background, input_size in pixels).
ARCHITECTURES: Dict[str, Callable[[int, int], nn.Module]] = {
    'ssdlite320_mobilenet_v3_large': _build_ssdlite,
    'fasterrcnn_mobilenet_v3_large_320_fpn': _build_fasterrcnn,
}


@dataclass(frozen=True)
class ModelSpec:
    """Identity of a set of weights: architecture, classes, input size, version and score.

    ``input_size`` is the side in pixels of the square the images are resized to.
    ``score`` is the validation score (hold-out mAP@0.5) the weights were accepted with, or
    None for weights that were never validated.
    """

    architecture: str = DEFAULT_ARCHITECTURE
    class_names: Tuple[str, ...] = DEFAULT_CLASSES
    input_size: int = 320
    version: str = 'random-init'
    score: Optional[float] = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f'unknown model architecture {self.architecture!r}; '
                f'known: {", ".join(sorted(ARCHITECTURES))}')
        names = tuple(self.class_names)
        if not names or len(set(names)) != len(names) or any(not n for n in names):
            raise ValueError(
                f'class_names must be a non-empty list of unique non-empty names, got {names!r}')
        object.__setattr__(self, 'class_names', names)
        if not 64 <= int(self.input_size) <= 2048:
            raise ValueError(f'input_size must be in [64, 2048] pixels, got {self.input_size}')

    def with_version(self, version: str, score: Optional[float] = None) -> 'ModelSpec':
        return replace(self, version=version, score=score)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the detector of ``spec`` with random weights; background is class 0."""
    return ARCHITECTURES[spec.architecture](len(spec.class_names) + 1, spec.input_size)


def resolve_device(name: str) -> torch.device:
    """Turn 'auto', 'cpu', 'cuda' or 'cuda:N' into a device, with a clear error otherwise."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cpu':
        return torch.device('cpu')
    if name == 'cuda' or (name.startswith('cuda:') and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f'device {name!r} requested, but CUDA is not available here')
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f'device {name!r} requested, but only {torch.cuda.device_count()} GPU(s) exist')
        return device
    raise ValueError(f"invalid device {name!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")


@dataclass
class Detections:
    """Detections of one image, in pixels of the original image.

    ``boxes`` float32 [N, 4] xyxy, ``scores`` float32 [N], ``labels`` int64 [N] (0-based
    indices into ``ModelSpec.class_names``).
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class InferenceSettings:
    """Post-processing thresholds; safe to change between two ``predict`` calls."""

    score_threshold: float = 0.3
    nms_iou: float = 0.5
    max_detections: int = 100


def images_to_batch(images: Sequence[np.ndarray], input_size: int,
                    device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Resize RGB uint8 images [H, W, 3] on ``device`` into one [B, 3, S, S] batch in [0, 1]."""
    resized = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f'expected an RGB uint8 image of shape [H, W, 3], got {image.dtype} {image.shape}')
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device, non_blocking=True)
        tensor = tensor.permute(2, 0, 1).unsqueeze(0).float()
        if tensor.shape[-2:] != (input_size, input_size):
            tensor = F.interpolate(
                tensor, size=(input_size, input_size), mode='bilinear', align_corners=False,
                antialias=False)
        resized.append(tensor)
    return (torch.cat(resized) / 255.0).to(dtype)


def _set_postprocess(model: nn.Module, settings: InferenceSettings) -> None:
    # Both torchvision families apply score threshold, NMS and the top-k inside forward().
    target = model.roi_heads if hasattr(model, 'roi_heads') else model
    target.score_thresh = float(settings.score_threshold)
    target.nms_thresh = float(settings.nms_iou)
    target.detections_per_img = int(settings.max_detections)


class Detector:
    """A detector on one device, with batched inference on numpy images.

    Not thread-safe by itself: callers that swap weights (``replace_model``) while another
    thread predicts must serialize the two, as the perception node does between batches.
    """

    def __init__(self, spec: ModelSpec, device: str = 'auto', half: bool = False,
                 settings: Optional[InferenceSettings] = None,
                 state_dict: Optional[Dict[str, torch.Tensor]] = None):
        self.device = resolve_device(device)
        if half and self.device.type != 'cuda':
            raise ValueError('half=True needs a CUDA device; FP16 inference is CUDA-only here')
        self.half = half
        self.settings = settings or InferenceSettings()
        self.spec = spec
        self.model = self._prepare(build_model(spec), state_dict)

    def _prepare(self, model: nn.Module,
                 state_dict: Optional[Dict[str, torch.Tensor]]) -> nn.Module:
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
        model.eval().to(self.device)
        if self.half:
            model.half()
        return model

    def build_replacement(self, spec: ModelSpec,
                          state_dict: Dict[str, torch.Tensor]) -> nn.Module:
        """Build a ready model for ``spec`` without touching the one in service.

        Raises ValueError when ``spec`` differs from the current one in anything but version
        and score, since the node's topics and class map depend on those fields.
        """
        for name in ('architecture', 'class_names', 'input_size'):
            if getattr(spec, name) != getattr(self.spec, name):
                raise ValueError(
                    f'checkpoint {name} {getattr(spec, name)!r} differs from the running '
                    f"model's {getattr(self.spec, name)!r}")
        return self._prepare(build_model(spec), state_dict)

    def replace_model(self, model: nn.Module, spec: ModelSpec) -> None:
        """Swap in a model from ``build_replacement``; one reference assignment each."""
        self.model = model
        self.spec = spec

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> List[Detections]:
        """Detect objects in RGB uint8 images [H, W, 3] (sizes may differ) as one batch."""
        if not images:
            return []
        model, spec = self.model, self.spec  # one consistent pair even if swapped meanwhile
        dtype = torch.float16 if self.half else torch.float32
        batch = images_to_batch(images, spec.input_size, self.device, dtype)
        _set_postprocess(model, self.settings)
        outputs = model(list(batch))

        results = []
        for image, output in zip(images, outputs):
            height, width = image.shape[:2]
            scale = torch.tensor(
                [width / spec.input_size, height / spec.input_size] * 2,
                device=output['boxes'].device)
            keep = output['scores'] >= self.settings.score_threshold
            boxes = (output['boxes'][keep].float() * scale).cpu().numpy()
            results.append(Detections(
                boxes=boxes.astype(np.float32),
                scores=output['scores'][keep].float().cpu().numpy(),
                labels=(output['labels'][keep] - 1).cpu().numpy().astype(np.int64)))
        return results
