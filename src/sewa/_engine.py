"""The selection engine: loss of M mixed models and its gradient w.r.t. the mixing weights.

For mixing weights ``A`` (M, k) over the snapshot matrix ``Θ`` (k, P):

    W = A Θ                         one matrix product (chunked over P for compact storage)
    G = ∂/∂W (1/M) Σ_j L(f(W_j))    M forward/backward passes, vmapped over j
    ∂L/∂A = G Θᵀ                    one more matrix product

so the cost is two reads of ``Θ`` plus the model's own compute, and no autograd graph ever
spans the snapshots. :class:`MixedLoss` holds the two parts: a :class:`~sewa._columns.Columns`
for the matrix products and a :class:`ModelPasses` for the M passes; the engines of
:mod:`sewa.distributed` hold the same parts over one rank's columns.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap

from ._batch import forward, functional_forward, split_batch, to_device
from ._columns import Columns
from ._names import named_parameters
from .trajectory import Trajectory

__all__ = ["MixedLoss", "ModelPasses", "to_device", "selection_model", "batch_statistics", "restore_statistics"]

_Saved = list[tuple[nn.modules.batchnorm._BatchNorm, tuple[Any, Any, Any, Any]]]


def batch_statistics(model: nn.Module) -> _Saved:
    """Puts every BatchNorm layer of ``model`` on batch statistics (running statistics of
    mixed weights are meaningless) and returns what :func:`restore_statistics` puts back."""
    saved: _Saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, (m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked)))
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return saved


def restore_statistics(saved: _Saved) -> None:
    """Undoes :func:`batch_statistics`."""
    for m, (track, mean, var, count) in saved:
        m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = track, mean, var, count


def selection_model(model: nn.Module, batch_stats: bool, device: torch.device) -> nn.Module:
    """A private copy of ``model`` for functional calls: eval mode, no grads, and BatchNorm
    layers on batch statistics when ``batch_stats`` (see :func:`batch_statistics`)."""
    model = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    if batch_stats:
        batch_statistics(model)
    return model


class ModelPasses:
    """Per-sample losses and gradients ``∂L_j/∂W_j`` of a model at M flat parameter vectors.

    Three ways to run the ``M`` forward/backward passes give the same numbers:

    - *direct loop* (the default on CPU): the model's parameters are pointed at the rows of
      ``W`` in turn (``param.data = view``) and ``loss.backward()`` accumulates straight into
      the rows of ``G``: a plain forward/backward per sample, without ``torch.func`` overhead;
    - *functional loop*: :func:`torch.func.functional_call` per sample (models the direct loop
      cannot drive: recorded buffers, dtypes other than ``W``'s, wrapped or hooked models);
    - *vmap*: :func:`torch.func.vmap` over the samples (the default elsewhere, when the model
      supports it).

    Args:
        model: A private model from :func:`selection_model` (its recorded values are replaced).
        names: The recorded tensor names, in flat order.
        views: ``views(flat)``: the tensors of a flat vector, in ``names`` order.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        vectorize: ``True``: vmap over M; ``False``: loop; ``None``: loop on CPU, elsewhere vmap
            when it works.
    """

    def __init__(self, model: nn.Module, names: list[str], views: Callable[[Tensor], list[Tensor]],
                 loss_fn: Callable[[Any, Any], Tensor], vectorize: bool | None = None) -> None:
        self.model = model
        self.names = names
        self.views = views
        self.loss_fn = loss_fn
        self.vectorize = vectorize
        named = named_parameters(model, expected=names)
        for name in names:
            if name in named:  # every pass replaces them with rows of W: drop the copy's values
                named[name].data = named[name].data.new_empty(0)
        self._checked = False
        self._vmapped: Callable[..., tuple[Tensor, Tensor]] | None = None
        self._direct: list[nn.Parameter | None] | None = None
        self._direct_checked = False
        self._used: list[bool] | None = None

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

    def outputs_of(self, flat: Tensor, inputs: Any) -> Any:
        """``f(w)``: the model's outputs at one flat parameter vector ``w`` (P,)."""
        params = {n: v for n, v, u in zip(self.names, self.views(flat), self._used_names(), strict=True) if u}
        return functional_forward(self.model, params, inputs)

    def loss_of(self, flat: Tensor, inputs: Any, targets: Any) -> Tensor:
        """``L(f(w))`` of the model at one flat parameter vector ``w`` (P,), as a tensor."""
        return self.loss_fn(self.outputs_of(flat, inputs), targets)

    def _check(self, flat: Tensor, inputs: Any, targets: Any) -> None:
        loss = self.loss_of(flat, inputs, targets)
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
            self._vmapped = vmap(grad_and_value(self.loss_of), in_dims=(0, None, None))
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
            named = named_parameters(self.model, expected=self.names)
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

    def model_grad(self, mixed: Tensor, inputs: Any, targets: Any, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample losses (M,) and gradients ``∂L_j/∂W_j`` (M, P) at the rows of ``mixed``.

        The direct loop writes its gradients into ``out``, which may be ``mixed`` itself: row
        ``j`` is overwritten once sample ``j`` is done with it."""
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
        losses = torch.empty(mixed.shape[0], device=mixed.device, dtype=mixed.dtype)
        for j in range(mixed.shape[0]):
            flat = mixed[j].detach().requires_grad_(True)
            loss = self.loss_of(flat, inputs, targets)
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
                loss = self.loss_fn(forward(self.model, inputs), targets)
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


class MixedLoss:
    """``(A, batch) -> (loss, ∂loss/∂A)`` for mixing weights ``A`` (M, k) over a trajectory.

    It holds :attr:`columns` (the products ``W = A Θ`` and ``G Θᵀ``) and :attr:`passes` (the
    M forward/backward passes, see :class:`ModelPasses`). In :meth:`__call__` the direct loop
    writes ``G_j`` over ``W_j`` once sample ``j``'s backward is done, so ``W`` and ``G`` share
    one ``(M, P)`` buffer, reused across steps.

    Args:
        trajectory: The snapshots; its rows are read in place (moved once if ``device``
            differs).
        model: Defines the architecture; copied.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batch_stats: BatchNorm on batch statistics.
        vectorize: See :class:`ModelPasses`.
        device: Compute device (default: the trajectory's).
        dtype: Compute dtype of ``W``, ``G`` and the passes (float64 for exact checks).
    """

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
        self.columns = Columns(rows, order, device=device, dtype=dtype)
        self.device = self.columns.device
        self.inverse = self.columns.inverse
        self.passes = ModelPasses(selection_model(model, batch_stats, self.device), trajectory.names,
                                  trajectory.views, loss_fn, vectorize)
        self._buffer: Tensor | None = None

    def mix(self, a_rows: Tensor) -> Tensor:
        """``W = A Θ`` (M, P) for weights on the rows in slot order (see :attr:`inverse`)."""
        return self.columns.mix(a_rows)

    def model_grad(self, mixed: Tensor, inputs: Any, targets: Any) -> tuple[Tensor, Tensor]:
        """``G``: per-sample losses (M,) and gradients ``∂L_j/∂W_j`` (M, P) (see :class:`ModelPasses`)."""
        return self.passes.model_grad(mixed, inputs, targets)

    def grad_mix(self, g: Tensor) -> Tensor:
        """``G Θᵀ`` (M, k) per row in slot order."""
        return self.columns.grad(g)

    def mix_weights(self, weights: Tensor) -> Tensor:
        """The flat averaged parameters ``Σ_i w_i θ_i`` (P,) for weights oldest first (k,);
        a view of a buffer the next call overwrites."""
        return self.columns.mix(self.columns.to_rows(weights.reshape(1, -1)))[0]

    def loss_of(self, flat: Tensor, inputs: Any, targets: Any) -> Tensor:
        """The loss of the model at flat parameters ``flat`` (P,) on one batch (on :attr:`device`)."""
        return self.passes.loss_of(flat, inputs, targets)

    def outputs_of(self, flat: Tensor, inputs: Any) -> Any:
        """The model's outputs at flat parameters ``flat`` (P,) on one batch's inputs."""
        return self.passes.outputs_of(flat, inputs)

    def __call__(self, mix: Tensor, batch: Any) -> tuple[float, Tensor]:
        """Mean loss over the M mixed models and its gradient w.r.t. ``mix`` (M, k), oldest
        snapshot first."""
        inputs, targets = split_batch(batch)
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        cols = self.columns
        a_rows = cols.to_rows(mix)
        m = a_rows.shape[0]
        if self._buffer is None or self._buffer.shape[0] != m:
            self._buffer = torch.empty(m, cols.width, device=self.device, dtype=cols.dtype)
        mixed = cols.mix_into(a_rows, self._buffer)
        losses, grads = self.passes.model_grad(mixed, inputs, targets, out=self._buffer)
        g_rows = cols.grad(grads).div_(m)  # L = mean over samples
        return float(losses.mean()), cols.to_oldest(g_rows, mix)
