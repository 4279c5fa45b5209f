"""Gradient clipping engine: six modes, one record of statistics per call, restartable state.

Call ``GradientClipper.clip()`` after ``backward()`` (and after ``GradScaler.unscale_``) and
before ``optimizer.step()``. Each call reads the device once: every statistic that the host
needs goes into one tensor and one ``tolist()``. The only exception is policy ``zero`` when a
non-finite gradient is found: the offending tensors are zeroed and the call runs again.

Modes (``g`` a gradient, ``w`` its parameter):

- ``value``: ``g <- clamp(g, -abs_tol, abs_tol)``, as ``torch.nn.utils.clip_grad_value_``.
- ``norm``: scale all gradients by ``max_norm / (norm + 1e-6)`` when the global L2 norm
  exceeds ``max_norm``, as ``torch.nn.utils.clip_grad_norm_``.
- ``relative``: element-wise ``g <- clamp(g, -t, t)`` with ``t = max(abs_tol, rel_tol * |w|)``.
- ``unitwise``: adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale
  Image Recognition Without Normalization", arXiv:2102.06171) per unit, i.e. per slice along
  dim 0 of a parameter with 2 or more dims, or per whole tensor otherwise.
- ``percentile``: AutoClip (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for
  Source Separation Networks", arXiv:2007.14469), the global norm clipped to a percentile of
  the recent pre-clip norms.
- ``zscore``: after ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM
  Pre-Training", arXiv:2504.02507), the global norm clipped to ``mean + z_max * std`` of an
  exponential moving average when its z-score exceeds ``z_max``.

The global modes work on the gradients with foreach ops. On CPU, modes ``value``,
``relative`` and ``unitwise`` run a fused C++ kernel (``clip_kernel``) that clips each
gradient in one loop and adds up the statistics as it goes; ``cpu_kernel: false`` or a failed
build selects the torch-op path. The torch-op path of these modes concatenates the gradients
(and weights) of parameters that share a trailing shape into chunk-sized scratch buffers
(``clip_layout``) and runs a few large ops per chunk. On CPU every op costs about a
microsecond per tensor, so a few large ops beat one op per tensor. The scratch takes a few
MiB. Overrides that give parameters different thresholds add one or two tensors of the
selected parameters' size.
"""

from collections import deque
import fnmatch
import heapq
import logging
import math
import operator
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from gradclip_ros import clip_kernel
from gradclip_ros.clip_config import ClipConfig, MODES, Override
from gradclip_ros.clip_layout import Chunk, group_key, GroupLayout, segment_sum, units_of
from gradclip_ros.clip_stats import ClipStats, NORM_EPS, PercentileHistory, ZScoreStatistics

__all__ = ['ClipConfig', 'ClipStats', 'GradientClipper', 'MODES', 'Override']

LOGGER = logging.getLogger(__name__)

_FLAT_MODES = ('value', 'relative', 'unitwise')
_KERNEL_MODES = ('value', 'relative', 'unitwise')
_KERNEL_DTYPES = (torch.float32, torch.float64)
_STATE_FORMAT = 1
_GRAD = operator.attrgetter('grad')


def _sum_of_squares(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # vector_norm sums in blocks; a float32 dot over 10**5 elements was off by 3e-5.
    return torch.linalg.vector_norm(flat, dtype=dtype).square()


class GradientClipper:
    """Clip the gradients of selected parameters in place and report what was done.

    ``named_parameters`` is an iterable of (name, parameter) such as
    ``model.named_parameters()``; ``config`` a ``ClipConfig`` or a mapping for
    ``ClipConfig.from_dict``. Build the clipper after the model is on its final device: the
    selected parameters must share one device and one floating dtype.

    ``names`` lists the selected parameters in the clipper's order. ``kernel_rejections``
    counts the calls whose gradients the fused CPU kernel rejected (see ``_clip_fused``).
    NOTE: written device-agnostic, but only run on CPU so far (CUDA untested).
    """

    def __init__(self, named_parameters: Iterable[Tuple[str, torch.Tensor]],
                 config: Union[ClipConfig, Mapping[str, Any]]):
        if not isinstance(config, ClipConfig):
            config = ClipConfig.from_dict(config)
        self.config = config
        self.mode = config.mode

        selected = self._select(list(named_parameters))
        thresholds = self._match_overrides(selected)
        if self.mode in _FLAT_MODES:
            # One torch.cat joins parameters that share a trailing shape, so they must be
            # neighbors. Blocks keep the order of their first member.
            keys: Dict[Tuple, int] = {}
            for _, param in selected:
                keys.setdefault(group_key(param), len(keys))
            order = sorted(range(len(selected)),
                           key=lambda i: (keys[group_key(selected[i][1])], i))
            selected = [selected[i] for i in order]
            thresholds = [thresholds[i] for i in order]
        self.names = [name for name, _ in selected]
        self._params = [param for _, param in selected]
        self._device = self._params[0].device
        self._stat_dtype = torch.promote_types(self._params[0].dtype, torch.float32)
        self._subsets: Dict[Optional[Tuple[bool, ...]], Dict[str, Any]] = {}

        self._step = 0
        self._clip_history = deque(maxlen=config.clip_rate_window)
        self._clip_count = 0
        self._percentile = PercentileHistory(config) if self.mode == 'percentile' else None
        self._zscore = ZScoreStatistics(config) if self.mode == 'zscore' else None

        self._layout = None
        self._group_max = None
        if self.mode in _FLAT_MODES:
            self._build_flat(thresholds)
        elif self.mode == 'norm' and any(limit != config.max_norm for limit in thresholds):
            self._build_norm_groups(thresholds)
        self._kernel = None
        # Calls whose gradients the kernel rejected, so that they ran the torch ops instead.
        self.kernel_rejections = 0
        if (self.mode in _KERNEL_MODES and config.cpu_kernel and self._device.type == 'cpu'
                and self._params[0].dtype in _KERNEL_DTYPES):
            self._kernel = clip_kernel.load()
            if self.mode == 'value':
                self._kernel_low, self._kernel_rel = list(thresholds), []
            else:
                self._kernel_low = [low for low, _ in thresholds]
                self._kernel_rel = [rel for _, rel in thresholds]
        self.last_stats: Optional[ClipStats] = None

    def _select(self, pairs: List[Tuple[str, torch.Tensor]]) -> List[Tuple[str, torch.Tensor]]:
        config = self.config
        selected = []
        seen = set()
        for name, param in pairs:
            if not isinstance(name, str) or not isinstance(param, torch.Tensor):
                raise ValueError(
                    'GradientClipper: expected (name, tensor) pairs such as '
                    f'model.named_parameters(), got ({type(name).__name__}, '
                    f'{type(param).__name__})')
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in config.include):
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.exclude):
                continue
            if id(param) in seen or param.numel() == 0:
                continue
            seen.add(id(param))
            selected.append((name, param))
        if not selected:
            raise ValueError(
                f'GradientClipper: include {config.include} and exclude {config.exclude} select '
                f'no parameter; names start with {[name for name, _ in pairs[:5]]}')

        first = selected[0][1]
        for name, param in selected:
            if param.device != first.device or param.dtype != first.dtype:
                raise ValueError(
                    f'GradientClipper: parameter "{name}" is {param.dtype} on {param.device}, '
                    f'but "{selected[0][0]}" is {first.dtype} on {first.device}; all selected '
                    'parameters must share one device and dtype (use include/exclude or one '
                    'clipper per group)')
        if not first.is_floating_point():
            raise ValueError(
                f'GradientClipper: parameters must be floating point, got {first.dtype}')
        return selected

    def _match_overrides(self, selected) -> List[Any]:
        """Return per parameter its threshold: abs_tol, (abs_tol, rel_tol) or max_norm."""
        config = self.config
        used = [False] * len(config.overrides)
        thresholds = []
        for name, _ in selected:
            abs_tol = config.abs_tol if config.abs_tol is not None else 0.0
            rel_tol = config.rel_tol
            max_norm = config.max_norm
            for index, override in enumerate(config.overrides):
                if fnmatch.fnmatchcase(name, override.pattern):
                    used[index] = True
                    abs_tol = _pick(override.abs_tol, abs_tol)
                    rel_tol = _pick(override.rel_tol, rel_tol)
                    max_norm = _pick(override.max_norm, max_norm)
                    break
            if self.mode == 'value':
                thresholds.append(abs_tol)
            elif self.mode in ('relative', 'unitwise'):
                thresholds.append((abs_tol, rel_tol))
            else:
                thresholds.append(max_norm)

        for index, override in enumerate(config.overrides):
            if not used[index]:
                raise ValueError(
                    f'ClipConfig.overrides[{index}].pattern: "{override.pattern}" matches no '
                    'selected parameter, or only parameters an earlier override matched')
        return thresholds

    def _build_flat(self, thresholds: List[Any]) -> None:
        config = self.config
        params = self._params
        layout = GroupLayout(params, need_weights=self.mode == 'relative',
                             paired=self.mode == 'unitwise')
        self._layout = layout
        self._abs_tol = config.abs_tol if config.abs_tol is not None else 0.0
        self._placeholders: Dict[int, torch.Tensor] = {}
        # torch.cat needs 1-D pieces for the vector blocks, so 0-d tensors are viewed as [1].
        self._weight_inputs = [param.view(1) if param.dim() == 0 else param for param in params]

        # Per-element or per-unit threshold tensors, built only when overrides make them vary.
        self._element_bound = self._element_abs = self._element_rel = None
        self._bounds = None
        if self.mode == 'value':
            # A bound above the dtype's maximum changes no finite value, but torch's clamp
            # raises when it converts such a scalar, so the clamps use the maximum instead.
            largest = torch.finfo(layout.dtype).max
            self._value_bound = min(self._abs_tol, largest)
            self._bounds = [min(value, largest) for value in thresholds]
            self._clipped_scratch = torch.zeros_like(layout.grad)
            if any(value != self._value_bound for value in self._bounds):
                self._element_bound = layout.fill(self._bounds, per_unit=False)
        if self.mode == 'relative':
            # A tensor of the parameter dtype: a Python float in torch.where would round a
            # float64 threshold to float32.
            self._abs_floor = torch.tensor(self._abs_tol, dtype=layout.dtype, device=self._device)
            self._clipped_scratch = torch.zeros_like(layout.grad)
            self._clipped_views = layout.chunk_views(self._clipped_scratch, params)
            if any(pair != (self._abs_tol, config.rel_tol) for pair in thresholds):
                self._element_abs = layout.fill([low for low, _ in thresholds], per_unit=False)
                self._element_rel = layout.fill([rel for _, rel in thresholds], per_unit=False)
        if self.mode == 'unitwise':
            dtype = self._stat_dtype
            self._unit_abs = layout.fill([low for low, _ in thresholds], per_unit=True).to(dtype)
            self._unit_rel = layout.fill([rel for _, rel in thresholds], per_unit=True).to(dtype)
            self._scale = torch.ones(layout.unit_count, dtype=layout.dtype, device=self._device)
            self._scale_views = layout.param_views(self._scale, params, per_unit=True)

    def _build_norm_groups(self, thresholds: List[float]) -> None:
        limits = sorted(set(thresholds), key=thresholds.index)
        self._group_max = limits
        self._group_of = [limits.index(limit) for limit in thresholds]
        self._group_max_tensor = torch.tensor(limits, dtype=self._stat_dtype, device=self._device)

    # ----------------------------------------------------------------------------------------
    # Per-call work

    @torch.no_grad()
    def clip(self) -> ClipStats:
        """Clip the gradients in place and return the statistics of this call.

        Raises ``FloatingPointError`` naming the parameters when a gradient is not finite and
        ``on_nonfinite`` is ``error``. The gradient values are unchanged then, and with policy
        ``skip``. (The torch-op path of mode ``relative`` writes them back unchanged, see
        ``_clip_relative``; the fused kernel writes nothing.) A gradient whose squared L2 norm
        overflows its dtype counts as non-finite.
        """
        self._step += 1
        grads_all = list(map(_GRAD, self._params))
        grads = [grad for grad in grads_all if grad is not None]
        key = None if len(grads) == len(grads_all) else tuple(g is not None for g in grads_all)
        subset = self._subset(key)
        if grads and grads[0].device != self._device:
            raise ValueError(
                f'GradientClipper: gradients are on {grads[0].device}, the clipper was built '
                f'for {self._device}; build a new clipper after moving the model')

        try:
            stats = self._clip_present(grads_all, grads, subset)
        except NotImplementedError:
            # torch.cat of the torch-op path fails on a sparse gradient before anything is
            # written; name the parameters instead of showing torch's dispatch error.
            sparse = [name for name, grad in zip(subset['names'], grads)
                      if grad.layout != torch.strided]
            if not sparse:
                raise
            self._step -= 1
            raise ValueError(
                f'GradientClipper: sparse gradient in {", ".join(sparse)}; mode "{self.mode}" '
                'needs dense gradients (modes norm, percentile and zscore accept sparse ones)'
            ) from None
        self.last_stats = stats
        return stats

    def _clip_present(self, grads_all: List[Optional[torch.Tensor]], grads: List[torch.Tensor],
                      subset: Dict[str, Any]) -> ClipStats:
        """Run the path of this mode on the gradients that exist in this call."""
        if not grads:
            return self._record(0.0, 0.0, self._default_threshold(), False, 0.0, [], False,
                                subset, [])
        if self._kernel is not None:
            stats = self._clip_fused(grads, subset)
            if stats is not None:
                return stats
        if self.mode == 'relative':
            return self._clip_relative(grads_all, grads, subset)
        if self._layout is not None:
            return self._clip_flat(grads_all, grads, subset)
        return self._clip_global(grads, subset)

    def _subset(self, key: Optional[Tuple[bool, ...]]) -> Dict[str, Any]:
        """Return the cached names, views and counts of the parameters that have a gradient."""
        subset = self._subsets.get(key)
        if subset is not None:
            return subset

        present = list(range(len(self._params))) if key is None else [
            index for index, has_grad in enumerate(key) if has_grad]
        subset = {
            'indices': present,
            'names': [self.names[index] for index in present],
            'numel': sum(self._params[index].numel() for index in present),
            'units': sum(units_of(self._params[index]) for index in present),
        }
        if self._kernel is not None:
            # The parameters themselves, not detached copies: the kernel reads their storage.
            subset['kernel_weights'] = [self._params[index] for index in present
                                        if self._kernel_rel]
            subset['kernel_low'] = [self._kernel_low[index] for index in present]
            subset['kernel_rel'] = [self._kernel_rel[index] for index in present
                                    if self._kernel_rel]
        if self.mode == 'value':
            subset['bounds'] = [self._bounds[index] for index in present]
            subset['neg_bounds'] = [-self._bounds[index] for index in present]
        if self.mode == 'relative':
            # Per chunk: the gradients to write and the scratch views that hold their values.
            writes = []
            for chunk, views in zip(self._layout.chunks, self._clipped_views):
                members = [index for index in present if chunk.first <= index < chunk.last]
                writes.append((members, [views[index - chunk.first] for index in members]))
            subset['chunk_writes'] = writes
        if self.mode == 'unitwise':
            subset['scale_views'] = [self._scale_views[index] for index in present]
        if self._group_max is not None:
            groups = torch.zeros(len(self._group_max), len(present), dtype=self._stat_dtype)
            for column, index in enumerate(present):
                groups[self._group_of[index], column] = 1.0
            subset['group_matrix'] = groups.to(self._device)
            subset['group_index'] = torch.tensor(
                [self._group_of[index] for index in present], device=self._device)
        self._subsets[key] = subset
        return subset

    def _clip_global(self, grads: List[torch.Tensor], subset: Dict[str, Any],
                     zeroed: Sequence[str] = ()) -> ClipStats:
        norms = torch.stack(torch._foreach_norm(grads))
        total = torch.linalg.vector_norm(norms)
        parts = [norms, total.view(1)]
        if self._group_max is not None:
            group_norms = (subset['group_matrix'] @ norms.to(self._stat_dtype).square()).sqrt()
            parts.append(group_norms.to(norms.dtype))
        host = torch.cat(parts).tolist()

        count = len(grads)
        param_norms = host[:count]
        norm = host[count]
        handled = self._handle_nonfinite(norm, param_norms, grads, subset, zeroed,
                                         self._clip_global)
        if handled is not None:
            return handled
        if not math.isfinite(norm):
            # Every tensor norm is finite, only their sum of squares overflowed.
            norm = math.hypot(*param_norms)
            total = torch.full_like(total, norm)

        if self._group_max is not None:
            return self._clip_norm_groups(grads, subset, zeroed, param_norms, norm,
                                          host[count + 1:], group_norms)

        threshold, clip = self._global_threshold(norm)
        norm_after = norm
        if clip:
            if self.mode == 'norm':
                coefficient = self.config.max_norm / (total + NORM_EPS)
            else:
                coefficient = threshold / (total + NORM_EPS)
            torch._foreach_mul_(grads, coefficient.to(grads[0].dtype))
            norm_after = norm * threshold / (norm + NORM_EPS)
        return self._record(norm, norm_after, threshold, clip, float(clip), zeroed, False,
                            subset, param_norms)

    def _global_threshold(self, norm: float) -> Tuple[Optional[float], bool]:
        if self.mode == 'norm':
            return self.config.max_norm, norm > self.config.max_norm
        if self.mode == 'percentile':
            threshold = self._percentile.threshold_after_adding(norm)
            return threshold, threshold is not None and norm > threshold
        return self._zscore.threshold_and_update(norm)

    def _clip_norm_groups(self, grads, subset, zeroed, param_norms, norm, group_norms_host,
                          group_norms) -> ClipStats:
        limits = self._group_max
        clip_groups = [value > limit for value, limit in zip(group_norms_host, limits)]
        clip = any(clip_groups)
        norm_after = norm
        if clip:
            limit_tensor = self._group_max_tensor
            factors = torch.where(group_norms > limit_tensor,
                                  limit_tensor / (group_norms + NORM_EPS),
                                  torch.ones_like(group_norms))
            per_param = factors[subset['group_index']].to(grads[0].dtype)
            torch._foreach_mul_(grads, list(per_param.unbind()))
            after = [value * limit / (value + NORM_EPS) if flag else value
                     for value, limit, flag in zip(group_norms_host, limits, clip_groups)]
            norm_after = math.sqrt(math.fsum(value * value for value in after))
        return self._record(norm, norm_after, self.config.max_norm, clip, float(clip), zeroed,
                            False, subset, param_norms)

    def _clip_flat(self, grads_all: List[Optional[torch.Tensor]], grads: List[torch.Tensor],
                   subset: Dict[str, Any], zeroed: Sequence[str] = ()) -> ClipStats:
        """Clip in mode ``value`` or ``unitwise``: measure every chunk, then write if allowed."""
        layout = self._layout
        dtype = self._stat_dtype
        inputs = self._cat_inputs(grads_all, len(grads) == len(grads_all))

        # Pass 1 reads every gradient (and weight) once, chunk by chunk, and changes nothing.
        unit_parts: List[torch.Tensor] = []
        after_parts: List[torch.Tensor] = []
        count_parts: List[torch.Tensor] = []
        for chunk in layout.chunks:
            if self.mode == 'unitwise':
                unit_parts += layout.load_pairs(chunk, inputs, self._weight_inputs, dtype)
                continue
            unit_parts += layout.load(chunk, inputs, weights=False, norm_dtype=dtype)
            after_sq, count = self._clip_chunk(chunk)
            after_parts.append(after_sq)
            count_parts.append(count)

        if self.mode == 'unitwise':
            unit_norms, weight_norms = torch.cat(unit_parts, dim=1)
        else:
            unit_norms = torch.cat(unit_parts)
        norms = segment_sum(unit_norms.square(), layout.unit_offsets).sqrt_()
        total = torch.linalg.vector_norm(norms)
        if self.mode == 'unitwise':
            after_sq, count = self._unitwise_scale(unit_norms, weight_norms)
        else:
            after_sq = torch.stack(after_parts).sum()
            count = torch.stack(count_parts).sum()
        host = torch.cat([norms, torch.stack([total, after_sq.to(dtype), count.to(dtype)])])
        host = host.tolist()

        all_norms = host[:-3]
        param_norms = all_norms if len(grads) == len(all_norms) else [
            all_norms[index] for index in subset['indices']]
        norm, norm_after_sq, clipped_count = host[-3:]
        handled = self._handle_nonfinite(
            norm, param_norms, grads, subset, zeroed,
            lambda grads, subset, zeroed: self._clip_flat(grads_all, grads, subset, zeroed))
        if handled is not None:
            return handled
        if not math.isfinite(norm):
            norm = math.hypot(*param_norms)

        # Pass 2 writes the gradients, only now that no policy stops the step.
        clipped_count = round(clipped_count)
        clip = clipped_count > 0
        if clip and self.mode == 'value':
            if self._element_bound is None:
                torch._foreach_clamp_min_(grads, -self._value_bound)
                torch._foreach_clamp_max_(grads, self._value_bound)
            else:
                torch._foreach_clamp_min_(grads, subset['neg_bounds'])
                torch._foreach_clamp_max_(grads, subset['bounds'])
        elif clip:
            torch._foreach_mul_(grads, subset['scale_views'])
        return self._count_record(norm, norm_after_sq, clipped_count, zeroed, subset,
                                  param_norms)

    def _cat_inputs(self, grads_all: List[Optional[torch.Tensor]],
                    complete: bool) -> List[torch.Tensor]:
        """Return the gradients for torch.cat: zeros for missing ones, 0-d ones as [1]."""
        scalars = self._layout.scalar_indices
        if complete and not scalars:
            return grads_all
        inputs = list(grads_all)
        for index, grad in enumerate(inputs):
            if grad is None:
                zeros = self._placeholders.get(index)
                if zeros is None:
                    zeros = torch.zeros_like(self._params[index])
                    self._placeholders[index] = zeros
                inputs[index] = zeros
        for index in scalars:
            inputs[index] = inputs[index].view(1)
        return inputs

    def _clip_chunk(self, chunk: Chunk) -> Tuple[torch.Tensor, torch.Tensor]:
        """Clamp one chunk of mode ``value`` into scratch and return (sum of squares, count)."""
        flat = self._layout.scratch(chunk)
        clipped = self._clipped_scratch[:chunk.numel]
        if self._element_bound is None:
            torch.clamp(flat, -self._value_bound, self._value_bound, out=clipped)
        else:
            bound = self._element_bound[chunk.base:chunk.base + chunk.numel]
            torch.neg(bound, out=clipped)
            torch.clamp(flat, min=clipped, max=bound, out=clipped)
        return self._chunk_statistics(flat, clipped)

    def _chunk_statistics(self, flat: torch.Tensor, clipped: torch.Tensor):
        """Return the sum of squares of ``clipped`` and the count of changed elements.

        ``flat`` is overwritten with 1.0 where an element changed and 0.0 elsewhere.
        """
        after_sq = _sum_of_squares(clipped, self._stat_dtype)
        flat.ne_(clipped)
        return after_sq, flat.sum(dtype=self._stat_dtype)

    def _clip_relative(self, grads_all: List[Optional[torch.Tensor]],
                       grads: List[torch.Tensor], subset: Dict[str, Any],
                       zeroed: Sequence[str] = ()) -> ClipStats:
        """Clip element-wise against the weights in one pass that also writes the gradients.

        The per-parameter norms come first, so that a non-finite gradient can make every bound
        infinite on the device: the pass then writes back the values it read, and policies
        ``skip`` and ``error`` still leave the gradients as they were.
        """
        layout = self._layout
        dtype = self._stat_dtype
        norms = torch.stack(torch._foreach_norm(grads))
        total = torch.linalg.vector_norm(norms)
        finite = torch.isfinite(norms).all()
        floor = torch.where(finite, self._abs_floor, math.inf)
        inputs = self._cat_inputs(grads_all, len(grads) == len(grads_all))

        after_parts: List[torch.Tensor] = []
        count_parts: List[torch.Tensor] = []
        for chunk, (members, views) in zip(layout.chunks, subset['chunk_writes']):
            layout.load(chunk, inputs, weights=False, norm_dtype=None)
            layout.load(chunk, self._weight_inputs, weights=True, norm_dtype=None)
            flat = layout.scratch(chunk)
            bound = layout.scratch(chunk, weights=True)
            # A NaN product (0 * inf from a huge rel_tol, or a non-finite weight) becomes 0, so
            # the bound is abs_tol and not NaN. torch.fmax does the same about 30x slower (CPU).
            bound.abs_()
            if self._element_rel is None:
                bound.mul_(self.config.rel_tol).nan_to_num_(nan=0.0, posinf=math.inf)
                bound.clamp_min_(floor)
            else:
                start, end = chunk.base, chunk.base + chunk.numel
                bound.mul_(self._element_rel[start:end]).nan_to_num_(nan=0.0, posinf=math.inf)
                torch.maximum(bound, self._element_abs[start:end], out=bound)
                bound.clamp_min_(floor - self._abs_tol)
            clipped = self._clipped_scratch[:chunk.numel]
            torch.neg(bound, out=clipped)
            torch.clamp(flat, min=clipped, max=bound, out=clipped)
            after_sq, count = self._chunk_statistics(flat, clipped)
            after_parts.append(after_sq)
            count_parts.append(count)
            torch._foreach_copy_([grads_all[index] for index in members], views)

        after_sq = torch.stack(after_parts).sum()
        count = torch.stack(count_parts).sum()
        host = torch.cat([norms.to(dtype), torch.stack([total.to(dtype), after_sq.to(dtype),
                                                        count.to(dtype)])]).tolist()
        param_norms = host[:-3]
        norm, norm_after_sq, clipped_count = host[-3:]
        handled = self._handle_nonfinite(
            norm, param_norms, grads, subset, zeroed,
            lambda grads, subset, zeroed: self._clip_relative(grads_all, grads, subset, zeroed))
        if handled is not None:
            return handled
        if not math.isfinite(norm):
            norm = math.hypot(*param_norms)

        return self._count_record(norm, norm_after_sq, round(clipped_count), zeroed, subset,
                                  param_norms)

    def _clip_fused(self, grads: List[torch.Tensor], subset: Dict[str, Any],
                    zeroed: Sequence[str] = ()) -> Optional[ClipStats]:
        """Clip in mode ``value``, ``relative`` or ``unitwise`` with the compiled kernel.

        The kernel writes nothing when a gradient norm is not finite, like the torch-op path.
        Returns None, before anything is written, when the kernel rejects the gradients (for
        example a sparse one, an inference tensor, or one laid out unlike its weight). The
        caller then uses torch ops.
        """
        try:
            if self.mode == 'unitwise':
                result = self._kernel.clip_unitwise(grads, subset['kernel_weights'],
                                                    subset['kernel_low'], subset['kernel_rel'],
                                                    self.config.eps)
            else:
                result = self._kernel.clip_elementwise(grads, subset['kernel_weights'],
                                                       subset['kernel_low'],
                                                       subset['kernel_rel'])
        except RuntimeError as error:
            self.kernel_rejections += 1
            if self.kernel_rejections == 1:
                LOGGER.warning('fused clipping kernel rejected the gradients, using torch ops '
                               'for such calls: %s', str(error).splitlines()[0])
            return None

        host = result.tolist()
        param_norms = host[:-3]
        norm, norm_after_sq, clipped_count = host[-3:]
        handled = self._handle_nonfinite(norm, param_norms, grads, subset, zeroed,
                                         self._clip_fused)
        if handled is not None:
            return handled
        if not math.isfinite(norm):
            # Every tensor norm is finite, only their sum of squares overflowed float64.
            norm = math.hypot(*param_norms)

        return self._count_record(norm, norm_after_sq, round(clipped_count), zeroed, subset,
                                  param_norms)

    def _count_record(self, norm: float, norm_after_sq: float, clipped_count: int,
                      zeroed: Sequence[str], subset: Dict[str, Any],
                      param_norms: List[float]) -> ClipStats:
        """Return the record of a value, relative or unitwise call from its clip count.

        ``clipped_count`` counts changed elements, or scaled units in mode unitwise.
        """
        clip = clipped_count > 0
        norm_after = math.sqrt(max(norm_after_sq, 0.0)) if clip else norm
        total_count = subset['units'] if self.mode == 'unitwise' else subset['numel']
        return self._record(norm, norm_after, self._abs_tol, clip, clipped_count / total_count,
                            zeroed, False, subset, param_norms)

    def _unitwise_scale(self, unit_norms: torch.Tensor, weight_norms: torch.Tensor):
        """Write the scale per unit and return (sum of squares after, clipped unit count)."""
        # A NaN product (a NaN weight, or 0 * inf) becomes 0, so the bound is abs_tol.
        products = weight_norms.clamp_min_(self.config.eps).mul_(self._unit_rel)
        bounds = torch.maximum(products.nan_to_num_(nan=0.0, posinf=math.inf), self._unit_abs)
        clipped = unit_norms > bounds
        scale = torch.where(clipped, bounds / unit_norms, 1.0)
        self._scale.copy_(scale)
        after_sq = _sum_of_squares(unit_norms * scale, self._stat_dtype)
        return after_sq, clipped.sum()

    def _handle_nonfinite(self, norm, param_norms, grads, subset, zeroed, again):
        """Apply ``on_nonfinite`` and return the finished record, or None to go on clipping."""
        if math.isfinite(norm):
            return None
        bad = [index for index, value in enumerate(param_norms) if not math.isfinite(value)]
        if not bad:
            return None

        names = [subset['names'][index] for index in bad]
        policy = self.config.on_nonfinite
        if policy == 'error':
            self._step -= 1
            raise FloatingPointError(
                f'GradientClipper: non-finite gradient in {len(names)} parameter(s): '
                f'{", ".join(names)}; gradients were left unchanged')
        if policy == 'zero':
            for index in bad:
                grads[index].zero_()
            return again(grads, subset, list(zeroed) + names)
        return self._record(norm, norm, self._default_threshold(), False, 0.0, names, True,
                            subset, param_norms)

    def _default_threshold(self) -> Optional[float]:
        if self.mode in _FLAT_MODES:
            return self._abs_tol
        return self.config.max_norm

    def _record(self, norm, norm_after, threshold, clip, fraction, nonfinite_names, skip,
                subset, param_norms) -> ClipStats:
        if len(self._clip_history) == self._clip_history.maxlen:
            self._clip_count -= self._clip_history[0]
        self._clip_history.append(int(clip))
        self._clip_count += int(clip)

        names = subset['names']
        ranking = param_norms
        if nonfinite_names or not math.isfinite(norm):
            # NaN sorts first: a parameter that produced one is the first to look at.
            ranking = [value if value == value else math.inf for value in param_norms]
        top = heapq.nlargest(self.config.top_k, range(len(ranking)), key=ranking.__getitem__)
        config = self.config
        element_modes = self.mode in ('relative', 'unitwise')
        return ClipStats(
            step=self._step,
            mode=self.mode,
            norm_before=float(norm),
            norm_after=float(norm_after),
            threshold=None if threshold is None else float(threshold),
            clipped=bool(clip),
            clip_fraction=float(fraction),
            nonfinite_count=len(nonfinite_names),
            skip_step=skip,
            clip_rate=self._clip_count / len(self._clip_history),
            abs_tol=self._abs_tol if self.mode in _FLAT_MODES else None,
            rel_tol=config.rel_tol if element_modes else None,
            nonfinite_names=list(nonfinite_names),
            top_norms=[(names[i], float(param_norms[i])) for i in top],
        )

    # ----------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> Dict[str, Any]:
        """Return the adaptive state as plain Python values (loadable with weights_only=True).

        Keys: ``format``, ``mode``, ``step``, ``clip_history`` (0/1 per recent call),
        ``norm_history`` (percentile window, oldest first), ``warmup_norms``, ``ema_mean`` and
        ``ema_var`` (zscore; None before warm-up ends).
        """
        state = {
            'format': _STATE_FORMAT,
            'mode': self.mode,
            'step': self._step,
            'clip_history': list(self._clip_history),
            'norm_history': [],
            'warmup_norms': [],
            'ema_mean': None,
            'ema_var': None,
        }
        if self._percentile is not None:
            state['norm_history'] = list(self._percentile.norms)
        if self._zscore is not None:
            state['warmup_norms'] = list(self._zscore.warmup_norms)
            state['ema_mean'] = self._zscore.mean
            state['ema_var'] = self._zscore.var
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned; a longer history keeps its newest part."""
        expected = set(self.state_dict())
        if not isinstance(state, Mapping) or set(state) != expected:
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f'GradientClipper.load_state_dict: expected keys {sorted(expected)}, got {keys}')
        if state['format'] != _STATE_FORMAT:
            raise ValueError(
                f'GradientClipper.load_state_dict: unsupported format {state["format"]!r}; '
                f'expected {_STATE_FORMAT}')
        if state['mode'] != self.mode:
            raise ValueError(
                f'GradientClipper.load_state_dict: state is for mode "{state["mode"]}", this '
                f'clipper runs mode "{self.mode}"')

        self._step = int(state['step'])
        self._clip_history.clear()
        self._clip_history.extend(int(flag) for flag in state['clip_history'])
        self._clip_count = sum(self._clip_history)
        if self._percentile is not None:
            self._percentile = PercentileHistory(self.config)
            self._percentile.norms.extend(float(value) for value in state['norm_history'])
            self._percentile.ordered = sorted(self._percentile.norms)
        if self._zscore is not None:
            zscore = ZScoreStatistics(self.config)
            zscore.warmup_norms = [float(value) for value in state['warmup_norms']]
            if state['ema_mean'] is not None:
                zscore.mean = float(state['ema_mean'])
                zscore.var = float(state['ema_var'])
            self._zscore = zscore


def _pick(override: Optional[float], default: Any) -> Any:
    return default if override is None else override
