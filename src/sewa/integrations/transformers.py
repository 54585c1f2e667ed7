"""Hugging Face ``transformers`` Trainer callback: record snapshots during ``train()``, average
them when training ends.

Example:
    >>> from sewa.integrations.transformers import SeWACallback
    >>> trainer = Trainer(model, args, train_dataset=train, eval_dataset=val)
    >>> cb = SeWACallback(window=20, method=sewa.methods.sewa(top_k=5), every=10, start=0.5).attach(trainer)
    >>> trainer.train()
    >>> cb.selection.steps  # the chosen snapshots; their average is now in ``trainer.model``

Requires the ``transformers`` extra (``pip install "torch-sewa[transformers]"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import transformers
from torch import Tensor, nn
from torch.nn import functional as F

from . import AveragingCallbackBase, Batches, LossFn, MappedBatches

__all__ = ["SeWACallback", "model_loss", "logits_cross_entropy"]


def model_loss(outputs: Any, targets: Any) -> Tensor:
    """The loss the model computed itself from the labels left in its inputs (``outputs.loss``):
    right for every task head (classification, regression, causal LM with its shift, ...)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: its inputs carry no labels (see label_names), or pass "
                         "SeWACallback(loss_fn=...) with loss_fn(outputs, labels) -> scalar")
    return loss  # type: ignore[no-any-return]


def logits_cross_entropy(outputs: Any, labels: Tensor) -> Tensor:
    """Cross-entropy of ``outputs.logits`` (..., C) against ``labels`` (...), ignoring ``-100``:
    sequence and token classification. (A causal LM needs the shift its own loss applies.)"""
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


class SeWACallback(AveragingCallbackBase, transformers.TrainerCallback):
    """Records the model into a :class:`sewa.Trajectory` during ``Trainer.train()``; at the end
    of training, chooses snapshots (SeWA by default) on the Trainer's eval dataset, loads their
    average into the model and recomputes BatchNorm statistics (if it has any).

    A snapshot is taken in ``on_step_end``, called once per optimizer step (after gradient
    accumulation), when ``state.global_step`` is at least the start step and a multiple of
    ``every``. Its step in the trajectory is that ``global_step``.

    A ``TrainerCallback`` is not given the Trainer, so use :meth:`attach` (or ``trainer=``) to
    let it read the eval dataset; or pass ``selection_batches``.

    Batches are Hugging Face dicts. For the selection each becomes an ``(inputs, targets)`` pair:
    by default the inputs keep their labels and the loss is the model's own (:func:`model_loss`);
    with a ``loss_fn`` the labels (``label_names``) move to the targets, and the model is called
    without them. Batches that already are pairs are used as they are.

    Args:
        window: Snapshots kept (paper's ``k``); older ones are dropped.
        trainer: The Trainer, to read its eval dataset (same as :meth:`attach`, which also
            registers the callback).
        loss_fn: ``loss_fn(outputs, labels) -> scalar`` (e.g. :func:`logits_cross_entropy`);
            default: the model's own loss.
        selection_batches: The selection split (dict batches or pairs); default: the Trainer's
            eval dataloader.
        bn_batches: Batches for BatchNorm recomputation; default: the training dataloader.
        eval_dataset_name: Which eval dataset when ``eval_dataset`` is a dict (default: the
            first).
        label_names: Label keys of a batch; default: the Trainer's (``["labels"]`` for most
            models).
        vectorize: Run the selection's mask samples with ``vmap``; default ``False`` here (a
            loop), since attention kernels mostly lack ``vmap`` batching rules (a tiny BERT on
            CPU: 2.1-3.5 s with vmap against 1.5 s).
        **options: The recording and averaging options of
            :class:`~sewa.integrations.AveragingCallbackBase` (``method``, ``every``, ``start``,
            ``dtype``, ``buffers``, ``device``, ``load``, ``bn``, ``bn_max_batches``,
            ``trajectory``, ``progress``); ``start`` as a fraction counts ``state.max_steps``.

    Attributes:
        trajectory: The recorded :class:`sewa.Trajectory`.
        selection: The :class:`sewa.Selection` when ``method="sewa"``, else ``None``.
        result: The :class:`sewa.MethodResult` of any method.
    """

    def __init__(
        self,
        window: int = 20,
        *,
        trainer: transformers.Trainer | None = None,
        loss_fn: LossFn | None = None,
        selection_batches: Iterable[Any] | None = None,
        bn_batches: Iterable[Any] | None = None,
        eval_dataset_name: str | None = None,
        label_names: list[str] | None = None,
        vectorize: bool | None = False,
        **options: Any,
    ) -> None:
        super().__init__(window, vectorize=vectorize, **options)
        self.trainer, self.loss_fn, self.label_names = trainer, loss_fn, label_names
        self.selection_batches, self.bn_batches, self.eval_dataset_name = selection_batches, bn_batches, eval_dataset_name

    def attach(self, trainer: transformers.Trainer) -> SeWACallback:
        """Registers this callback with ``trainer`` and lets it read the eval dataset; returns it."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # ----------------------------------------------------------------- hooks
    def on_train_begin(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                       control: transformers.TrainerControl, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("the Trainer passed no model to the callback")
        self._begin(model, lambda: state.max_steps)
        # Fail now, not after the whole run.
        if self.needs_evaluation and self.selection_batches is None:
            if self.trainer is None:
                raise ValueError(f"method={self.method!r} selects on the eval dataset, but the callback has no Trainer: "
                                 "use SeWACallback(...).attach(trainer), or pass selection_batches=...")
            if self.trainer.eval_dataset is None:
                raise ValueError("the Trainer has no eval_dataset to select on: give it one, or pass selection_batches=...")
        if self.load and args.load_best_model_at_end:
            warnings.warn("sewa: load_best_model_at_end=True and the SeWA callback both set the final weights; "
                          "the callback's average, loaded last, wins", stacklevel=2)

    def on_step_end(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                    control: transformers.TrainerControl, model: nn.Module | None = None, **kwargs: Any) -> None:
        assert model is not None
        self._record(model, state.global_step)

    def on_train_end(self, args: transformers.TrainingArguments, state: transformers.TrainerState,
                     control: transformers.TrainerControl, model: nn.Module | None = None,
                     train_dataloader: Iterable[Any] | None = None, **kwargs: Any) -> None:
        assert model is not None
        self._finish(
            model,
            loss_fn=lambda: self.loss_fn or model_loss,
            selection_batches=lambda: self._pairs(self._given(self.selection_batches, self._eval_dataloader)),
            bn_batches=lambda: self._pairs(self._given(self.bn_batches, lambda: self._given(train_dataloader, self._train_dataloader))),
        )

    # ----------------------------------------------------------------- batches
    @staticmethod
    def _given(batches: Iterable[Any] | None, default: Callable[[], Iterable[Any]]) -> Iterable[Any]:
        # Not ``batches or default()``: the truth value of a DataLoader calls its __len__, which
        # raises for an iterable dataset without one.
        return batches if batches is not None else default()

    def _eval_dataloader(self) -> Iterable[Any]:
        assert self.trainer is not None
        name = self.eval_dataset_name
        if name is None and isinstance(self.trainer.eval_dataset, Mapping):
            name = next(iter(self.trainer.eval_dataset))
        return self.trainer.get_eval_dataloader(name)  # type: ignore[no-any-return]

    def _train_dataloader(self) -> Iterable[Any]:
        if self.trainer is None:
            raise ValueError("no training dataloader to recompute BatchNorm statistics: pass bn_batches=...")
        return self.trainer.get_train_dataloader()  # type: ignore[no-any-return]

    def _labels(self) -> list[str]:
        if self.label_names is not None:
            return self.label_names
        return list(getattr(self.trainer, "label_names", None) or ["labels"])

    def _pairs(self, batches: Iterable[Any]) -> Batches:
        return MappedBatches(batches, self._pair)

    def _pair(self, batch: Any) -> tuple[Any, Any]:
        if not isinstance(batch, Mapping):
            return batch  # type: ignore[no-any-return]
        inputs = dict(batch)  # a plain dict: the engine passes dicts as keyword arguments
        if self.loss_fn is None:  # the model's own loss reads the labels from its inputs
            return inputs, None
        labels = [inputs.pop(k) for k in self._labels() if k in inputs]
        if not labels:
            raise ValueError(f"a batch has none of the label keys {self._labels()} (its keys: {list(batch)}): "
                             "pass label_names=[...]")
        return inputs, labels[0] if len(labels) == 1 else tuple(labels)
