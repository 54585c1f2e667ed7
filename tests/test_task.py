"""Loading and using a task: the contract, its checks, and batch-size-weighted evaluation."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from _tiny_task import write_task
from torch import nn

import sewa
from sewa.task import MAX_BATCHES, Task, TaskError, batch_size, forward, load_task


def test_load_from_file_and_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_task(tmp_path, "my_tiny_task.py")
    task = load_task(str(path))
    assert isinstance(task.new_model(), nn.Module) and task.metric is not None and task.source == str(path)
    monkeypatch.syspath_prepend(str(tmp_path))
    by_name = load_task("my_tiny_task")
    assert by_name.source == "my_tiny_task" and by_name.metric is not None
    assert len(list(by_name.batches("train"))) == 4


def test_task_file_can_import_its_neighbours(tmp_path: Path) -> None:
    (tmp_path / "helper_for_sewa_task.py").write_text("WIDTH = 3\n")
    path = write_task(tmp_path, "t.py", extra="\nimport helper_for_sewa_task\nassert helper_for_sewa_task.WIDTH == 3\n")
    load_task(str(path))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("\ndel model\n", "does not define model()"),
        ("\ndel batches, loss\n", "does not define batches(), loss()"),
        ("\nloss = 3\n", "does not define loss()"),
        ("\nmetric = 0.5\n", "defines metric as a float"),
        ("\nraise ImportError('needs a GPU library')\n", "failed to import: ImportError: needs a GPU library"),
    ],
)
def test_contract_violations(tmp_path: Path, extra: str, message: str) -> None:
    path = write_task(tmp_path, "t.py", extra=extra)
    with pytest.raises(TaskError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_task(str(path))


def test_missing_file_and_module(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no task file"):
        load_task(str(tmp_path / "absent.py"))
    with pytest.raises(TaskError, match="no task module named"):
        load_task("sewa_no_such_module_xyz")
    with pytest.raises(TaskError, match="neither a .py file nor an importable module"):
        load_task("not a module!")


def test_missing_test_split_falls_back_to_val(tmp_path: Path) -> None:
    task = load_task(str(write_task(tmp_path, "t.py", has_test=False, metric=False)))
    assert not task.has_split("test") and task.split("test") is None
    assert task.eval_split() == "val"
    with pytest.raises(TaskError, match="has no 'test' split"):
        task.require("test", "for evaluation")
    assert load_task(str(write_task(tmp_path, "u.py"))).eval_split() == "test"


def test_split_checks() -> None:
    empty = Task(model=lambda: nn.Linear(2, 1), batches=lambda s: [], loss=nn.functional.mse_loss, source="t")
    with pytest.raises(TaskError, match="yielded no batches"):
        empty.check("val", "to select")
    singles = Task(model=lambda: nn.Linear(2, 1), batches=lambda s: [torch.zeros(2)], loss=nn.functional.mse_loss, source="t")
    with pytest.raises(TaskError, match="expected \\(inputs, targets\\) pairs"):
        singles.check("val", "to select")
    wrong = Task(model=lambda: "not a model", batches=lambda s: [], loss=nn.functional.mse_loss, source="t")  # type: ignore[arg-type, return-value]
    with pytest.raises(TaskError, match="returned a str"):
        wrong.new_model()
    number = Task(model=lambda: nn.Linear(2, 1), batches=lambda s: 3, loss=nn.functional.mse_loss, source="t")  # type: ignore[arg-type, return-value]
    with pytest.raises(TaskError, match="returned a int"):
        number.split("val")


def test_evaluate_weights_batches_by_size() -> None:
    # An identity "model" on 1-d inputs: the loss of a batch is the mean of its inputs, the metric
    # the fraction of positive inputs. Batch sizes 1 and 3 make the weighting visible.
    data = [(torch.tensor([4.0]), torch.zeros(1)), (torch.tensor([0.0, 1.0, -1.0]), torch.zeros(3))]
    task = Task(model=nn.Identity, batches=lambda s: data, loss=lambda out, y: out.mean(),
                metric=lambda out, y: float((out > 0).float().mean()), source="t")
    model = nn.Identity().train()
    loss, metric = task.evaluate(model, "test")
    assert math.isclose(loss, (4.0 * 1 + 0.0 * 3) / 4)
    assert metric is not None and math.isclose(metric, (1.0 * 1 + (1 / 3) * 3) / 4, rel_tol=1e-6)
    assert model.training  # the mode is restored
    no_metric = Task(model=nn.Identity, batches=lambda s: data, loss=lambda out, y: out.mean(), source="t")
    assert no_metric.evaluate(model, "test")[1] is None


def test_forward_and_batch_size_conventions() -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    assert torch.equal(forward(Two(), (torch.ones(2), torch.ones(2))), torch.full((2,), 2.0))
    assert torch.equal(forward(Two(), {"a": torch.ones(2), "b": torch.zeros(2)}), torch.ones(2))
    assert batch_size(torch.zeros(5, 3)) == 5 and batch_size(torch.tensor(1.0)) == 1
    assert batch_size({"labels": torch.zeros(4)}) == 4 and batch_size([1, 2, 3]) == 3


# ----------------------------------------------------------------- a task that exits (issue 12.8)
@pytest.mark.parametrize(
    ("extra", "code"),
    [("\nimport sys\nsys.exit(0)\n", "0"),
     ("\nimport argparse\nargparse.ArgumentParser().parse_args(['--no-such-flag'])\n", "2")],
)
def test_exit_while_importing_is_a_task_error(tmp_path: Path, extra: str, code: str) -> None:
    path = write_task(tmp_path, "exits.py", extra=extra)
    with pytest.raises(TaskError, match=rf"task file .*exits\.py called sys\.exit\({code}\) while being imported"):
        load_task(str(path))


def test_exit_inside_a_task_function_is_a_task_error(tmp_path: Path) -> None:
    extra = "\nimport sys\n_model = model\ndef model():\n    sys.exit(3)\n\ndef batches(split):\n    yield from []\n    sys.exit(0)\n"
    task = load_task(str(write_task(tmp_path, "t.py", extra=extra)))
    with pytest.raises(TaskError, match=r"model\(\) called sys\.exit\(3\)"):
        task.new_model()
    with pytest.raises(TaskError, match=r"batches\('val'\) called sys\.exit\(0\) while being iterated"):
        task.check("val", "to select")


def test_keyboard_interrupt_while_importing_propagates(tmp_path: Path) -> None:
    path = write_task(tmp_path, "interrupted.py", extra="\nraise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_task(str(path))


# ----------------------------------------------------------------- one-shot and endless batches (12.9, 12.10)
def _pairs(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1,), float(i)), torch.zeros(1)) for i in range(n)]


def test_the_same_used_generator_twice_is_refused() -> None:
    shared = iter(_pairs(4))
    task = Task(model=nn.Identity, batches=lambda s: shared, loss=lambda out, y: out.mean(), source="t")
    task.check("val", "to select")  # reads the first batch of the shared iterator
    with pytest.raises(TaskError, match=r"batches\('val'\) returned the same list_iterator .* must return a fresh iterable on each call"):
        task.require("val", "to select")


def test_every_pass_calls_batches_afresh() -> None:
    calls: list[str] = []

    def batches(split: str):  # type: ignore[no-untyped-def]
        calls.append(split)
        yield from _pairs(4)

    task = Task(model=nn.Identity, batches=batches, loss=lambda out, y: out.mean(), source="t")
    task.check("val", "to select")
    assert len(list(task.require("val", "to select"))) == 4  # no batch lost to the check
    loss, _ = task.evaluate(nn.Identity(), "val")
    assert loss == pytest.approx((0 + 1 + 2 + 3) / 4) and calls == ["val"] * 3


def test_a_list_split_stays_reiterable() -> None:
    task = Task(model=nn.Identity, batches=lambda s: _pairs(3), loss=lambda out, y: out.mean(), source="t")
    split = task.require("val", "to select")
    assert len(list(split)) == 3 and len(list(split)) == 3


def test_an_endless_split_stops_at_the_cap() -> None:
    task = Task(model=nn.Identity, batches=lambda s: itertools.cycle(_pairs(2)), loss=lambda out, y: out.mean(),
                source="t", max_batches=10)
    task.check("val", "to select")  # the first batch is fine
    with pytest.raises(TaskError, match=r"more than 10 batches in one pass \(sewa\.task\.MAX_BATCHES\).*itertools\.cycle"):
        task.evaluate(nn.Identity(), "val")
    cycled_list = Task(model=nn.Identity, batches=lambda s: _CycledList(), loss=lambda out, y: out.mean(), source="t",
                       max_batches=10)
    with pytest.raises(TaskError, match="more than 10 batches"):
        list(cycled_list.require("val", "to select"))


class _CycledList:
    """A re-iterable whose every iteration is endless."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        return itertools.cycle(_pairs(2))


def test_the_default_cap_bounds_materialising_an_endless_split(tmp_path: Path) -> None:
    extra = "\nimport itertools\ndef batches(split):\n    return itertools.cycle([(torch.zeros(1, 4), torch.zeros(1).long())])\n"
    task = load_task(str(write_task(tmp_path, "endless.py", extra=extra)))
    assert task.max_batches == MAX_BATCHES == 100_000
    with pytest.raises(TaskError, match="more than 100,000 batches"):
        list(task.require("val", "to select"))


# ----------------------------------------------------------------- the metric's name (issue 13.9)
@pytest.mark.parametrize(
    ("extra", "name"),
    [("", "metric"),
     ("\nMETRIC_NAME = 'accuracy'\n", "accuracy"),
     ("\ndef top1(outputs, targets):\n    return 1.0\nmetric = top1\n", "top1"),
     ("\nmetric = lambda outputs, targets: 1.0\n", "metric"),
     ("\nMETRIC_NAME = 'F1 score'\nmetric = lambda outputs, targets: 1.0\n", "F1 score")],
)
def test_the_task_names_its_metric(tmp_path: Path, extra: str, name: str) -> None:
    assert load_task(str(write_task(tmp_path, "t.py", extra=extra))).metric_name == name


def test_a_bad_metric_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"sets METRIC_NAME to 3, expected a non-empty string"):
        load_task(str(write_task(tmp_path, "t.py", extra="\nMETRIC_NAME = 3\n")))


def test_a_task_may_define_a_judge_for_auto(tmp_path: Path) -> None:
    task = load_task(str(write_task(tmp_path, "t.py", extra="\nJUDGE_NAME = 'return'\ndef judge(model):\n    return [1.0, 2.0]\n")))
    ev = task.evaluator("val", "to test")
    assert task.judge_name == ev.judge_name == "return" and ev.judge is not None
    traj = sewa.Trajectory(task.new_model(), window=2)
    traj.push(task.new_model(), step=1)
    assert ev.judged(traj, torch.ones(1, dtype=torch.float64)).tolist() == [1.0, 2.0]
    assert load_task(str(write_task(tmp_path, "u.py"))).judge is None
    with pytest.raises(TaskError, match="defines judge as a int"):
        load_task(str(write_task(tmp_path, "v.py", extra="\njudge = 3\n")))
    with pytest.raises(TaskError, match="sets JUDGE_NAME to ''"):
        load_task(str(write_task(tmp_path, "w.py", extra="\nJUDGE_NAME = ''\ndef judge(model):\n    return [1.0]\n")))
