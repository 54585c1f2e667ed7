"""The selection engine: loss of M mixed models and its gradient w.r.t. the mixing weights.

For mixing weights ``A`` (M, k) over the snapshot matrix ``Θ`` (k, P):

    W = A Θ                         one matrix product (chunked over P for compact storage)
    G = ∂/∂W (1/M) Σ_j L(f(W_j))    M forward/backward passes, vmapped over j
    ∂L/∂A = G Θᵀ                    one more matrix product

so the cost is two reads of ``Θ`` plus the model's own compute, and no autograd graph ever
spans the snapshots.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from .trajectory import Trajectory, canonical_name

__all__ = ["MixedLoss", "cycle_batches", "to_device", "functional_forward", "selection_model"]

# float32 scratch per chunk when widening compact storage: cache-sized on CPU; on a GPU large,
# since each chunk costs a few kernel launches (4 MiB chunks made a bf16 step 90x its floor).
_CHUNK_BYTES = 1 << 22
_CHUNK_BYTES_GPU = 1 << 28


def to_device(x: Any, device: torch.device) -> Any:
    """Moves tensors nested in tuples, lists and dicts to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def functional_forward(model: nn.Module, params: dict[str, Tensor], inputs: Any) -> Any:
    """Calls ``model`` with ``params`` on a tensor, a tuple of positional inputs, or a dict of
    keyword inputs."""
    if isinstance(inputs, dict):
        return functional_call(model, params, (), inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, params, tuple(inputs))
    return functional_call(model, params, (inputs,))


def cycle_batches(batches: Iterable[Any]) -> Iterator[Any]:
    """Yields batches forever, re-iterating ``batches`` (cached if it is a one-shot iterator)."""
    if iter(batches) is batches:
        batches = list(batches)
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("the selection split has no batches: pass a non-empty iterable of (inputs, targets)")


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    return batch[0], batch[1]


def selection_model(model: nn.Module, batch_stats: bool, device: torch.device) -> nn.Module:
    """A private copy of ``model`` for functional calls: eval mode, no grads, and BatchNorm
    layers on batch statistics when ``batch_stats`` (running statistics of mixed weights are
    meaningless)."""
    model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    if batch_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
                m.num_batches_tracked = None
    return model


class MixedLoss:
    """``(A, batch) -> (loss, ∂loss/∂A)`` for mixing weights ``A`` (M, k) over a trajectory.

    Three ways to run the ``M`` forward/backward passes give the same numbers:

    - *direct loop* (the default on CPU): the private model's parameters are pointed at the rows
      of ``W`` in turn (``param.data = view``) and ``loss.backward()`` accumulates straight into
      the rows of ``G``: a plain forward/backward per sample, without ``torch.func`` overhead;
    - *functional loop*: :func:`torch.func.functional_call` per sample (models the direct loop
      cannot drive: recorded buffers, dtypes other than ``W``'s, wrapped or hooked models);
    - *vmap*: :func:`torch.func.vmap` over the samples (the default elsewhere, when the model
      supports it).

    In :meth:`__call__` the direct loop writes ``G_j`` over ``W_j`` once sample ``j``'s backward
    is done, so ``W`` and ``G`` share one ``(M, P)`` buffer, reused across steps.

    Args:
        trajectory: The snapshots; its rows are read in place (moved once if ``device``
            differs).
        model: Defines the architecture; copied.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batch_stats: BatchNorm on batch statistics.
        vectorize: ``True``: vmap over M; ``False``: loop; ``None``: loop on CPU, elsewhere vmap
            when it works.
        device: Compute device (default: the trajectory's).
    """

    # Subclasses (sewa.distributed) set the attributes that mix(), grad_mix() and model_grad()
    # read without calling __init__; these lazily-filled ones default here.
    _buffer: Tensor | None = None
    _vmapped: Callable[..., tuple[Tensor, Tensor]] | None = None
    _direct: list[nn.Parameter | None] | None = None
    _direct_checked: bool = False
    _used: list[bool] | None = None
    dtype: torch.dtype = torch.float32

    def __init__(
        self,
        trajectory: Trajectory,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        *,
        batch_stats: bool = True,
        vectorize: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        trajectory.check_compatible(model)
        rows, order = trajectory.matrix()
        self.dtype = dtype  # compute dtype of W, G and the passes (float64 for exact checks)
        self.device = torch.device(device) if device is not None else rows.device
        self.rows = rows.to(self.device)
        self.order = order.to(self.device)
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(len(order), device=self.device)
        self.names = trajectory.names
        self.views = trajectory.views
        self.model = selection_model(model, batch_stats, self.device)
        named = {canonical_name(n): p for n, p in self.model.named_parameters()}
        for name in self.names:
            if name in named:  # every pass replaces them with rows of W: drop the copy's values
                named[name].data = named[name].data.new_empty(0)
        self.loss_fn = loss_fn
        self.vectorize = vectorize
        self._checked = False
        self._mixed: Tensor | None = None
        self._scratch: Tensor | None = None

    # -- the two matrix passes -------------------------------------------------------
    def _chunks(self) -> Iterator[slice]:
        p = self.rows.shape[1]
        chunk = _CHUNK_BYTES if self.device.type == "cpu" else _CHUNK_BYTES_GPU
        step = p if self.rows.dtype == self.dtype else max(1024, chunk // (4 * self.rows.shape[0]))
        for start in range(0, p, step):
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

    def _mix_into(self, a_rows: Tensor, out: Tensor) -> Tensor:
        p = self.rows.shape[1]
        for cols in self._chunks():
            if cols.stop - cols.start == p:
                torch.mm(a_rows, self._float_rows(cols), out=out)
            else:
                out[:, cols] = a_rows @ self._float_rows(cols)
        return out

    def mix(self, a_rows: Tensor) -> Tensor:
        """``W = A Θ`` (M, P) in the compute dtype, into a buffer reused across steps."""
        m, p = a_rows.shape[0], self.rows.shape[1]
        if self._mixed is None or self._mixed.shape[0] != m:
            self._mixed = torch.empty(m, p, device=self.device, dtype=self.dtype)
        return self._mix_into(a_rows, self._mixed)

    def grad_mix(self, g: Tensor) -> Tensor:
        """``∂L/∂A = G Θᵀ`` (M, k)."""
        if self.rows.dtype == self.dtype:
            return torch.mm(g, self.rows.T)
        out = torch.zeros(g.shape[0], self.rows.shape[0], device=self.device, dtype=self.dtype)
        for cols in self._chunks():
            out.addmm_(g[:, cols], self._float_rows(cols).T)
        return out

    # -- the model -------------------------------------------------------------------
    def _used_names(self) -> list[bool]:
        """Per recorded name, whether the model uses it: recorded BatchNorm statistics play no
        part on batch statistics (:func:`selection_model` dropped them), so they are neither
        passed in nor differentiated; their gradient is zero."""
        if self._used is None:
            modules = dict(self.model.named_modules())
            used = []
            for name in self.names:
                owner, _, attr = name.rpartition(".")
                module = modules.get(owner)
                used.append(not (isinstance(module, nn.modules.batchnorm._BatchNorm)
                                 and attr in ("running_mean", "running_var") and getattr(module, attr) is None))
            self._used = used
        return self._used

    def _loss(self, flat: Tensor, inputs: Any, targets: Any) -> Tensor:
        params = {n: v for n, v, u in zip(self.names, self.views(flat), self._used_names(), strict=True) if u}
        return self.loss_fn(functional_forward(self.model, params, inputs), targets)

    def _check(self, flat: Tensor, inputs: Any, targets: Any) -> None:
        loss = self._loss(flat, inputs, targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}: reduce it with .mean()")
        if self.vectorize is None and flat.device.type == "cpu":
            # On CPU a batched pass costs what M plain passes cost, and vmap adds its own
            # overhead (about 10x the model's time for tiny models): loop.
            self.vectorize = False
        elif self.vectorize is None:
            try:
                self._vmap()(flat[None].clone(), inputs, targets)
                self.vectorize = True
            except Exception:  # an op without a batching rule: loop over samples instead
                self.vectorize = False
        self._checked = True

    def _vmap(self) -> Callable[..., tuple[Tensor, Tensor]]:
        if self._vmapped is None:  # built once: rebuilding the transform costs time every step
            self._vmapped = vmap(grad_and_value(self._loss), in_dims=(0, None, None))
        return self._vmapped

    def _direct_params(self, mixed: Tensor) -> list[nn.Parameter | None] | None:
        """The private model's parameters in trajectory order (``None`` for unused names),
        when the direct loop can drive them: every used recorded tensor is a parameter of
        ``W``'s dtype and device, and nothing (DDP, compilation, FSDP, tensor hooks) acts on
        the parameters behind our back."""
        if not self._direct_checked:
            self._direct_checked = True
            modules = list(self.model.modules())
            wrapped = any(isinstance(m, nn.parallel.DistributedDataParallel) or hasattr(m, "_orig_mod")
                          or type(m).__name__.startswith("FSDP") for m in modules)
            named = {canonical_name(n): p for n, p in self.model.named_parameters()}
            params = [named.get(n) if u else None for n, u in zip(self.names, self._used_names(), strict=True)]
            missing = any(p is None and u for p, u in zip(params, self._used_names(), strict=True))
            ok = not wrapped and not missing and all(
                p is None or (type(p) is nn.Parameter and not p._backward_hooks
                              and not getattr(p, "_post_accumulate_grad_hooks", None)) for p in params)
            self._direct = params if ok else None
            for p in self._direct or []:
                if p is not None:
                    p.requires_grad_(True)
        direct = self._direct
        if direct is None or any(p is not None and (p.dtype != mixed.dtype or p.device != mixed.device) for p in direct):
            return None
        return direct

    def model_grad(self, mixed: Tensor, inputs: Any, targets: Any) -> tuple[Tensor, Tensor]:
        """Per-sample losses (M,) and gradients ``∂L_j/∂W_j`` (M, P)."""
        return self._model_grad(mixed, inputs, targets, None)

    def _model_grad(self, mixed: Tensor, inputs: Any, targets: Any, out: Tensor | None) -> tuple[Tensor, Tensor]:
        """:meth:`model_grad`, writing the direct loop's gradients into ``out`` (which may be
        ``mixed`` itself: row ``j`` is overwritten once sample ``j`` is done with it)."""
        if not self._checked:
            with torch.no_grad():
                self._check(mixed[0], inputs, targets)
        if self.vectorize:
            grads, losses = self._vmap()(mixed, inputs, targets)
            return losses.reshape(-1), grads
        direct = self._direct_params(mixed)
        if direct is not None:
            return self._direct_loop(direct, mixed, inputs, targets, torch.empty_like(mixed) if out is None else out)
        grads = torch.empty_like(mixed)
        losses = torch.empty(mixed.shape[0], device=self.device, dtype=mixed.dtype)
        for j in range(mixed.shape[0]):
            flat = mixed[j].detach().requires_grad_(True)
            loss = self._loss(flat, inputs, targets)
            (grads[j],) = torch.autograd.grad(loss.reshape(()), flat)
            losses[j] = loss.detach()
        return losses, grads

    def _direct_loop(self, params: list[nn.Parameter | None], mixed: Tensor, inputs: Any, targets: Any,
                     out: Tensor) -> tuple[Tensor, Tensor]:
        losses = torch.empty(mixed.shape[0], device=mixed.device, dtype=mixed.dtype)
        used = [p for p in params if p is not None]
        with torch.enable_grad():
            for j in range(mixed.shape[0]):
                for p, w in zip(params, self.views(mixed[j]), strict=True):
                    if p is not None:
                        p.data = w
                        p.grad = None  # backward hands its gradient over without a copy
                loss = self.loss_fn(_forward(self.model, inputs), targets)
                if loss.requires_grad:
                    loss.reshape(()).backward()
                losses[j] = loss.detach().reshape(())
                # W_j is dead now: its row may take G_j.
                dests, grads = [], []
                for p, g in zip(params, self.views(out[j]), strict=True):
                    if p is None or p.grad is None:
                        g.zero_()
                    else:
                        dests.append(g)
                        grads.append(p.grad)
                if dests:
                    torch._foreach_copy_(dests, grads)
        for p in used:
            p.grad = None
        return losses, out

    def __call__(self, mix: Tensor, batch: Any) -> tuple[float, Tensor]:
        """Mean loss over the M mixed models and its gradient w.r.t. ``mix`` (M, k), oldest
        snapshot first."""
        inputs, targets = _split_batch(batch)
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        a_rows = mix.to(self.device, self.dtype)[:, self.inverse]
        m, p = a_rows.shape[0], self.rows.shape[1]
        if self._buffer is None or self._buffer.shape[0] != m:
            self._buffer = torch.empty(m, p, device=self.device, dtype=self.dtype)
            self._mixed = None  # mix() keeps its own buffer; this one is the step's
        mixed = self._mix_into(a_rows, self._buffer)
        losses, grads = self._model_grad(mixed, inputs, targets, self._buffer)
        g_rows = self.grad_mix(grads).div_(m)  # L = mean over samples
        return float(losses.mean()), g_rows[:, self.order].to(mix.device, mix.dtype)


def _forward(model: nn.Module, inputs: Any) -> Any:
    """Calls ``model`` like :func:`functional_forward`, with its own parameters."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
