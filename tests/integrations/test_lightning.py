"""The Lightning callback in a real ``lightning.Trainer`` on CPU: what it records, and what it
loads at the end of training."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import sewa

pl = pytest.importorskip("lightning.pytorch")
from sewa.integrations.lightning import SeWACallback  # noqa: E402

pytestmark = pytest.mark.integration


class Net(pl.LightningModule):
    """A tiny classifier with BatchNorm that copies its state by hand after every optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.loss_fn = F.cross_entropy
        self.optimizer_steps = 0
        self.copies: dict[int, dict[str, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def optimizer_step(self, *args: object, **kwargs: object) -> None:
        super().optimizer_step(*args, **kwargs)  # type: ignore[arg-type]
        # Lightning calls this once per optimizer step (not per accumulated batch).
        self.optimizer_steps += 1
        self.copies[self.optimizer_steps] = {k: v.detach().clone() for k, v in self.state_dict().items()}


def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=8)  # 8 batches per epoch, unshuffled
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16)
    return train, val


def fit(cb: SeWACallback, val: bool = True, **trainer_args: object) -> tuple[Net, pl.Trainer, DataLoader]:
    pl.seed_everything(0, verbose=False)
    module = Net()
    train, val_loader = loaders()
    args = {"max_epochs": 3} | trainer_args
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], **args)  # type: ignore[arg-type]
    trainer.fit(module, train, val_loader if val else None)
    return module, trainer, train


def test_records_every_optimizer_step_and_loads_the_selected_average() -> None:
    # 8 batches per epoch, 2 accumulated per optimizer step: 4 steps per epoch, 12 in all.
    cb = SeWACallback(window=4, method=sewa.methods.sewa(top_k=2, steps=4, samples=2), every=2, start=3)
    module, trainer, train = fit(cb, accumulate_grad_batches=2)
    assert trainer.global_step == 12 and module.optimizer_steps == 12
    traj = cb.trajectory
    assert traj is not None and traj.steps == [6, 8, 10, 12]  # 4, 6, ..., 12 recorded; window keeps 4
    for i, step in enumerate(traj.steps):
        snap = traj.snapshot(i)
        for name in traj.names:
            torch.testing.assert_close(snap[name], module.copies[step][name], rtol=0, atol=0)

    # The selection ran on the validation split with the module's own loss_fn.
    sel = cb.selection
    assert sel is not None and len(sel.indices) == 2 and len(sel.history["loss"]) == 4
    assert cb.result is not None and cb.result.name == "sewa"
    assert sel.steps == [traj.steps[i] for i in sel.indices]

    # The module holds the average of the selected snapshots...
    avg = sewa.average(traj, sel.weights)
    for name in traj.names:
        torch.testing.assert_close(module.state_dict()[name], avg[name], rtol=0, atol=0)
    # ...with BatchNorm statistics recomputed over the training data for those weights.
    expected = copy.deepcopy(module)
    expected.load_state_dict(module.copies[12])  # the final running statistics...
    expected.load_state_dict(avg, strict=False)
    sewa.update_bn(expected, train)  # ...replaced by one pass with the averaged weights
    bn, bn_expected = module.net[1], expected.net[1]
    torch.testing.assert_close(bn.running_mean, bn_expected.running_mean)
    torch.testing.assert_close(bn.running_var, bn_expected.running_var)
    assert not torch.allclose(bn.running_mean, module.copies[12]["net.1.running_mean"])


def test_baseline_rule_from_a_fraction_of_training_without_validation() -> None:
    # A rule that evaluates nothing needs neither a loss nor a validation split.
    cb = SeWACallback(window=100, method="uniform", start=0.5, bn_max_batches=2)
    module, trainer, _ = fit(cb, val=False, max_epochs=2)  # 16 optimizer steps
    traj = cb.trajectory
    assert traj is not None and cb.start_step == 8 and traj.steps == list(range(8, 17))
    assert cb.selection is None and cb.result is not None and cb.result.name == "uniform"
    avg = sewa.average(traj, sewa.weights.uniform(len(traj)))
    for name in traj.names:
        torch.testing.assert_close(module.state_dict()[name], avg[name], rtol=0, atol=0)


def test_record_only_leaves_the_final_weights() -> None:
    cb = SeWACallback(window=3, method=None)
    module, _, _ = fit(cb, val=False, max_epochs=1)
    assert cb.trajectory is not None and cb.trajectory.steps == [6, 7, 8] and cb.result is None
    for name, value in module.copies[8].items():
        torch.testing.assert_close(module.state_dict()[name], value, rtol=0, atol=0)


def test_selection_without_a_loss_fails_before_training() -> None:
    class NoLoss(Net):
        def __init__(self) -> None:
            super().__init__()
            del self.loss_fn

    pl.seed_everything(0, verbose=False)
    module = NoLoss()
    train, val = loaders()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[SeWACallback()])
    with pytest.raises(ValueError, match="needs a loss"):
        trainer.fit(module, train, val)
    assert module.optimizer_steps == 0


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        SeWACallback(method="nope")
    with pytest.raises(ValueError, match="fraction"):
        SeWACallback(start=1.5)
    with pytest.raises(ValueError, match="every"):
        SeWACallback(every=0)


def test_importing_sewa_imports_no_framework() -> None:
    code = ("import sys, sewa, sewa.integrations; "
            "assert not {'lightning', 'pytorch_lightning', 'transformers'} & set(sys.modules), 'framework imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


class DictNet(Net):
    """Takes dict batches, as many data pipelines produce."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:  # type: ignore[override]
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:  # type: ignore[override]
        self.log("val_loss", F.cross_entropy(self(batch["x"]), batch["y"]))


def test_dict_batches_and_a_validation_loop_that_never_ran() -> None:
    train, val = loaders()
    as_dicts = [DataLoader([{"x": x, "y": y} for x, y in loader.dataset], batch_size=8) for loader in (train, val)]  # type: ignore[attr-defined]
    calls: list[int] = []

    def to_pair(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(len(batch["y"]))
        return batch["x"], batch["y"]

    cb = SeWACallback(window=3, method=sewa.methods.sewa(top_k=1, steps=2, samples=2), loss_fn=F.cross_entropy,
                      batch_to_pair=to_pair, bn_max_batches=3)
    pl.seed_everything(0, verbose=False)
    module = DictNet()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb], check_val_every_n_epoch=5, num_sanity_val_steps=0)
    trainer.fit(module, *as_dicts)
    assert cb.selection is not None and cb.trajectory is not None and cb.trajectory.steps == [6, 7, 8]
    # 2 selection steps on validation batches, then 3 training batches for BatchNorm.
    assert len(calls) == 5
    chosen = cb.trajectory.snapshot(cb.selection.indices[0])
    torch.testing.assert_close(module.net[0].weight, chosen["net.0.weight"], rtol=0, atol=0)
