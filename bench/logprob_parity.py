"""Learner log-probs against the vLLM sampler's, on the same responses: the importance weights start at 1 only if so.

    .venv/bin/python -P bench/logprob_parity.py [--states 2] [--group-size 2] [--max-new-tokens 32]
    .venv/bin/python -P bench/logprob_parity.py --model-path runs/x/checkpoints/step-00000474/hf --game 2048 \
        --difficulty layout=cells image_size=112,112

A rollout actor (the real one: game pool, prompts, vLLM engine with processed log-probs) samples responses to
full-size boards; a 1-rank DeepSpeed learner on the same weights scores them with its own log-prob function
(`Learner.response_logprobs`, the loss's `_logprobs`), fp32 on CPU. Two models:

- `tiny`: the tiny Qwen2.5-VL (actors/tiny_model.py), whose processor caps a board at 48 image tokens;
- `vision3b`: random real weights (saved safetensors, seed 0) with Qwen2.5-VL-3B's vision tower layout: patch 14,
  spatial merge 2, window attention (112 px windows) with full-attention blocks (depth 4, blocks 1 and 3 full,
  head dim 80 as in the 3B), 3B-sized RoPE head dim (128, M-RoPE sections 16/24/24), 4 text layers, and the
  processor's pixel cap raised to Qwen's own, so a 644 x 840 board is 690 image tokens.

`--model-path` scores one model directory instead (a checkpoint's `hf/`), and `--game` / `--difficulty` pick the
boards (e.g. the cells layout at 112 x 112, 16 image tokens), as a run's `game.<g>.difficulty.*` would.

Each at temperature 1.0 and 0.7; per token |learner - vLLM| (mean, max) for the learner as it is, and for two
ablations that show what each part of the parity is worth: without the multimodal positions (`mm_token_type_ids`
zeroed: every RoPE axis counts 0, 1, 2, ...) and without the temperature (raw softmax). Target: mean <= 1e-4 and
max <= 1e-3. The summary line is the vision3b model's (or the given model's) worst temperature.
"""

from __future__ import annotations

import os
import sys

# Before torch/vLLM load (see tests/conftest.py): in-process engine, one OpenMP thread, no hub.
for _key, _value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)
# Run as a script, this folder comes first on sys.path and bench/envs.py would shadow the `envs` package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from actors.config import RolloutConfig  # noqa: E402
from actors.models import QWEN2_5_VL_3B_VISION  # noqa: E402
from actors.rollout_actor import RolloutActor  # noqa: E402
from actors.tiny_model import QWEN_MAX_PIXELS, TEXT_CONFIG, build_tiny_model, set_pixel_cap  # noqa: E402
from envs import GameSpec, PoolConfig  # noqa: E402
from learner import GRPOConfig, LearnerConfig  # noqa: E402
from learner.grpo_learner import Learner  # noqa: E402

# Qwen2.5-VL-3B's vision tower, shallower and narrower: window attention and full-attention blocks both present.
VISION3B = dict(QWEN2_5_VL_3B_VISION, depth=4, fullatt_block_indexes=[1, 3], hidden_size=320, num_heads=4)
VISION3B.update(intermediate_size=856, out_hidden_size=512)
TEXT3B = dict(TEXT_CONFIG, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
TEXT3B.update(num_key_value_heads=2, rope_parameters={**TEXT_CONFIG["rope_parameters"], "mrope_section": [16, 24, 24]})
ABLATIONS = (None, "positions", "temperature")
GAMES = ("tetris", "2048", "shisen_sho", "swap")


class AblatedLearner(Learner):
    """The learner with one part of its parity switched off, to measure what that part is worth."""

    ablation: str | None = None

    def configure(self, temperature: float, ablation: str | None) -> None:
        """Sets `learner.temperature` (the trainer copies actors.temperature into it) and the ablation."""
        self.config = dataclasses.replace(self.config, temperature=temperature)
        self.ablation = ablation

    def _logprobs(self, engine, mb, temperature: float, with_entropy: bool = False):
        if self.ablation == "positions":  # all text: Qwen2.5-VL then counts 0, 1, 2, ... on every RoPE axis
            mb = dataclasses.replace(mb, mm_token_type_ids=torch.zeros_like(mb.mm_token_type_ids))
        elif self.ablation == "temperature":
            temperature = 1.0
        return super()._logprobs(engine, mb, temperature, with_entropy)


def build_vision3b(out_dir: Path) -> Path:
    """The vision3b model directory: real random weights (seed 0), the tiny tokenizer, Qwen's pixel cap."""
    build_tiny_model(out_dir, seed=0, text_config=TEXT3B, vision_config=VISION3B)
    set_pixel_cap(out_dir, QWEN_MAX_PIXELS)
    return out_dir


def sample(model_dir: Path, temperature: float, args: argparse.Namespace) -> list:
    """Groups sampled by a real rollout actor (its own Ray process) on boards of every game asked for."""
    config = RolloutConfig(
        group_size=args.group_size,
        states_per_round=args.states,
        temperature=temperature,
        max_new_tokens=args.max_new_tokens,
        max_model_len=4096,
        seed=args.seed,
        dtype="float32",  # vLLM-CPU's "auto" downcasts fp32 weights to bf16 (as configs/model/tiny.yaml notes)
    )
    games = tuple(GameSpec(g, difficulty=dict(args.difficulty)) for g in args.game)
    pool = PoolConfig(games=games, num_games=len(games), seed=args.seed)
    actor = ray.remote(num_cpus=1)(RolloutActor).remote(config, pool, str(model_dir))
    try:
        return ray.get(actor.run_round.remote()).groups
    finally:
        ray.kill(actor)


def gaps(learner, groups: list, temperature: float, ablation: str | None) -> tuple[float, float, int]:
    """Mean and max per-token |learner - vLLM| log-prob over the groups' responses, and the token count."""
    ray.get(learner.configure.remote(temperature, ablation))
    scored = ray.get(learner.response_logprobs.remote(groups))
    diffs = np.concatenate(
        [
            np.abs(np.asarray(mine) - np.asarray(theirs))
            for group, rows in zip(groups, scored, strict=True)
            for mine, theirs in zip(rows, group.response_logprobs, strict=True)
        ]
    )
    return float(diffs.mean()), float(diffs.max()), int(diffs.size)


def bench_model(name: str, model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Prints every temperature x ablation row of one model; returns the worst figures of the learner as it is."""
    config = LearnerConfig(model_dir=str(model_dir), micro_batch_size=args.group_size)
    learner = ray.remote(num_cpus=1)(AblatedLearner).remote(config, GRPOConfig(), 0, 1)
    ray.get(learner.setup.remote(*ray.get(learner.node_address.remote())))
    image_token = json.loads((model_dir / "config.json").read_text())["image_token_id"]
    worst = {"mean_abs": 0.0, "max_abs": 0.0, "image_tokens": 0}
    for temperature in args.temperatures:
        begin = time.perf_counter()
        groups = sample(model_dir, temperature, args)
        sampled = time.perf_counter() - begin
        image_tokens = max(sum(1 for t in g.prompt_ids if t == image_token) for g in groups)
        for ablation in ABLATIONS:
            if ablation == "temperature" and temperature == 1.0:
                continue
            mean_abs, max_abs, tokens = gaps(learner, groups, temperature, ablation)
            label = "learner" if ablation is None else f"without {ablation}"
            print(
                f"{name:>8}  T={temperature:<4} {label:<20} mean_abs={mean_abs:.2e} max_abs={max_abs:.2e}  "
                f"({tokens} tokens, {len(groups)} boards, {image_tokens} image tokens, sampled in {sampled:.0f} s)"
            )
            if ablation is None:
                worst["mean_abs"], worst["max_abs"] = max(worst["mean_abs"], mean_abs), max(worst["max_abs"], max_abs)
                worst["image_tokens"] = max(worst["image_tokens"], image_tokens)
    ray.kill(learner)
    return worst


def difficulty_item(text: str) -> tuple[str, object]:
    """`key=value` of `--difficulty`: integers, floats, comma-separated integer pairs (image_size) or strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--difficulty takes key=value items; got {text!r}")
    for parse in (int, float, lambda v: tuple(int(x) for x in v.split(","))):
        try:
            return key, parse(value)
        except ValueError:
            pass
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--states", type=int, default=4, help="boards per temperature (games in turn)")
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-path", type=Path, help="one model directory to score instead of tiny and vision3b")
    parser.add_argument("--game", nargs="+", choices=GAMES, default=list(GAMES), help="games whose boards are used")
    parser.add_argument(
        "--difficulty", nargs="+", type=difficulty_item, default=[], help="key=value knobs of every game's boards"
    )
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_path:
            models = {"given": args.model_path}
        else:
            models = {"tiny": build_tiny_model(Path(tmp) / "tiny"), "vision3b": build_vision3b(Path(tmp) / "vision3b")}
        results = {name: bench_model(name, path, args) for name, path in models.items()}
    ray.shutdown()
    name = "given" if args.model_path else "vision3b"
    big = results[name]
    target = big["mean_abs"] <= 1e-4 and big["max_abs"] <= 1e-3
    print(f"target mean <= 1e-4, max <= 1e-3: {'met' if target else 'NOT met'}")
    print(
        f"logprob_parity: model={name} image_tokens={big['image_tokens']} mean_abs={big['mean_abs']:.2e} "
        f"max_abs={big['max_abs']:.2e}"
    )


if __name__ == "__main__":
    main()
