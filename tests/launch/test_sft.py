"""G1's cold start (launch/sft.py): G1's filter, the dataset on disk, SFT with the learner group, then RL from it.

- the filter keeps the expert's responses and rejects, and counts, misread boards and illegal or missing actions;
- the dataset round-trips: the boards' pixels, the texts, and the schema metadata `datasets` types its columns by;
- end to end on a real Ray cluster: collect an expert dataset, fine-tune the tiny model with the DeepSpeed learner
  group (the eval loss drops), and `launch/train.py model.path=<checkpoint>/hf` loads it into vLLM and runs RL steps;
- the cached cold start (model=tiny_g1's) is built once, into a complete model directory, and then reused.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from train_runs import REPO, tensorboard_scalars

import envs
from actors.models import COLD_STARTS, check_model_dir
from actors.policies import PolicyConfig, make_policy
from envs import GamePool, GameSpec
from envs.game_2048 import apply_move
from launch.sft import CollectConfig, cold_start_key, collect, ensure_cold_start, load_config
from learner import checkpoint
from learner.sft import cosine_lr, read_split, sft_loss, write_split


class MisreadingExpert:
    """The expert's answers, with the board misread on every other state and no answer on every third."""

    name, failures = "misreading", 0

    def __init__(self) -> None:
        self.calls = 0

    def respond(self, games):
        replies = []
        for game in games:
            self.calls += 1
            text = envs.expert_response(game)
            if self.calls % 3 == 0:
                text = ""
            elif self.calls % 2 == 0:
                text = text.replace(game.text_observation(), "2|2|2|2", 1)
            replies.append(text)
        return replies


def board(text: str) -> list[list[int]]:
    """A 2048 board from its text observation."""
    return [[0 if v == "-" else int(v) for v in row.split("|")] for row in text.split("\n")]


def assert_moved_then_one_spawn(moved: list[list[int]], after: list[list[int]]) -> None:
    """`after` is the board `moved` plus exactly one new tile on an empty cell."""
    changed = [(r, c) for r in range(4) for c in range(4) if moved[r][c] != after[r][c]]
    assert len(changed) == 1 and moved[changed[0][0]][changed[0][1]] == 0


def _pool(game: str = "2048") -> GamePool:
    return GamePool([GameSpec(name=game)], num_games=8, seed=0)


def test_filter_keeps_exact_perception_and_legal_actions_and_counts_the_rest():
    config = CollectConfig(states=12, batch=5)
    kept, counts = collect(_pool(), make_policy(PolicyConfig(kind="expert")), config)
    assert counts == {
        "states": 12,
        "kept": 12,
        "rejected_no_reply": 0,
        "rejected_invalid_action": 0,
        "rejected_perception": 0,
    }
    assert all(e.perception == 1.0 and e.game == "2048" for e in kept)

    kept, counts = collect(_pool(), MisreadingExpert(), config)
    # calls 1..12: every third empty (4), of the rest the even ones misread (2, 4, 8, 10), 1 5 7 11 kept
    assert counts["rejected_no_reply"] == 4 and counts["rejected_perception"] == 4 and counts["kept"] == 4
    assert len(kept) == 4

    # The random policy answers a legal move with no perception block: rejected under exact and cells alike.
    random_policy = make_policy(PolicyConfig(kind="random"))
    for perception in ("exact", "cells"):
        _, counts = collect(_pool(), random_policy, CollectConfig(states=6, perception=perception, min_perception=0.5))
        assert counts["rejected_perception"] == 6


def test_filter_rejects_an_illegal_action():
    class Stubborn:
        """The expert's perception, then always the same move: illegal on some boards."""

        name, failures = "stubborn", 0

        def respond(self, games):
            return [envs.expert_response(g).rsplit("<answer>", 1)[0] + "<answer>up</answer>" for g in games]

    _, counts = collect(_pool(), Stubborn(), CollectConfig(states=40))
    assert counts["rejected_invalid_action"] > 0
    assert counts["rejected_invalid_action"] + counts["kept"] == 40


def test_a_continue_pool_collects_along_the_teachers_own_play():
    """pool.mode=continue: each slot's game moves on with the teacher's answer, so a slot's next state is the board
    the teacher's move led to (after the spawn), and batches hold at most one state per slot."""
    pool = GamePool([GameSpec(name="2048", random_steps=0)], num_games=3, seed=0, mode="continue")
    kept, counts = collect(pool, make_policy(PolicyConfig(kind="expert")), CollectConfig(states=9, batch=64))
    assert counts["kept"] == 9

    for slot in range(3):
        first, second = kept[slot], kept[slot + 3]  # batches of 3 (one per slot), slots in order
        moved, _ = apply_move(board(first.text_observation), envs.make("2048").parse_action(first.response))
        assert_moved_then_one_spawn(moved, board(second.text_observation))


def test_a_player_moves_the_games_on_and_the_teacher_labels_the_states_it_reaches():
    """DAgger (player.kind=vllm: the student plays): each slot's next state is the board the player's move led to, not
    the teacher's; the teacher's answers are what is kept; the player's illegal moves are counted and replaced by a
    random legal one, so its game still moves on."""

    class AlwaysUp:
        name, failures = "always-up", 0

        def respond(self, games):
            return ["<answer>up</answer>"] * len(games)

    pool = GamePool([GameSpec(name="2048", random_steps=0)], num_games=3, seed=0, mode="continue")
    expert = make_policy(PolicyConfig(kind="expert"))
    kept, counts = collect(pool, expert, CollectConfig(states=30, batch=64), player=AlwaysUp())
    assert counts["kept"] == 30 and all(e.response.endswith("</answer>") and "<think>" in e.response for e in kept)

    up_was_illegal, teacher_differed = 0, 0
    for first, second in zip(kept[:-3], kept[3:], strict=True):  # batches of 3 (one per slot), slots in order
        before, after = board(first.text_observation), board(second.text_observation)
        moved, _ = apply_move(before, 0)  # up
        if moved == before:  # illegal: a random legal move instead, and the board still changed
            up_was_illegal += 1
            assert after != before
            continue
        assert_moved_then_one_spawn(moved, after)  # up, then one new tile
        teacher_differed += envs.make("2048").parse_action(first.response) != 0
    last_batch = [e for e in kept[-3:] if apply_move(board(e.text_observation), 0)[0] == board(e.text_observation)]
    assert counts["player_illegal"] == up_was_illegal + len(last_batch) > 0
    assert teacher_differed > 0  # the teacher would have moved otherwise: the states are the player's


def test_dataset_round_trips_with_the_boards_pixels_and_hf_features(tmp_path):
    pool = _pool("swap")
    kept, _ = collect(pool, make_policy(PolicyConfig(kind="expert")), CollectConfig(states=3))
    path = write_split(tmp_path, "train", kept)
    back = read_split(tmp_path, "train")
    assert back == kept
    fresh = GamePool([GameSpec(name="swap")], num_games=8, seed=0).sample(3)  # the same states again
    for example, state in zip(back, fresh, strict=True):
        np.testing.assert_array_equal(example.board(), state.image)
    features = json.loads(pq.read_schema(path).metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert pq.read_schema(path).field("image").type.names == ["bytes", "path"]
    with pytest.raises(FileNotFoundError, match="validation.parquet"):
        read_split(tmp_path, "validation")


def test_sft_loss_is_the_token_mean_nll_and_the_schedule_warms_up_then_decays():
    import torch

    logprobs = torch.tensor([[-1.0, -3.0, float("-inf")], [-2.0, float("-inf"), float("-inf")]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, metrics = sft_loss(logprobs, mask)
    assert loss.item() == pytest.approx(2.0) and metrics["nll"] == pytest.approx(2.0)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 2] == 0

    lrs = [cosine_lr(s, 20, 1e-3, 4, 0.1) for s in range(21)]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False)) and lrs[-1] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["collect.perception=fuzzy"], ["collect.perception", "exact, cells"]),
        (["teacher.kind=oracle"], ["kind", "random, expert, vllm, openai"]),
        (["learner.num=2", "sft.batch_size=3"], ["sft.batch_size", "learner.num"]),
        (["+sft.steps=3"], ["sft.steps", "allowed keys", "epochs"]),
    ],
)
def test_bad_config_names_the_key_and_the_allowed_values(overrides, names):
    with pytest.raises(ValueError) as error:
        load_config(["game=2048", "model=tiny", *overrides])
    assert all(name in str(error.value) for name in names), str(error.value)


def test_cold_start_then_rl_continues_from_its_checkpoint(ray_cluster, tmp_path, tiny_model_dir):
    cluster = ray_cluster(num_cpus=3)
    out = tmp_path / "sft"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "sft.py"), "game=2048", "model=tiny", f"model.path={tiny_model_dir}",
         "collect.states=48", "collect.validation_fraction=0.2", "sft.batch_size=8", "sft.epochs=2",
         "sft.eval_every=2", "sft.warmup_steps=2", f"output_dir={out}"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads((out / "dataset" / "stats.json").read_text())
    assert stats["kept"] == 48 and stats["train"] + stats["validation"] == 48, stats
    scalars = tensorboard_scalars(out / "tensorboard")
    eval_loss = [value for _, value in scalars["loss/sft_eval"]]
    # 38 training examples / 8 = 4 steps per epoch, 2 epochs; evals before training and every 2 steps
    assert len(scalars["loss/sft"]) == 8 and len(eval_loss) == 5
    assert eval_loss[-1] < eval_loss[0] - 0.5, eval_loss
    hf = checkpoint.latest(out / "checkpoints") / checkpoint.HF_DIR

    rl = tmp_path / "rl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "game=2048", "model=tiny", f"model.path={hf}",
         "trainer.total_steps=2", "trainer.groups_per_step=4", "actors.states_per_round=4", "actors.group_size=4",
         "actors.max_new_tokens=16", f"output_dir={rl}"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_config = json.loads((checkpoint.latest(rl / "checkpoints") / checkpoint.RUN_CONFIG_FILE).read_text())
    assert run_config["learner"]["model_dir"] == str(hf)  # learners and engines started from the cold start
    assert len(tensorboard_scalars(rl / "tensorboard")["reward/total"]) == 2
    assert checkpoint.read_state(checkpoint.latest(rl / "checkpoints"))["step"] == 2


def test_the_cached_cold_start_is_built_once_then_reused(ray_local, tmp_path, tiny_model_dir, capsys):
    small = ["game=2048", "model=tiny", f"model.path={tiny_model_dir}", "collect.states=8", "collect.batch=8",
             "collect.validation_fraction=0.25", "sft.batch_size=3", "sft.epochs=1", "sft.warmup_steps=0"]  # fmt: skip
    first = ensure_cold_start("tiny_g1", small, cache_dir=tmp_path)
    assert "building its cold start" in capsys.readouterr().out
    check_model_dir(first)  # a complete model: config, weights, tokenizer, processor, chat template
    weights = (first / "model.safetensors").read_bytes()
    assert weights != (tiny_model_dir / "model.safetensors").read_bytes()  # fine-tuned, not the base copied
    stats = json.loads((first / "cold_start.json").read_text())
    assert stats["kept"] == 8 and stats["build_minutes"] > 0  # bench/cold_start.py reports the build's minutes
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    again = ensure_cold_start("tiny_g1", small, cache_dir=tmp_path)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert "building" not in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no leftover temporary build directories


def test_the_cold_start_cache_key_follows_the_composed_config():
    """The key hashes what the SFT composes, not the command line or configs/ as files: the same config reached another
    way keeps the cached build (so does an edited RL preset, which the SFT never composes), a changed one does not."""
    recipe = [*COLD_STARTS["tiny_g1_tetris"].overrides, "output_dir=unused"]
    key = cold_start_key(load_config(recipe), "tiny-base")
    assert cold_start_key(load_config([*recipe, "sft.warmup_steps=10"]), "tiny-base") == key  # sft.yaml's value
    assert cold_start_key(load_config([*recipe, "sft.lr=5e-4"]), "tiny-base") != key
    assert cold_start_key(load_config([*recipe, "collect.states=1000"]), "tiny-base") != key
    assert cold_start_key(load_config(recipe), "another-base") != key
