"""Scratch buffers that let the clipper reduce many small tensors with a few large ops.

On CPU every op on a tensor costs about a microsecond before any arithmetic, and a detector
has hundreds of small parameter tensors. The element-wise and unitwise clipping modes
therefore concatenate the gradients (and weights) of parameters that share their trailing
shape into one [units, *trailing] block with one ``torch.cat``, and compute the unit norms of
a block with one ``vector_norm``. Blocks are packed into chunks of about ``CHUNK_ELEMENTS``
elements that reuse one scratch buffer. The few ops on a chunk then run while it is still in
the CPU cache, and the memory cost is one chunk instead of the whole model.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

# Rows shorter than this get their squared norms from a matrix-vector product, which measured
# 2-3x faster than vector_norm(dim=1) for rows of 9 to 25 elements (torch 2.14, one CPU thread).
SHORT_ROW = 32

# Elements per chunk: 256 KiB of float32 per scratch buffer, so that the two or three scratch
# buffers of a mode fit a 1 MiB L2 cache, common on x86 server cores. On a 2-core EPYC VM it was
# the fastest power of two from 2**16 to 2**22 in benchmarks/clipping.py.
CHUNK_ELEMENTS = 1 << 16


def offsets_of(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """Return the start of every segment plus the total, int64 [len(counts) + 1]."""
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    return torch.tensor(offsets, dtype=torch.long, device=device)


def segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over the segments that ``offsets`` (from ``offsets_of``) delimit."""
    # unsafe=True skips a validation of the offsets, which are built once and valid. With
    # offsets it measured 45 % faster than with lengths (torch 2.14, CPU, 168 segments).
    return torch.segment_reduce(values, 'sum', offsets=offsets, unsafe=True)


def units_of(param: torch.Tensor) -> int:
    """Return the unit count: rows along dim 0 with 2 or more dims, else one unit."""
    return param.shape[0] if param.dim() >= 2 else 1


def group_key(param: torch.Tensor) -> Tuple:
    """Return the key of the block a parameter joins: its trailing shape, or 'vector'."""
    if param.dim() >= 2:
        return ('rows',) + tuple(param.shape[1:])
    return ('vector',)


@dataclass
class Block:
    """Parameters ``first``..``last - 1`` (in layout order) that one ``torch.cat`` joins.

    ``grad_out`` / ``weight_out`` are scratch views in the concatenated shape. ``rows`` is
    True for a [units, length] block of parameters with 2 or more dims. It is False for a
    vector block of 1-D (or 0-d) parameters, whose units are whole tensors that start at
    ``offsets`` (which end with the block's element count).
    """

    first: int
    last: int
    rows: bool
    units: int
    numel: int
    offset: int = 0
    grad_out: Optional[torch.Tensor] = None
    weight_out: Optional[torch.Tensor] = None
    pair_out: Optional[torch.Tensor] = None
    offsets: Optional[torch.Tensor] = None
    pair_offsets: Optional[torch.Tensor] = None
    ones: Optional[torch.Tensor] = None

    def unit_norms(self, out: torch.Tensor, copies: int, dtype: torch.dtype) -> torch.Tensor:
        """Return the L2 norm of every unit in ``out`` (the block's scratch view), [units]."""
        if not self.rows:
            squares = out.to(dtype).square()
            offsets = self.pair_offsets if copies == 2 else self.offsets
            return segment_sum(squares, offsets).sqrt_()
        rows = out.view(copies * self.units, -1)
        if self.ones is not None:
            return torch.mv(rows.to(dtype).square(), self.ones).sqrt_()
        return torch.linalg.vector_norm(rows, dim=1, dtype=dtype)


@dataclass
class Chunk:
    """Consecutive blocks that share the scratch buffers; ``base`` is its first element."""

    blocks: List[Block]
    base: int
    numel: int

    @property
    def first(self) -> int:
        return self.blocks[0].first

    @property
    def last(self) -> int:
        return self.blocks[-1].last


class GroupLayout:
    """Blocks and chunks of the clipper's parameters, which must come sorted by ``group_key``.

    ``grad`` and ``weight`` are chunk-sized scratch buffers for separate loads, ``pair`` one of
    twice that size for ``load_pairs``. ``offsets`` gives each parameter's first element in
    the whole-model order, which full-size per-element threshold tensors follow.
    """

    def __init__(self, params: Sequence[torch.Tensor], need_weights: bool = False,
                 paired: bool = False, chunk_elements: int = CHUNK_ELEMENTS):
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.sizes = [param.numel() for param in params]
        self.units = [units_of(param) for param in params]
        self.numel = sum(self.sizes)
        self.unit_count = sum(self.units)
        self.offsets = []
        offset = 0
        for size in self.sizes:
            self.offsets.append(offset)
            offset += size
        self.unit_offsets = offsets_of(self.units, self.device)
        self.scalar_indices = [index for index, param in enumerate(params) if param.dim() == 0]

        self.chunks = self._plan(params, chunk_elements)
        scratch = max(chunk.numel for chunk in self.chunks)
        self.grad = self.weight = self.pair = None
        if paired:
            self.pair = torch.zeros(2 * scratch, dtype=self.dtype, device=self.device)
        else:
            self.grad = torch.zeros(scratch, dtype=self.dtype, device=self.device)
        if need_weights:
            self.weight = torch.zeros(scratch, dtype=self.dtype, device=self.device)
        for chunk in self.chunks:
            for block in chunk.blocks:
                if not paired:
                    block.grad_out = self._block_view(self.grad, params, block)
                if need_weights:
                    block.weight_out = self._block_view(self.weight, params, block)
                if paired:
                    block.pair_out = self._block_view(self.pair, params, block, copies=2)
                    if not block.rows:
                        sizes = self.sizes[block.first:block.last]
                        block.pair_offsets = offsets_of(sizes + sizes, self.device)

    def _plan(self, params: Sequence[torch.Tensor], chunk_elements: int) -> List[Chunk]:
        blocks: List[Block] = []
        for index, param in enumerate(params):
            key = group_key(param)
            if blocks and group_key(params[blocks[-1].first]) == key:
                block = blocks[-1]
                block.last = index + 1
                block.units += self.units[index]
                block.numel += self.sizes[index]
            else:
                blocks.append(Block(index, index + 1, param.dim() >= 2, self.units[index],
                                    self.sizes[index]))
        for block in blocks:
            if not block.rows:
                block.offsets = offsets_of(self.sizes[block.first:block.last], self.device)
            elif block.numel // block.units < SHORT_ROW:
                stat_dtype = torch.promote_types(self.dtype, torch.float32)
                block.ones = torch.ones(block.numel // block.units, dtype=stat_dtype,
                                        device=self.device)

        chunks: List[Chunk] = []
        for block in blocks:
            if block.numel > chunk_elements:
                block.offset = 0
                chunks.append(Chunk([block], self.offsets[block.first], block.numel))
                continue
            if not chunks or chunks[-1].numel + block.numel > chunk_elements:
                chunks.append(Chunk([], self.offsets[block.first], 0))
            block.offset = chunks[-1].numel
            chunks[-1].blocks.append(block)
            chunks[-1].numel += block.numel
        return chunks

    @staticmethod
    def _block_view(buffer: torch.Tensor, params: Sequence[torch.Tensor], block: Block,
                    copies: int = 1) -> torch.Tensor:
        start = copies * block.offset
        region = buffer[start:start + copies * block.numel]
        if block.rows:
            return region.view((copies * block.units,) + tuple(params[block.first].shape[1:]))
        return region

    def load(self, chunk: Chunk, tensors: Sequence[torch.Tensor], weights: bool,
             norm_dtype: Optional[torch.dtype]) -> List[torch.Tensor]:
        """Concatenate the chunk's ``tensors`` into scratch and return unit norms per block.

        ``tensors`` is in layout order, 0-d entries already viewed as [1]. With
        ``norm_dtype`` None nothing is reduced and the list is empty.
        """
        norms = []
        for block in chunk.blocks:
            out = block.weight_out if weights else block.grad_out
            torch.cat(tensors[block.first:block.last], out=out)
            if norm_dtype is not None:
                norms.append(block.unit_norms(out, 1, norm_dtype))
        return norms

    def load_pairs(self, chunk: Chunk, grads: Sequence[torch.Tensor],
                   weights: Sequence[torch.Tensor], norm_dtype: torch.dtype) -> List[torch.Tensor]:
        """Concatenate gradients and weights per block and return [2, units] norms per block.

        Row 0 contains the gradient unit norms, row 1 the weight unit norms. One cat and one
        norm per block cover both, which halves the op count of separate loads.
        """
        norms = []
        for block in chunk.blocks:
            out = block.pair_out
            torch.cat(list(grads[block.first:block.last]) + list(weights[block.first:block.last]),
                      out=out)
            norms.append(block.unit_norms(out, 2, norm_dtype).view(2, -1))
        return norms

    def scratch(self, chunk: Chunk, weights: bool = False) -> torch.Tensor:
        """Return the flat scratch region [chunk.numel] that contains the chunk's tensors."""
        buffer = self.weight if weights else self.grad
        return buffer[:chunk.numel]

    def param_views(self, buffer: torch.Tensor, params: Sequence[torch.Tensor],
                    per_unit: bool = False) -> List[torch.Tensor]:
        """Return per-parameter views of a full-size buffer in layout order.

        With ``per_unit`` the buffer contains one value per unit ([U]) and each view is shaped to
        broadcast over its parameter: [units, 1, ...], [1] or [] for a 0-d one.
        """
        views = []
        offset = 0
        for param, size, units in zip(params, self.sizes, self.units):
            if per_unit:
                if param.dim() >= 2:
                    shape = (units,) + (1,) * (param.dim() - 1)
                else:
                    shape = (1,) * param.dim()
                views.append(buffer[offset:offset + units].view(shape))
                offset += units
            else:
                views.append(buffer[offset:offset + size].view(param.shape))
                offset += size
        return views

    def chunk_views(self, buffer: torch.Tensor,
                    params: Sequence[torch.Tensor]) -> List[List[torch.Tensor]]:
        """Return, per chunk, views of a chunk-sized buffer shaped like the chunk's parameters."""
        result = []
        for chunk in self.chunks:
            views = []
            offset = 0
            for index in range(chunk.first, chunk.last):
                size = self.sizes[index]
                views.append(buffer[offset:offset + size].view(params[index].shape))
                offset += size
            result.append(views)
        return result

    def fill(self, values: Sequence[float], per_unit: bool) -> torch.Tensor:
        """Expand one number per parameter to a tensor per unit ([U]) or per element ([N])."""
        counts = self.units if per_unit else self.sizes
        # Built in float64 and converted, so a value beyond the dtype's range becomes inf
        # instead of raising.
        parts = [torch.full((count,), value, dtype=torch.float64)
                 for value, count in zip(values, counts)]
        return torch.cat(parts).to(device=self.device, dtype=self.dtype)
