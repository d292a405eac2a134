"""Checkpoint directories: atomic commit, `latest`, pruning (the file layer only; tests/learner/test_learner_group.py
covers saving and resuming a real DeepSpeed learner)."""

from __future__ import annotations

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
