"""The two matrix passes of a selection step over a block of snapshot columns.

For mixing weights ``A`` (M, k), oldest snapshot first, and the stored rows ``Θ`` (k, S) in
slot order (``order[i]`` is the row of the ``i``-th oldest snapshot):

    W = A Θ          (M, S)   the mixed parameters
    ∂L/∂A = G Θᵀ     (M, k)   from the gradient ``G = ∂L/∂W`` (M, S)

``S`` is all ``P`` parameters in one process, or one rank's columns in :mod:`sewa.distributed`;
the engines hold a :class:`Columns` for either.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["Columns"]

# float32 scratch per chunk when widening compact storage: cache-sized on CPU; on a GPU large,
# since each chunk costs a few kernel launches (4 MiB chunks made a bf16 step 90x its floor).
_CHUNK_BYTES = 1 << 22
_CHUNK_BYTES_GPU = 1 << 28


class Columns:
    """``A Θ`` and ``G Θᵀ`` over stored rows, widened chunk by chunk from compact storage.

    Args:
        rows: The stored rows ``Θ`` (k, S), any floating dtype; moved once to ``device``.
        order: Row of each snapshot, oldest first (k,).
        device: Compute device (default: the rows').
        dtype: Compute dtype of ``W``, ``G`` and ``∂L/∂A``.
    """

    def __init__(self, rows: Tensor, order: Tensor, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device) if device is not None else rows.device
        self.dtype = dtype
        self.rows = rows.to(self.device)
        self.order = order.to(self.device)
        self.inverse = torch.empty_like(self.order)  # oldest-first position of each row
        self.inverse[self.order] = torch.arange(len(order), device=self.device)
        self._scratch: Tensor | None = None
        self._mixed: Tensor | None = None

    @property
    def width(self) -> int:
        """``S``: how many columns are held."""
        return int(self.rows.shape[1])

    def to_rows(self, mix: Tensor) -> Tensor:
        """``A`` (M, k) oldest first, as weights on the rows in slot order, in the compute dtype."""
        return mix.to(self.device, self.dtype)[:, self.inverse]

    def to_oldest(self, g_rows: Tensor, like: Tensor) -> Tensor:
        """``∂L/∂A`` per row back to oldest-first order, on ``like``'s device and dtype."""
        return g_rows[:, self.order].to(like.device, like.dtype)

    def chunks(self) -> Iterator[slice]:
        """Column ranges whose float scratch stays within the chunk budget (one range when
        storage is in the compute dtype)."""
        p = self.width
        chunk = _CHUNK_BYTES if self.device.type == "cpu" else _CHUNK_BYTES_GPU
        step = p if self.rows.dtype == self.dtype else max(1024, chunk // (4 * self.rows.shape[0]))
        for start in range(0, p, max(1, step)):
            yield slice(start, min(p, start + step))

    def _float_rows(self, cols: slice) -> Tensor:
        block = self.rows[:, cols]
        if block.dtype == self.dtype:
            return block
        width = cols.stop - cols.start
        if self._scratch is None or self._scratch.shape[1] < width:
            self._scratch = torch.empty(self.rows.shape[0], width, device=self.device, dtype=self.dtype)
        scratch = self._scratch[:, :width]
        scratch.copy_(block)
        return scratch

    def mix_into(self, a_rows: Tensor, out: Tensor) -> Tensor:
        """``W = A Θ`` written into ``out`` (M, S); ``a_rows`` from :meth:`to_rows`."""
        for cols in self.chunks():
            if cols.stop - cols.start == self.width:
                torch.mm(a_rows, self._float_rows(cols), out=out)
            else:
                out[:, cols] = a_rows @ self._float_rows(cols)
        return out

    def mix(self, a_rows: Tensor) -> Tensor:
        """``W = A Θ`` (M, S) into a buffer reused across calls."""
        m = a_rows.shape[0]
        if self._mixed is None or self._mixed.shape[0] != m:
            self._mixed = torch.empty(m, self.width, device=self.device, dtype=self.dtype)
        return self.mix_into(a_rows, self._mixed)

    def grad(self, g: Tensor) -> Tensor:
        """``∂L/∂A = G Θᵀ`` (M, k) per row in slot order, from ``G`` (M, S)."""
        if self.width == 0:
            return torch.zeros(g.shape[0], self.rows.shape[0], device=self.device, dtype=self.dtype)
        if self.rows.dtype == self.dtype:
            return torch.mm(g, self.rows.T)
        out = torch.zeros(g.shape[0], self.rows.shape[0], device=self.device, dtype=self.dtype)
        for cols in self.chunks():
            out.addmm_(g[:, cols], self._float_rows(cols).T)
        return out
