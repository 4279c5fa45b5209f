"""Bounded stores of labeled frames for online training: a replay buffer and a hold-out set.

Frames are stored already resized to the detector's square input size with the same bilinear
resize that inference uses (``model.images_to_batch``), so training uses the same pixels as the
deployed model, and a 1920x1080 frame costs 0.3 MB at 320 px instead of 6 MB.
"""

from dataclasses import dataclass
import threading
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from gradclip_ros.model import images_to_batch


@dataclass
class Frame:
    """One labeled frame, stored at the training size.

    ``image`` uint8 [S, S, 3] RGB; ``boxes`` float32 [N, 4] xyxy in pixels of ``image``;
    ``labels`` int64 [N] 0-based class indices; ``original_size`` (width, height) of the
    camera frame, used to map predictions back for validation.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    original_size: Tuple[int, int]
    camera: str = ''
    stamp_ns: int = 0

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes + self.boxes.nbytes + self.labels.nbytes)

    def original_boxes(self) -> np.ndarray:
        """Return ``boxes`` scaled back to the original frame, float32 [N, 4] xyxy pixels."""
        side = self.image.shape[0]
        width, height = self.original_size
        scale = np.array([width / side, height / side] * 2, np.float32)
        return (self.boxes * scale).astype(np.float32)


def prepare_frame(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, input_size: int,
                  camera: str = '', stamp_ns: int = 0) -> Tuple[Frame, int]:
    """Resize a labeled camera frame to the training size; returns (frame, boxes dropped).

    ``image`` RGB uint8 [H, W, 3]; ``boxes`` float32 [N, 4] xyxy pixels of ``image``;
    ``labels`` int64 [N] 0-based. Boxes that are not finite, or thinner than one pixel at the
    training size, are dropped (counted in the second return value): callers validate labels
    first, so this is the last line of defence.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f'expected an RGB uint8 image of shape [H, W, 3], got {image.dtype} {image.shape}')
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f'{len(boxes)} boxes but {len(labels)} labels; need one label per box')

    height, width = image.shape[:2]
    batch = images_to_batch([image], input_size, torch.device('cpu'))
    resized = (batch[0].permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()

    scale = np.array([input_size / width, input_size / height] * 2, np.float32)
    scaled = boxes * scale
    with np.errstate(invalid='ignore'):
        keep = np.isfinite(scaled).all(axis=1)
        keep &= (scaled[:, 2] - scaled[:, 0] >= 1.0) & (scaled[:, 3] - scaled[:, 1] >= 1.0)
    frame = Frame(
        image=np.ascontiguousarray(resized), boxes=np.ascontiguousarray(scaled[keep]),
        labels=labels[keep].copy(), original_size=(int(width), int(height)), camera=camera,
        stamp_ns=int(stamp_ns))
    return frame, int((~keep).sum())


class ReplayBuffer:
    """Training frames bounded by count and bytes, kept by reservoir sampling once full.

    Until full, every frame is kept. After that the n-th offered frame replaces a random stored
    one with probability capacity / n, so the buffer stays a uniform sample of every frame seen
    and old scenes are kept alongside new ones. Safe to use from several threads.

    NOTE: a uniform sample of a long drive adapts slowly to a new environment, because after n
    frames a new one is kept with probability capacity / n only.
    """

    def __init__(self, max_frames: int, max_bytes: int, seed: int = 0):
        if max_frames < 1 or max_bytes < 1:
            raise ValueError(
                f'max_frames and max_bytes must be >= 1, got {max_frames} and {max_bytes}')
        self.max_frames = int(max_frames)
        self.max_bytes = int(max_bytes)
        self._frames: List[Frame] = []
        self._bytes = 0
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.seen = 0
        self.replaced = 0
        self.rejected = 0

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def add(self, frame: Frame) -> bool:
        """Offer a frame; returns True when it was stored."""
        with self._lock:
            self.seen += 1
            if frame.nbytes > self.max_bytes:
                self.rejected += 1
                return False
            fits = (len(self._frames) < self.max_frames
                    and self._bytes + frame.nbytes <= self.max_bytes)
            if fits:
                self._frames.append(frame)
                self._bytes += frame.nbytes
                return True

            # Reservoir step: keep the new frame with probability capacity / seen.
            slot = int(self._rng.integers(0, self.seen))
            if slot >= len(self._frames):
                return False
            self._bytes += frame.nbytes - self._frames[slot].nbytes
            self._frames[slot] = frame
            self.replaced += 1
            # A larger frame may push the byte total over the bound: evict random others.
            while self._bytes > self.max_bytes and len(self._frames) > 1:
                victim = int(self._rng.integers(0, len(self._frames)))
                if victim == slot:
                    continue
                self._bytes -= self._frames[victim].nbytes
                self._frames[victim] = self._frames[-1]
                if slot == len(self._frames) - 1:
                    slot = victim
                self._frames.pop()
            return True

    def sample(self, count: int, rng: np.random.Generator) -> List[Frame]:
        """Draw ``count`` frames, without replacement when the buffer has that many."""
        with self._lock:
            if not self._frames:
                return []
            replace = len(self._frames) < count
            indices = rng.choice(len(self._frames), size=count, replace=replace)
            return [self._frames[int(index)] for index in indices]

    def state(self) -> dict:
        with self._lock:
            return {'frames': len(self._frames), 'bytes': self._bytes, 'seen': self.seen,
                    'replaced': self.replaced, 'rejected': self.rejected}


class HoldoutSet:
    """Validation frames, first in first out: the newest ``max_frames`` are kept.

    FIFO keeps the hold-out set close to the scenes the vehicle drives through now, which is
    where a new model must not be worse. ``version`` changes whenever the content changes, so
    scores of the deployed model can be cached until then.
    """

    def __init__(self, max_frames: int):
        if max_frames < 1:
            raise ValueError(f'max_frames must be >= 1, got {max_frames}')
        self.max_frames = int(max_frames)
        self._frames: List[Frame] = []
        self._lock = threading.Lock()
        self.version = 0
        self.seen = 0

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, frame: Frame) -> None:
        with self._lock:
            self.seen += 1
            self._frames.append(frame)
            if len(self._frames) > self.max_frames:
                self._frames.pop(0)
            self.version += 1

    def frames(self) -> Sequence[Frame]:
        """Return a snapshot list of the current frames."""
        with self._lock:
            return list(self._frames)

    def box_count(self, frames: Optional[Sequence[Frame]] = None) -> int:
        frames = self.frames() if frames is None else frames
        return int(sum(len(frame.boxes) for frame in frames))
