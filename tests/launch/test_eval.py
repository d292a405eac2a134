"""Smoke test of launch/eval.py as a user runs it: a subprocess, two short episodes, the files it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _eval(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/eval.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_random_policy_run_writes_log_plot_gifs_and_table(tmp_path):
    out = tmp_path / "eval"
    proc = _eval(
        "game=2048",
        "policy=random",
        "episodes=2",
        "max_steps=12",
        f"output_dir={out}",
        "+difficulty.rows=3",
        "gif_scale=0.25",
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    assert "rows" in (out / "eval.log").read_text()
    assert Image.open(out / "scores.png").format == "PNG"
    for i in range(2):
        frames = iio.imread(out / f"run_{i}.gif", index=None)
        assert 2 <= len(frames) <= 13 and frames.shape[1:3] == (210, 161)  # 840x644 frames at a quarter
    results = json.loads((out / "results.json").read_text())
    assert results["game"] == "2048" and results["policy"] == "random" and len(results["runs"]) == 2
    for run in results["runs"]:
        assert 1 <= run["length"] <= 12 and run["invalid_rate"] == 0.0 and run["score"] >= 0
    assert results["mean"]["length"] == sum(r["length"] for r in results["runs"]) / 2
    table = (out / "results.md").read_text()
    assert "| mean |" in table and "invalid-action rate" in table


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["game=chess"], "Available options in 'game'"),
        (["game=mix"], "'game' must select one game"),
        (["game=swap", "+difficulty.n_colours=99"], "'n_colours'"),
        (["game=swap", "policy=genius"], "'policy' must be one of random"),
    ],
)
def test_config_errors_fail_at_start_naming_the_key(tmp_path, overrides, message):
    proc = _eval(*overrides, f"output_dir={tmp_path / 'bad'}")
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not list((tmp_path / "bad").glob("*.gif"))
