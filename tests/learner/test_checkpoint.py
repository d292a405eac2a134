"""Checkpoint directories: atomic commit, `latest`, pruning (the file layer only; tests/learner/test_learner_group.py
covers saving and resuming a real DeepSpeed learner)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from learner import checkpoint


def _write(root, step: int, payload: str, keep_last: int):
    tmp = checkpoint.begin(root, step, rank=0)
    (tmp / "payload").write_text(payload)
    return checkpoint.commit(root, tmp, keep_last)


def test_commit_renames_points_latest_and_prunes_old_ones(tmp_path):
    assert checkpoint.latest(tmp_path) is None and checkpoint.latest(tmp_path / "missing") is None
    for step in (10, 20, 30):
        final = _write(tmp_path, step, f"s{step}", keep_last=2)
        assert final == checkpoint.path_for(tmp_path, step) and checkpoint.latest(tmp_path) == final
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000020", "step-00000030"]


def test_unfinished_checkpoint_is_never_latest_and_resaving_a_step_replaces_it(tmp_path):
    _write(tmp_path, 5, "first", keep_last=0)
    torn = checkpoint.begin(tmp_path, 6, rank=0)  # a crash before commit leaves only the temporary directory
    (torn / "payload").write_text("half")
    assert checkpoint.latest(tmp_path) == checkpoint.path_for(tmp_path, 5)
    (tmp_path / checkpoint.LATEST_FILE).unlink()  # without the pointer, the highest complete step is found
    assert checkpoint.latest(tmp_path) == checkpoint.path_for(tmp_path, 5)
    final = _write(tmp_path, 5, "again", keep_last=0)
    assert (final / "payload").read_text() == "again"
    assert checkpoint.begin(tmp_path, 6, rank=0).exists() and not (torn / "payload").exists()  # begun afresh


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    # A run resumed from an older checkpoint saves steps lower than those a later, abandoned run left behind.
    for step in (6, 8):
        _write(tmp_path, step, f"s{step}", keep_last=2)
    final = _write(tmp_path, 4, "resumed", keep_last=2)
    assert (final / "payload").read_text() == "resumed" and checkpoint.latest(tmp_path) == final
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000004", "step-00000008"]
    _write(tmp_path, 5, "next", keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000005"]


def test_every_file_and_directory_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(src))) or real_replace(src, dst))
    tmp = checkpoint.begin(tmp_path, 3, rank=0)
    (tmp / "rng").mkdir()
    (tmp / "rng" / "rank1.pt").write_bytes(b"written by another rank")
    (tmp / "trainer_state.json").write_text("{}")
    checkpoint.commit(tmp_path, tmp, keep_last=0)

    renamed = events.index(("replace", str(tmp)))
    synced_before = {path for kind, path in events[:renamed] if kind == "fsync"}
    expected = {str(tmp), str(tmp / "rng"), str(tmp / "rng" / "rank1.pt"), str(tmp / "trainer_state.json")}
    assert expected <= synced_before
    pointer = events.index(("replace", str(tmp_path / ".latest.tmp")))
    assert ("fsync", str(tmp_path / ".latest.tmp")) in events[renamed:pointer]  # the pointer's content, then its name
    assert events[-1] == ("fsync", str(tmp_path))  # the root's entries (both renames) last


def test_saved_model_config_is_the_model_directory_s(learners_1, tmp_path, tiny_model_dir):
    # The learner runs without a KV cache; that is its business, not a setting of the model it saves.
    path = learners_1.save_checkpoint(str(tmp_path), {}, keep_last=1)
    saved = json.loads((Path(path) / checkpoint.HF_DIR / "config.json").read_text())
    source = json.loads((Path(tiny_model_dir) / "config.json").read_text())

    def settings(config: dict) -> dict:  # save_pretrained writes each dtype and its own version: drop those
        drop = {"dtype", "transformers_version"}
        return {k: settings(v) if isinstance(v, dict) else v for k, v in config.items() if k not in drop}

    assert settings(saved) == settings(source)
