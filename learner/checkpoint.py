"""Checkpoint layout, atomic commit and `latest` discovery.

A checkpoint is one directory, written under a temporary name and renamed when complete, so a crash never leaves a
torn checkpoint where a resume would look::

    <root>/step-00000010/
        hf/                  consolidated weights in Hugging Face format + the model directory's tokenizer and
                             processor files: `from_pretrained` and `vllm.LLM(model=...)` load it as it is
        deepspeed/state/     DeepSpeed's per-rank ZeRO-3 shards and optimizer state (exact resume, same world size)
        rng/rank<r>.pt       python, numpy and torch RNG states of each learner rank
        trainer_state.json   step, policy version, skipped steps
        run_config.json      the resolved run configuration
    <root>/latest            name of the newest complete checkpoint (replaced atomically)

The learner ranks write their parts into `<root>/.tmp-step-...`; rank 0 renames it once every rank is done. All
ranks must see the same filesystem (one node, or shared storage). Rank 0 flushes every file and directory of the
checkpoint to disk before the rename, and `<root>` after it: a rename can reach the disk before the data it names,
so a power loss could otherwise leave a complete-looking checkpoint of empty or torn files.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEEPSPEED_DIR = "deepspeed"
HF_DIR = "hf"
RNG_DIR = "rng"
STATE_FILE = "trainer_state.json"
RUN_CONFIG_FILE = "run_config.json"
LATEST_FILE = "latest"
_PREFIX = "step-"
# Files of the model directory that the consolidated weights replace (everything else is copied along).
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def path_for(root: str | Path, step: int) -> Path:
    """The directory of the checkpoint taken after learner update `step`."""
    return Path(root) / f"{_PREFIX}{step:08d}"


def begin(root: str | Path, step: int, rank: int) -> Path:
    """The temporary directory every rank writes into; rank 0 creates it afresh (callers barrier after this)."""
    tmp = Path(root) / f".tmp-{path_for(root, step).name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def save_rng(directory: Path, rank: int) -> None:
    """Saves this process's python, numpy and torch (CPU and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    (directory / RNG_DIR).mkdir(exist_ok=True)
    torch.save(state, directory / RNG_DIR / f"rank{rank}.pt")


def load_rng(directory: Path, rank: int) -> None:
    """Restores the RNG states `save_rng` saved for `rank`."""
    path = directory / RNG_DIR / f"rank{rank}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written by fewer learner ranks")
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_hf(directory: Path, model, state_dict: dict[str, torch.Tensor], model_dir: str) -> None:
    """Writes `state_dict` as a Hugging Face model with the model directory's tokenizer and processor files.

    Args:
        directory: the checkpoint directory (the model goes to its `hf/`).
        model: the policy module (under ZeRO-3 its parameters are empty shards; only its config and class are used).
        state_dict: the consolidated weights (from `Learner.consolidated_state_dict`).
        model_dir: the model directory the run started from.
    """
    out = directory / HF_DIR
    out.mkdir()
    for f in Path(model_dir).iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_FILES):
            shutil.copy2(f, out / f.name)
    model.save_pretrained(out, state_dict=state_dict)  # rewrites config.json and generation_config.json


def save_meta(directory: Path, trainer_state: dict[str, Any], run_config: dict[str, Any]) -> None:
    """Writes the trainer state (step, version, ...) and the resolved run config as JSON."""
    (directory / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    (directory / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2, default=str))


def read_state(directory: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (step, version, skipped_steps)."""
    return json.loads((Path(directory) / STATE_FILE).read_text())


def commit(root: str | Path, tmp: Path, keep_last: int) -> Path:
    """Rank 0: flushes the finished temporary directory to disk, renames it into place, points `latest` at it and
    prunes older checkpoints.

    Re-saving a step that already has a checkpoint (e.g. the final save right after a periodic one) replaces it.
    Pruning keeps the new checkpoint and the `keep_last - 1` highest-numbered others: after a resume from an older
    checkpoint the new step may be lower than existing ones, and the checkpoint just written is never the one deleted.
    """
    root = Path(root)
    final = root / tmp.name.removeprefix(".tmp-")
    _fsync_tree(tmp)
    if final.exists():
        trash = root / f".old-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    _fsync(root)
    pointer = root / f".{LATEST_FILE}.tmp"
    pointer.write_text(final.name)
    _fsync(pointer)
    os.replace(pointer, root / LATEST_FILE)
    _fsync(root)
    if keep_last > 0:
        others = [p for p in _complete(root) if p != final]
        for old in others[: max(len(others) - (keep_last - 1), 0)]:
            shutil.rmtree(old)
    return final


def _fsync(path: Path) -> None:
    """Flushes a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """Flushes every file under `directory` (whichever rank wrote it) and every directory's entries."""
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories never match the prefix)."""
    return sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir())


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`: the one `latest` names, else the highest step; None if none."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.exists() and (root / pointer.read_text().strip()).is_dir():
        return root / pointer.read_text().strip()
    found = _complete(root) if root.is_dir() else []
    return found[-1] if found else None
