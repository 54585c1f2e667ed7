"""The transformers callback in a real ``Trainer`` on CPU, with a tiny randomly initialised BERT
built from a config (nothing is downloaded) and a tiny BatchNorm model."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # set before transformers is imported; the tests never download

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sewa
from sewa._engine import MixedLoss

transformers = pytest.importorskip("transformers")
from sewa.integrations.transformers import SeWACallback, logits_cross_entropy, model_loss  # noqa: E402

pytestmark = pytest.mark.integration


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the label says whether the first token is below 50."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] < 50).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def arguments(tmp_path: os.PathLike[str], **overrides: object) -> transformers.TrainingArguments:
    options: dict[str, object] = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", eval_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    return transformers.TrainingArguments(**(options | overrides))  # type: ignore[arg-type]


def copy_after_each_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    """Hand copies of the model after every optimizer step, keyed by the step count."""
    copies: dict[int, dict[str, torch.Tensor]] = {}

    def hook(*_: object) -> None:
        copies[len(copies) + 1] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    optimizer.register_step_post_hook(hook)
    return copies


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.Trainer, SeWACallback, dict[int, dict[str, torch.Tensor]], list[int]]:
    """One run: 32 samples, batches of 4, 2 accumulated per optimizer step: 4 steps per epoch, 8 in all."""
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    copies = copy_after_each_step(model, optimizer)
    args = arguments(tmp_path_factory.mktemp("bert"), gradient_accumulation_steps=2, num_train_epochs=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(32, 1), eval_dataset=Tokens(16, 2),
                                   optimizers=(optimizer, None))
    cb = SeWACallback(window=3, method=sewa.methods.sewa(top_k=2, steps=3, samples=2), every=2, start=3)
    assert cb.attach(trainer) is cb and cb in trainer.callback_handler.callbacks
    eval_calls: list[int] = []
    get_eval = trainer.get_eval_dataloader

    def spy(*a: object) -> object:
        eval_calls.append(1)
        return get_eval(*a)  # type: ignore[arg-type]

    trainer.get_eval_dataloader = spy  # type: ignore[method-assign]
    trainer.train()
    return trainer, cb, copies, eval_calls


def test_records_once_per_optimizer_step(trained: tuple) -> None:
    trainer, cb, copies, _ = trained
    assert trainer.state.global_step == 8 and sorted(copies) == list(range(1, 9))
    traj = cb.trajectory
    assert traj is not None and traj.steps == [4, 6, 8]  # 4, 6, 8 are due from step 3 on
    for i, step in enumerate(traj.steps):
        snap = traj.snapshot(i)
        for name in traj.names:
            torch.testing.assert_close(snap[name], copies[step][name], rtol=0, atol=0)


def test_selects_on_the_eval_dataset_and_loads_the_average(trained: tuple) -> None:
    trainer, cb, copies, eval_calls = trained
    sel = cb.selection
    assert eval_calls and sel is not None and len(sel.indices) == 2 and len(sel.history["loss"]) == 3
    assert cb.result is not None and cb.result.name == "sewa" and sel.config["samples"] == 2
    assert cb.vectorize is False  # the default for transformers: loop over samples
    avg = sewa.average(cb.trajectory, sel.weights)
    state = trainer.model.state_dict()
    for name in cb.trajectory.names:
        torch.testing.assert_close(state[name], avg[name], rtol=0, atol=0)
    assert not torch.equal(state["classifier.weight"], copies[8]["classifier.weight"])


def test_cross_entropy_on_logits_matches_the_models_loss_vmapped_or_not(trained: tuple) -> None:
    trainer, cb, _, _ = trained
    batch = next(iter(trainer.get_eval_dataloader()))
    own = cb._pair(batch)  # labels stay in the inputs
    assert "labels" in own[0] and own[1] is None
    cb.loss_fn = logits_cross_entropy
    try:
        split = cb._pair(batch)  # labels move to the targets
    finally:
        cb.loss_fn = None
    assert "labels" not in split[0] and torch.equal(split[1], batch["labels"])
    mix = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]], dtype=torch.float64)
    results = [MixedLoss(cb.trajectory, trainer.model, loss, vectorize=vectorize)(mix, pair)
               for loss, pair in ((model_loss, own), (logits_cross_entropy, split)) for vectorize in (False, True)]
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4, atol=1e-6)


class BatchNormNet(nn.Module):
    """A plain module with BatchNorm that returns a dict with a loss, as the Trainer expects."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(F.relu(self.bn(self.embed(input_ids).mean(1))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def test_baseline_rule_without_eval_data_recomputes_batchnorm(tmp_path: os.PathLike[str]) -> None:
    # One batch of all 8 samples per step, so the BatchNorm statistics the callback recomputes
    # over the training dataloader do not depend on its shuffling.
    torch.manual_seed(0)
    model = BatchNormNet()
    data = Tokens(8, 3)
    cb = SeWACallback(window=10, method=sewa.methods.ema(decay=0.5), start=0.5)  # no Trainer needed: nothing is evaluated
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path, per_device_train_batch_size=8, max_steps=6),
                                   train_dataset=data, callbacks=[cb])
    trainer.train()
    traj = cb.trajectory
    assert traj is not None and cb.start_step == 3 and traj.steps == [3, 4, 5, 6] and cb.selection is None
    avg = sewa.average(traj, sewa.weights.ema(4, 0.5))
    for name in traj.names:
        torch.testing.assert_close(model.state_dict()[name], avg[name], rtol=0, atol=0)
    with torch.no_grad():
        features = model.embed(data.ids).mean(1)  # the BatchNorm input of the averaged model
    torch.testing.assert_close(model.bn.running_mean, features.mean(0))
    torch.testing.assert_close(model.bn.running_var, features.var(0))  # unbiased, as BatchNorm keeps it


def test_user_batches_and_loss_without_the_trainer(tmp_path: os.PathLike[str]) -> None:
    model = tiny_bert()
    val = Tokens(8, 4)
    batches = [{k: torch.stack([val[i][k] for i in range(8)]) for k in ("input_ids", "attention_mask", "labels")}]
    cb = SeWACallback(window=2, method=sewa.methods.sewa(top_k=1, steps=2, samples=2), loss_fn=logits_cross_entropy,
                      selection_batches=batches, vectorize=True)  # the run above loops
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path, max_steps=3), train_dataset=Tokens(16, 1),
                                   callbacks=[cb])
    trainer.train()
    assert cb.selection is not None and cb.trajectory is not None and cb.trajectory.steps == [2, 3]
    chosen = cb.trajectory.snapshot(cb.selection.indices[0])
    torch.testing.assert_close(model.state_dict()["classifier.weight"], chosen["classifier.weight"], rtol=0, atol=0)


def test_selection_without_the_trainer_fails_before_training(tmp_path: os.PathLike[str]) -> None:
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=Tokens(8, 1),
                                   eval_dataset=Tokens(8, 2), callbacks=[SeWACallback()])
    with pytest.raises(ValueError, match="attach"):
        trainer.train()
    assert trainer.state.global_step == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
