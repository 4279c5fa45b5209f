"""Statistics of the gradient clipper: the per-call record and the adaptive norm histories.

``PercentileHistory`` implements AutoClip (Seetharaman et al. 2020, "AutoClip: Adaptive
Gradient Clipping for Source Separation Networks", arXiv:2007.14469); ``ZScoreStatistics``
follows ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
arXiv:2504.02507). Both run on the host, on Python floats that the clipper read back from the
device, so their state is plain numbers.
"""

from bisect import bisect_left, insort
from collections import deque
from dataclasses import asdict, dataclass, field
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from gradclip_ros.clip_config import ClipConfig

# Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
NORM_EPS = 1e-6


@dataclass
class ClipStats:
    """Statistics of one ``clip()`` call.

    ``norm_before`` / ``norm_after`` are global L2 norms of the selected gradients before and
    after clipping. ``threshold`` is the bound in force: ``abs_tol`` for value, relative and
    unitwise, the norm bound for the global modes, None while an adaptive mode warms up
    without ``max_norm``. ``clip_fraction`` is the share of elements (value, relative), of
    units (unitwise) or 0/1 (global modes) that were clipped. ``top_norms`` contains
    (name, pre-clip gradient norm) of the largest parameters, largest first, non-finite first
    of all. ``clip_rate`` is the share of clipped calls among the last ``clip_rate_window``.
    """

    step: int
    mode: str
    norm_before: float
    norm_after: float
    threshold: Optional[float]
    clipped: bool
    clip_fraction: float
    nonfinite_count: int
    skip_step: bool
    clip_rate: float
    abs_tol: Optional[float] = None
    rel_tol: Optional[float] = None
    nonfinite_names: List[str] = field(default_factory=list)
    top_norms: List[Tuple[str, float]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        """Return the record as JSON-serializable values; NaN and infinity become None."""
        result = asdict(self)
        for key, value in result.items():
            if isinstance(value, float):
                result[key] = _finite_or_none(value)
        result['top_norms'] = [{'name': name, 'norm': _finite_or_none(norm)}
                               for name, norm in self.top_norms]
        return result


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


class PercentileHistory:
    """The last ``window`` finite pre-clip norms, kept in arrival order and sorted."""

    def __init__(self, config: ClipConfig):
        self.config = config
        self.norms = deque(maxlen=config.window)
        self.ordered: List[float] = []

    def threshold_after_adding(self, norm: float) -> Optional[float]:
        """Add ``norm``, then return the percentile bound, or the warm-up bound.

        The norm enters the history before the percentile is taken, as AutoClip does, so a
        norm above every earlier one is clipped only below the 100th percentile.
        """
        if len(self.norms) == self.norms.maxlen:
            del self.ordered[bisect_left(self.ordered, self.norms[0])]
        self.norms.append(norm)
        insort(self.ordered, norm)

        if len(self.norms) < self.config.warmup:
            return self.config.max_norm
        return _percentile(self.ordered, self.config.percentile)


def _percentile(ordered: Sequence[float], percent: float) -> float:
    """Linear interpolation between closest ranks, as ``numpy.percentile`` by default."""
    position = (len(ordered) - 1) * percent / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class ZScoreStatistics:
    """EMA mean and variance of the global norm, initialized from the first warm-up norms."""

    def __init__(self, config: ClipConfig):
        self.config = config
        self.warmup_norms: List[float] = []
        self.mean: Optional[float] = None
        self.var: Optional[float] = None

    def threshold_and_update(self, norm: float) -> Tuple[Optional[float], bool]:
        """Return (bound in force, whether to clip ``norm``) and fold the norm in."""
        config = self.config
        if self.mean is None:
            self.warmup_norms.append(norm)
            if len(self.warmup_norms) >= config.warmup:
                count = len(self.warmup_norms)
                self.mean = sum(self.warmup_norms) / count
                self.var = sum((x - self.mean) ** 2 for x in self.warmup_norms) / count
                self.warmup_norms = []
            bound = config.max_norm
            return bound, bound is not None and norm > bound

        std = math.sqrt(self.var)
        bound = self.mean + config.z_max * std
        clip = (norm - self.mean) / (std + NORM_EPS) > config.z_max
        value = bound if clip else norm

        # The variance uses the updated mean, as the ZClip reference implementation does.
        alpha = config.alpha
        self.mean = alpha * self.mean + (1.0 - alpha) * value
        self.var = alpha * self.var + (1.0 - alpha) * (value - self.mean) ** 2
        return bound, clip
