"""Checkpoint files a user already has: read them safely, order them, stream them into a trajectory.

Reading never runs arbitrary code: ``.pt``/``.pth``/``.bin`` files go through
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers, and
``.safetensors`` files hold tensors only. The user's files are only ever opened for reading.

Example:
    >>> traj = trajectory_from_files(["run/ckpt-100.pt", "run/ckpt-200.pt"], model)
    >>> traj = trajectory_from_files("run/", window=20)          # a directory: every checkpoint in it
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._atomic import atomic_write
from ._names import strip_shared_prefixes
from ._ring import check_window
from .trajectory import Trajectory, TrajectoryError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointError",
    "load_state_dict_file",
    "order_checkpoints",
    "save_state_dict",
    "step_of",
    "trajectory_from_files",
    "unwrap_state_dict",
]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_STEP_KEYS = ("step", "global_step", "iteration")
# Huggingface-style layouts keep one checkpoint per sub-directory under these names.
_SUBDIR_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # torch.save(_use_new_zipfile_serialization=False)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read: corrupt, truncated, unsafe, or holds no state dict."""


# --------------------------------------------------------------------------- reading
def _read(path: Path, *, lazy: bool = False) -> tuple[Any, dict[str, str]]:
    """The raw object stored in ``path`` and (for safetensors) its metadata.

    ``lazy`` memory-maps a zip-format torch file, so that only its pickle is read: for looking
    at a step number, never for tensor values. Unmapped loading is what checks that each
    storage fits in its zip record (a crafted file can claim more and, mapped, read another
    tensor's bytes).
    """
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return _read_safetensors(path)
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_MAGIC)):
        raise CheckpointError(f"{path} is not a safetensors file or a torch.save file (first bytes {head[:8]!r}); it is corrupt or in another format")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy and head.startswith(_ZIP_MAGIC))
    except pickle.UnpicklingError as e:
        # torch names what it refused: "Unsupported global: GLOBAL x.Y", "unsupported GLOBAL
        # posix.system whose module posix is blocked", or "Unsupported class x.Y" before 2.4
        match = re.search(r"(?:GLOBAL|Unsupported class) ([\w.]+)", str(e))
        if match is not None:
            raise CheckpointError(
                f"{path} holds a Python object of type {match.group(1)}, not only tensors and plain containers. "
                "Loading it would run arbitrary code, so sewa reads .pt/.pth/.bin files with torch.load(weights_only=True) "
                "and refuses this one. If you trust the file, re-save its weights alone, e.g. "
                "sewa.io.save_state_dict(torch.load(path, weights_only=False)['state_dict'], 'x.safetensors')."
            ) from e
        raise CheckpointError(f"{path} is corrupt or truncated: torch.load failed ({_first_line(e)})") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated: torch.load failed ({_first_line(e)})") from e
    return obj, {}


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header.
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own (Rust) error types
        raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated): {_first_line(e)}") from e
    return tensors, meta


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def unwrap_state_dict(obj: Any, *, expected: Collection[str] | None = None, source: str = "checkpoint",
                      strip: bool = True) -> dict[str, Tensor]:
    """The model's state dict inside a loaded checkpoint, under plain parameter names.

    Descends into a top-level ``state_dict``, ``model_state_dict``, ``model`` or ``module``
    entry (repeatedly), drops non-tensor entries, and strips a ``model.`` (Lightning),
    ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefix only when every key carries
    it (the one rule of :mod:`sewa._names`), so two keys never become one.

    Args:
        obj: What ``torch.load`` or ``safetensors`` returned.
        expected: Names the result should have (from a template model). When given, a shared
            prefix is stripped only while the names do not already match, so a model whose
            submodule really is called ``model`` keeps its names.
        source: How to name the checkpoint in errors (usually its path).
        strip: Whether to strip shared prefixes at all (``False`` keeps the file's keys, as
            averaging files without a model does, so the output loads where the inputs did).

    Raises:
        CheckpointError: if no tensors are found.
    """
    while isinstance(obj, Mapping):
        key = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"{source} holds no tensors (top-level keys: {sorted(map(str, obj))[:10]}); "
                              f"expected a state dict or a dict with one of {list(_CONTAINER_KEYS)}")
    if not strip:
        return state
    rename = strip_shared_prefixes(state, expected)
    return {rename[k]: v for k, v in state.items()}


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Reads one checkpoint file as a state dict on the CPU, without running arbitrary code.

    ``.safetensors`` files are read with ``safetensors``; ``.pt``/``.pth``/``.bin`` files with
    ``torch.load(map_location="cpu", weights_only=True)``, which checks every storage against
    its zip record. Wrappers are removed by :func:`unwrap_state_dict`.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        CheckpointError: if the file is corrupt or truncated, holds no state dict, or holds
            Python objects that only a full (unsafe) unpickling could rebuild.
    """
    path = Path(path)
    obj, _ = _read(path)
    return unwrap_state_dict(obj, source=str(path))


def step_of(path: str | os.PathLike[str], obj: Any = None) -> int | None:
    """The training step stored in a checkpoint, or ``None`` when it holds none.

    Looks for a ``step``, ``global_step`` or ``iteration`` entry at the top level of the
    loaded object, or in the metadata of a safetensors file.

    Args:
        path: The checkpoint file (read when ``obj`` is not given; also names it in errors).
        obj: The loaded object (or safetensors metadata), to avoid reading the file again.
    """
    if obj is None:
        obj, meta = _read(Path(path), lazy=True)
        if meta:
            obj = meta
    if not isinstance(obj, Mapping):
        return None
    for key in _STEP_KEYS:
        value = obj.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        try:
            step = int(value)
        except (TypeError, ValueError):
            continue
        if step == value or isinstance(value, str):
            return step
    return None


# --------------------------------------------------------------------------- ordering
def _natural_key(path: Path) -> list[Any]:
    """``ckpt-2`` before ``ckpt-10``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", str(path)) if part]


def _expand(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[Path] = []
    seen: dict[tuple[int, int], Path] = {}
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = [f for f in p.iterdir() if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES]
            if not found:  # one checkpoint per sub-directory (e.g. transformers' checkpoint-500/)
                for d in (x for x in p.iterdir() if x.is_dir()):
                    f = next((d / n for n in _SUBDIR_FILES if (d / n).is_file()), None)
                    if f is not None:
                        found.append(f)
            if not found:
                raise FileNotFoundError(f"directory {p} holds no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no checkpoint file or directory at {p}")
    for p in out:
        # the same file under two spellings (dir/../dir/x.pt, absolute, symlink, hard link)
        st = p.stat()
        first = seen.setdefault((st.st_dev, st.st_ino), p)
        if first is not p:
            same = "" if first.resolve() == p.resolve() else " (a link to it)"
            raise ValueError(f"checkpoint {p} is the same file as {first}{same}: it is listed twice; pass it once")
    return out


def _stored_step(path: Path) -> int | None:
    """The step stored in ``path``, or ``None`` when it has none or cannot be read: a file that
    is corrupt is reported when (and only if) its tensors are read."""
    try:
        return step_of(path)
    except (CheckpointError, OSError):
        return None


def _ordered(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[tuple[Path, int]]:
    """Files in training order with the step of each: stored steps when every file has one,
    else natural order of the names, with the last number in each name (or the position) as step."""
    files = sorted(_expand(paths), key=_natural_key)
    stored = [_stored_step(f) for f in files]
    if all(s is not None for s in stored):
        pairs = sorted(zip(files, [int(s) for s in stored if s is not None], strict=True), key=lambda fs: fs[1])
        for (a, sa), (b, sb) in zip(pairs, pairs[1:], strict=False):
            if sa == sb:
                raise ValueError(f"checkpoints {a} and {b} both hold step {sa}; pass only one of them")
        return pairs
    numbers = [re.findall(r"\d+", f.stem) or re.findall(r"\d+", f.parent.name) for f in files]
    steps = [int(n[-1]) for n in numbers if n]
    if len(steps) != len(files) or any(a >= b for a, b in zip(steps, steps[1:], strict=False)):
        steps = list(range(len(files)))
    return list(zip(files, steps, strict=True))


def order_checkpoints(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Checkpoint files in training order.

    Directories are expanded to the ``.safetensors``/``.pt``/``.pth``/``.bin`` files directly
    inside them (or, when there are none, to one ``model.safetensors``/``pytorch_model.bin`` per
    sub-directory, as ``transformers`` writes them). Files are ordered by the step stored in
    them (see :func:`step_of`) when every file has one, else by natural sort of their paths
    (``ckpt-2`` before ``ckpt-10``).
    """
    return [p for p, _ in _ordered(paths)]


# --------------------------------------------------------------------------- trajectory
def trajectory_from_files(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    model: nn.Module | None = None,
    *,
    window: int | None = None,
    dtype: torch.dtype | str | None = None,
    buffers: bool = False,
) -> Trajectory:
    """A trajectory built from checkpoint files, read one at a time.

    Files are ordered by :func:`order_checkpoints` and streamed into the trajectory, so peak
    memory is the trajectory plus about one checkpoint. Each snapshot's step is the step
    stored in its file, else the last number in its name, else its position.

    Args:
        paths: Files, directories, or a mix.
        model: The architecture, which decides what is recorded (floating-point parameters,
            plus floating-point buffers when ``buffers``), and which wrapper prefixes of the
            files' keys are removed to match it. Without it the first file is the template,
            every floating-point entry (buffers included) is recorded, and keys are kept as
            they are in the files.
        window: Snapshots to keep; only the newest ``window`` files are read (a corrupt file
            outside them is not an error). Default: all. Larger than the number of files:
            as many as there are files.
        dtype: Storage dtype (``float64``, ``float32``, ``bfloat16`` or ``float16``). Default:
            the model's (or first file's) widest floating dtype. A tensor stored in another
            floating dtype in some file is cast.
        buffers: With ``model``: also record floating-point buffers.

    Raises:
        TypeError: if ``window`` is not an integer.
        ValueError: if ``window`` is not positive, or a file is listed twice.
        CheckpointError: for a file that is corrupt, truncated or unsafe to unpickle.
        TrajectoryError: for a file from another architecture (the message names the file).
    """
    if window is not None:
        check_window(window)
    ordered = _ordered(paths)
    window = len(ordered) if window is None else min(window, len(ordered))
    ordered = ordered[-window:]
    expected: list[str] | None = None
    traj: Trajectory | None = None
    if model is not None:
        traj = Trajectory(model, window, dtype=dtype, buffers=buffers)
        expected = traj.names
    for path, step in ordered:
        obj, _ = _read(path)
        state = unwrap_state_dict(obj, expected=expected, source=str(path), strip=model is not None)
        del obj
        try:
            if traj is None:
                traj = Trajectory(state, window, dtype=dtype)
                expected = traj.names
            traj.push(state, step, what="checkpoint")
        except TrajectoryError as e:
            raise TrajectoryError(f"{path}: {e}") from e
        del state  # free this checkpoint before the next is read
    assert traj is not None
    return traj


# --------------------------------------------------------------------------- writing
def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike[str], *, overwrite: bool = False,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Saves a state dict as a ``.safetensors`` file, atomically.

    Tensors sharing memory (tied weights, views of one buffer) are cloned, since safetensors
    refuses shared storage; every name is kept, so loading gives the same state dict.

    Args:
        state: Names to tensors (any device; saved from the CPU).
        path: Destination, ending in ``.safetensors``.
        overwrite: Replace an existing file. By default an existing file is an error.
        metadata: Strings stored in the header, e.g. ``{"step": "1000"}`` (read by :func:`step_of`).

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_state_dict writes safetensors files; give a path ending in .safetensors, not {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors: dict[str, Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state entry {name!r} is a {type(t).__name__}, not a tensor; save only tensors (put the rest in metadata)")
        t = t.detach().to("cpu").contiguous()
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key in seen and t.numel() > 0:
            t = t.clone()
        seen.add(key)
        tensors[str(name)] = t
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), overwrite=overwrite)
    return path
