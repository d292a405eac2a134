"""The learner's GRPO update at real-model scale: time, memory and self-consistency, no sampler in the loop.

    .venv/bin/python -P bench/learner_step.py                                  # tiny model, CPU (checks the script)
    python -P bench/learner_step.py --model qwen2_5_vl_3b_random --micro-batch-size 2    # a GPU machine

A learner group of one rank (the real one: a Ray actor, DeepSpeed ZeRO-3, bf16 on GPU and fp32 on CPU, gradient
checkpointing, the paper's KL term and so a reference model) trains on trajectory groups made from real game states:
boards rendered at full size and processed with Qwen2.5-VL's own pixel cap (a 2048 board is ~690 image tokens, not
the tiny processor's 48), prompts from the actors' chat template, and responses written by the game's expert, its
answer swapped for a random legal move in all but one response per group, each scored by `envs.score`.

No vLLM: the responses' "sampler" log-probs are the learner's own (`Learner.response_logprobs`) at the starting
weights, so the first update's `policy/logprob_diff` is the floor the learner alone sets under a real run's
learner-vs-sampler gap: its scoring pass and its training pass (micro-batches, gradient checkpointing) against each
other. Prints each update's metrics and ends with
`learner_step: model=<m> device=<d> samples=<n> tokens=<per sample> image_tokens=<k> update_s=<median>
tokens_per_s=<x> peak_memory_gib=<g> logprob_diff=<first update's>`; exits 1 when an update's gradient is not finite.
"""

from __future__ import annotations

import os
import sys

# Before torch loads (see tests/conftest.py): one OpenMP thread on CPU, no hub.
for _key, _value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)
# Run as a script, this folder comes first on sys.path and bench/envs.py would shadow the `envs` package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

import envs  # noqa: E402
from actors.models import resolve_model  # noqa: E402
from actors.prompts import chat_prompt  # noqa: E402
from actors.tiny_model import QWEN_MAX_PIXELS, set_pixel_cap  # noqa: E402
from learner import GRPOConfig, LearnerConfig, LearnerGroup, WeightSyncConfig  # noqa: E402
from replay.trajectory import TrajectoryGroup  # noqa: E402


def make_groups(processor, game_name: str, states: int, group_size: int, seed: int) -> list[TrajectoryGroup]:
    """Groups on `states` boards of one game, each a few random moves past the last (a new game when one ends)."""
    rng = np.random.default_rng(seed)
    game = envs.make(game_name, seed=seed)
    groups = []
    for index in range(states):
        for _ in range(int(rng.integers(1, 6))):
            action = game.random_legal_action(rng)
            if action is None or game.step(action).terminated:
                game.reset()
        image = game.render_array()
        prompt_text = chat_prompt(processor.tokenizer, game.prompt)
        prompt_ids = processor(text=[prompt_text], images=[Image.fromarray(image)])["input_ids"][0]
        expert = envs.expert_response(game)
        head, _, _ = expert.rpartition("<answer>")
        texts = [expert] + [
            f"{head}<answer>{game.format_action(game.random_legal_action(rng))}</answer>" for _ in range(group_size - 1)
        ]
        responses = [processor.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        groups.append(
            TrajectoryGroup(
                game=game_name,
                state_id=f"bench-{index}",
                image=image,
                prompt_text=prompt_text,
                prompt_ids=list(prompt_ids),
                response_ids=responses,
                response_logprobs=[[0.0] * len(r) for r in responses],  # replaced by the learner's own below
                response_texts=texts,
                rewards=[envs.score(game, text) for text in texts],
                policy_version=0,
                text_observation=game.text_observation(),
            )
        )
    return groups


def gib(value: float | None) -> str:
    """A memory figure, or n/a where there is none (the learner reports its peak allocation on GPU only)."""
    return "n/a" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=("tiny", "qwen2_5_vl_3b_random"))
    parser.add_argument("--game", default="2048", choices=tuple(envs.GAMES))
    parser.add_argument("--states", type=int, default=4, help="trajectory groups per update")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=1, help="learner.micro_batch_size (train.yaml: 1)")
    parser.add_argument("--micro-batch-tokens", type=int, help="learner.micro_batch_tokens (packs by size instead)")
    parser.add_argument("--minibatches", type=int, default=2, help="grpo.num_minibatches: optimizer steps per update")
    parser.add_argument(
        "--persistence-threshold", type=int, help="learner.param_persistence_threshold (default: the DeepSpeed file's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    ray.init(num_cpus=2, num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"  # the resolved model, its processor's pixel cap raised to Qwen's own
        shutil.copytree(resolve_model(args.model).path, model_dir)
        set_pixel_cap(model_dir, QWEN_MAX_PIXELS)
        processor = AutoProcessor.from_pretrained(model_dir)
        groups = make_groups(processor, args.game, args.states, args.group_size, args.seed)
        config = LearnerConfig(
            model_dir=str(model_dir),
            micro_batch_size=args.micro_batch_size,
            micro_batch_tokens=args.micro_batch_tokens,
            gradient_checkpointing=True,
            lr=1e-6,
            param_persistence_threshold=args.persistence_threshold,
        )
        grpo = GRPOConfig(kl_coef=1e-2, num_minibatches=args.minibatches)  # train.yaml's KL: a reference model too
        group = LearnerGroup(config, grpo, WeightSyncConfig(), num_cpus=1, use_gpu=cuda)
        own = ray.get(group.learners[0].response_logprobs.remote(groups))
        for trajectory, logprobs in zip(groups, own, strict=True):
            trajectory.response_logprobs = logprobs
        metrics = [group.update(groups) for _ in range(args.updates)]
        group.shutdown()
    ray.shutdown()

    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    samples = sum(g.group_size for g in groups)
    tokens = sum((len(g.prompt_ids) + len(r)) for g in groups for r in g.response_ids)
    image_tokens = max(g.prompt_ids.count(image_token) for g in groups)
    for step, m in enumerate(metrics):
        print(
            f"update {step}: update_s={m['perf/update_s']:.2f} loss={m['loss/total']:.4f} "
            f"grad_norm={m['optim/grad_norm']:.3f} logprob_diff={m['policy/logprob_diff']:.2e} "
            f"is_max={m['policy/is_max']:.3f} skipped_steps={m['optim/skipped_steps']:.0f} "
            f"peak_memory_gib={gib(m.get('perf/peak_memory_gib'))}"
        )
    update_s = statistics.median(m["perf/update_s"] for m in metrics)
    peak_gib = max(m.get("perf/peak_memory_gib", 0.0) for m in metrics) if cuda else None
    print(
        f"learner_step: model={args.model} device={device.replace(' ', '_')} samples={samples} "
        f"tokens={tokens / samples:.0f} image_tokens={image_tokens} update_s={update_s:.2f} "
        f"tokens_per_s={tokens / update_s:.0f} peak_memory_gib={gib(peak_gib)} "
        f"logprob_diff={metrics[0]['policy/logprob_diff']:.2e}"
    )
    if not all(math.isfinite(m["optim/grad_norm"]) and m["optim/skipped_steps"] == 0 for m in metrics):
        sys.exit(1)


if __name__ == "__main__":
    main()
