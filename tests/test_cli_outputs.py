"""What the commands write and refuse to write: output metadata, special files, partial outputs
after a failure, opt-in trusted pickles, and a missing optional dependency."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from _tiny_task import write_checkpoints, write_task
from safetensors import safe_open

from sewa.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_out")
    task = write_task(root / "tasks", "task.py")
    write_checkpoints(root / "ckpts", task, n=5)
    write_task(root / "tasks", "nan_loss.py", extra="\n_loss = loss\ndef loss(outputs, targets):\n"
                                                      "    return _loss(outputs, targets) * float('nan')\n")
    return root


def _select(root: Path, task: str, out: Path, *extra: str) -> list[str]:
    return ["select", "--task", str(root / "tasks" / task), "--checkpoints", str(root / "ckpts"), "--top-k", "2",
            "--steps", "3", "--samples", "2", "--out", str(out), "--no-progress", *extra]


def test_average_metadata_is_conventional_and_names_files_relatively(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    assert main(["average", "--checkpoints", str(run_dir / "ckpts"), "--method", "lawa", "--top-k", "2", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    info = json.loads(meta["sewa"])
    assert info["method"] == "lawa" and info["settings"] == {"top_k": 2}
    assert info["checkpoints"] == [f"ckpt-{s}.safetensors" for s in (3, 6, 9, 12, 15)]  # relative, oldest first
    assert not any(os.sep in name for name in info["checkpoints"])


def test_force_replaces_only_regular_files(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    code = main(["compare", "--task", str(run_dir / "tasks" / "task.py"), "--checkpoints", str(run_dir / "ckpts"),
                 "--methods", "last", "--json", str(fifo), "--force", "--no-progress"])
    assert code == 2 and "not a regular file" in capsys.readouterr().err
    assert fifo.exists() and not fifo.is_file()  # the node is untouched


def test_a_failed_selection_writes_nothing_and_removes_the_folders_it_made(run_dir: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "deeper" / "avg.safetensors"
    code = main(_select(run_dir, "nan_loss.py", out, "--json", str(tmp_path / "new" / "sel.json")))
    err = capsys.readouterr().err
    assert code == 2 and "not finite" in err and "step" in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()


def test_safe_globals_is_an_explicit_opt_in(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpts = tmp_path / "with_args"
    ckpts.mkdir()
    for f in sorted((run_dir / "ckpts").iterdir()):
        from safetensors.torch import load_file

        torch.save({"state_dict": load_file(str(f)), "args": argparse.Namespace(lr=0.1)}, ckpts / (f.stem + ".pt"))
    argv = ["average", "--checkpoints", str(ckpts), "--method", "uniform", "--out", str(tmp_path / "u.safetensors")]
    assert main(argv) == 2
    assert "Namespace" in capsys.readouterr().err
    assert main([*argv, "--safe-globals", "argparse.Namespace"]) == 0
    assert main([*argv, "--force", "--safe-globals", "argparse.Nope"]) == 2
    assert "no such importable name" in capsys.readouterr().err


def test_a_missing_optional_dependency_names_the_extra(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "r.json"
    assert main(["compare", "--task", str(run_dir / "tasks" / "task.py"), "--checkpoints", str(run_dir / "ckpts"),
                 "--methods", "last,uniform", "--json", str(results), "--no-progress"]) == 0
    capsys.readouterr()
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code = main(["report", str(results), "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert code == 2 and "needs matplotlib" in err and '[cli]"' in err and "Traceback" not in err


def test_compare_help_lists_settings_from_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["select", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--samples" in text and "--tau-start" in text and "--decay" not in text  # EMA's setting is not select's
    assert main(["compare", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--decay" in text and "(default 0.9)" in text
