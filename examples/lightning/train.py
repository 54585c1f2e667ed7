"""SeWA in a PyTorch Lightning run: two lines added to an ordinary ``Trainer.fit``.

    python examples/lightning/train.py            # about half a minute on a laptop CPU

A small MLP with BatchNorm learns a synthetic 5-class problem. The callback keeps 50 snapshots
(every 4th optimizer step of the second half of training), and when training ends it
selects 10 of them with SeWA on the validation split, loads their average into the module and
recomputes the BatchNorm statistics. The script prints the loss and accuracy of the final weights
and of the average on a held-out test split (the validation split chose the snapshots).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import sewa
from sewa.integrations.lightning import SeWACallback


class Classifier(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 5))
        self.loss_fn = F.cross_entropy  # the callback uses it for the selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss_fn(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(seed: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Five noisy Gaussian clusters in 16 dimensions: 2,000 training, 1,000 validation and 2,000
    test points."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 16, generator=g)
    y = torch.randint(0, 5, (5000,), generator=g)
    x = centres[y] + 1.5 * torch.randn(5000, 16, generator=g)
    train = DataLoader(TensorDataset(x[:2000], y[:2000]), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(x[2000:3000], y[2000:3000]), batch_size=250)
    return train, val, DataLoader(TensorDataset(x[3000:], y[3000:]), batch_size=500)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(args.seed, verbose=False)
    train, val, test = data(args.seed)
    module = Classifier(args.lr)

    # The two lines: create the callback, and pass it to the Trainer.
    sewa_cb = SeWACallback(window=50, method=sewa.methods.sewa(top_k=10, steps=100), every=4, start=0.5)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[sewa_cb])
    trainer.fit(module, train, val)

    traj, sel = sewa_cb.trajectory, sewa_cb.selection
    assert traj is not None and sel is not None
    averaged = trainer.validate(module, test, verbose=False)[0]
    # The final weights are the newest snapshot when the last step was recorded (63 steps per
    # epoch: every 4th lands on the last with the default 8 epochs);
    # their BatchNorm statistics are the ones training ended with, held in the snapshot's extras.
    final = Classifier(args.lr)
    final.load_state_dict(traj.snapshot(-1))
    last = trainer.validate(final, test, verbose=False)[0] if traj.steps[-1] == trainer.global_step else None
    print(f"recorded steps {traj.steps[0]}..{traj.steps[-1]} ({len(traj)} snapshots); SeWA chose steps {sel.steps}")
    if last is not None:
        print(f"final weights : test loss {last['val_loss']:.4f}  accuracy {last['val_acc']:.4f}")
    else:
        print(f"the final step {trainer.global_step} was not recorded: no figure for the final weights")
    print(f"SeWA average  : test loss {averaged['val_loss']:.4f}  accuracy {averaged['val_acc']:.4f}")


if __name__ == "__main__":
    main()
