"""SeWA in a Hugging Face ``Trainer`` run: two lines added to an ordinary ``trainer.train()``.

    python examples/huggingface/train.py          # about a minute on a laptop CPU; downloads nothing

A tiny BERT, randomly initialised from a config, learns a synthetic sequence task (does the
sequence hold more tokens from the lower half of the vocabulary than from the upper half?). The
callback keeps 40 snapshots (every 5th optimizer step of the second half of training); when
training ends it selects 8 of them with SeWA on the Trainer's eval dataset and loads their
average into the model. The script prints the loss of the final weights and of the average on a
held-out test set.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import sewa
from sewa.integrations.transformers import SeWACallback


class Sequences(torch.utils.data.Dataset):
    """Random 16-token sequences over a vocabulary of 200, labelled by which half dominates."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 200, (n, 16), generator=g)
        self.labels = ((self.ids < 100).sum(1) > 8).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, num_train_epochs=args.epochs, learning_rate=args.lr, per_device_train_batch_size=32,
            per_device_eval_batch_size=250, report_to=[], use_cpu=True, save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True, seed=args.seed,
        )
        trainer = Trainer(model=model, args=training, train_dataset=Sequences(2000, args.seed + 1),
                          eval_dataset=Sequences(500, args.seed + 2))

        # The two lines: create the callback, and attach it (it reads the eval dataset).
        sewa_cb = SeWACallback(window=40, method=sewa.methods.sewa(top_k=8, steps=100), every=5, start=0.5).attach(trainer)
        trainer.train()

        traj, sel = sewa_cb.trajectory, sewa_cb.selection
        assert traj is not None and sel is not None
        test = Sequences(2000, args.seed + 3)
        averaged = trainer.evaluate(test)["eval_loss"]
        print(f"recorded steps {traj.steps[0]}..{traj.steps[-1]} ({len(traj)} snapshots); SeWA chose steps {sel.steps}")
        if traj.steps[-1] == trainer.state.global_step:  # the newest snapshot holds the final weights
            model.load_state_dict(traj.snapshot(-1))
            print(f"final weights : test loss {trainer.evaluate(test)['eval_loss']:.4f}")
        print(f"SeWA average  : test loss {averaged:.4f}")


if __name__ == "__main__":
    main()
