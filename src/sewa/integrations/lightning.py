"""PyTorch Lightning callback: record snapshots during ``fit``, average them when training ends.

Example:
    >>> from sewa.integrations.lightning import SeWACallback
    >>> cb = SeWACallback(window=20, method=sewa.methods.sewa(top_k=5), every=10, start=0.5, loss_fn=F.cross_entropy)
    >>> lightning.Trainer(callbacks=[cb]).fit(module, train_loader, val_loader)
    >>> cb.selection.steps  # the chosen snapshots; their average is now in ``module``

Requires the ``lightning`` extra (``pip install "torch-sewa[lightning]"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl

from . import AveragingCallbackBase, Batches, LossFn, MappedBatches

__all__ = ["SeWACallback"]


class SeWACallback(AveragingCallbackBase, pl.Callback):
    """Records the module into a :class:`sewa.Trajectory` during ``fit``; at the end of training,
    chooses snapshots (SeWA by default) on the validation split, loads their average into the
    module and recomputes its BatchNorm statistics.

    A snapshot is taken after an optimizer step when ``trainer.global_step`` (optimizer steps
    done, so gradient accumulation counts once) is at least the start step and a multiple of
    ``every``. Its step in the trajectory is that ``global_step``.

    Args:
        window: Snapshots kept (paper's ``k``); older ones are dropped.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` for the selection. Defaults to the
            module's ``loss_fn`` attribute when it has one.
        selection_batches: The selection split; defaults to the trainer's validation
            dataloader (the first one if there are several).
        bn_batches: Batches for BatchNorm recomputation; defaults to the trainer's training
            dataloader.
        batch_to_pair: Turns a dataloader batch into an ``(inputs, targets)`` pair; applied to
            selection and BatchNorm batches. Not needed when batches already are ``(x, y)``.
        **options: The recording and averaging options of
            :class:`~sewa.integrations.AveragingCallbackBase` (``method``, ``every``, ``start``,
            ``dtype``, ``buffers``, ``device``, ``load``, ``bn``, ``bn_max_batches``,
            ``trajectory``, ``vectorize``, ``progress``); ``start`` as a fraction counts
            ``trainer.estimated_stepping_batches``.

    Attributes:
        trajectory: The recorded :class:`sewa.Trajectory` (created when training starts).
        selection: The :class:`sewa.Selection` when ``method="sewa"``, else ``None``.
        result: The :class:`sewa.MethodResult` (weights, time, details) of any method.

    Under a multi-process strategy every rank records; the weights are chosen on rank 0 and sent
    to all ranks, and :attr:`selection` is set on rank 0 only.
    """

    def __init__(
        self,
        window: int = 20,
        *,
        loss_fn: LossFn | None = None,
        selection_batches: Iterable[Any] | None = None,
        bn_batches: Iterable[Any] | None = None,
        batch_to_pair: Callable[[Any], tuple[Any, Any]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(window, **options)
        self.loss_fn = loss_fn
        self.selection_batches = selection_batches
        self.bn_batches = bn_batches
        self.batch_to_pair = batch_to_pair
        self._last_step = -1

    # ----------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(pl_module, lambda: trainer.estimated_stepping_batches)
        self._last_step = trainer.global_step
        if self.needs_evaluation:
            self._loss(pl_module)  # fail now, not after the whole run

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # Called after every batch; global_step moves only when the optimizer stepped, so
        # this records once per optimizer step whatever the gradient accumulation.
        step = trainer.global_step
        if step != self._last_step:
            self._last_step = step
            self._record(pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.needs_evaluation and self.selection_batches is None and trainer.val_dataloaders is None:
            # Validation never ran (e.g. check_val_every_n_epoch > max_epochs): load its
            # dataloader now, on every rank, since loading it may synchronise the ranks.
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        self._finish(
            pl_module,
            loss_fn=lambda: self._loss(pl_module),
            selection_batches=lambda: self._pairs(_given(self.selection_batches, lambda: _first(trainer.val_dataloaders)), "validation"),
            bn_batches=lambda: self._pairs(_given(self.bn_batches, lambda: _first(trainer.train_dataloader)), "training"),
        )

    # ----------------------------------------------------------------- helpers
    def _loss(self, pl_module: pl.LightningModule) -> LossFn:
        loss = self.loss_fn or getattr(pl_module, "loss_fn", None)
        if not callable(loss):
            raise ValueError(f"method={self.method!r} evaluates averaged models and needs a loss: pass "
                             "SeWACallback(loss_fn=...) (loss_fn(outputs, targets) -> scalar), give the module a "
                             "loss_fn attribute, or pick a rule that needs none (method='uniform', 'lawa', 'ema', 'last')")
        return loss  # type: ignore[no-any-return]

    def _pairs(self, batches: Iterable[Any] | None, split: str) -> Batches:
        if batches is None:
            raise ValueError(f"sewa found no {split} dataloader on the trainer: pass "
                             f"SeWACallback({'selection' if split == 'validation' else 'bn'}_batches=...)")
        return MappedBatches(batches, self.batch_to_pair) if self.batch_to_pair is not None else batches


def _given(batches: Iterable[Any] | None, default: Callable[[], Iterable[Any] | None]) -> Iterable[Any] | None:
    # Not ``batches or default()``: the truth value of a DataLoader calls its __len__, which
    # raises for an iterable dataset without one.
    return batches if batches is not None else default()


def _first(loaders: Any) -> Iterable[Any] | None:
    """The first of several dataloaders (Lightning returns a list or dict when there are
    several), or the only one."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    return loaders  # type: ignore[no-any-return]

