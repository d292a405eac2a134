"""Rollout actor throughput beside plain `vllm.LLM.generate` on the same prompts and sampling settings, same run.

    .venv/bin/python bench/rollout.py [--game tetris] [--states 16] [--group-size 4] [--max-new-tokens 64]
    .venv/bin/python bench/rollout.py --model qwen2_5_vl_3b_random --states 64 --group-size 8   # on a GPU

The actor (the plain class, in this process, no buffer) runs whole rounds: prepare states and prompts, one generate
call, decode, score every response on its own clone, build the trajectory groups. Interleaved with its rounds, the
same engine runs plain `LLM.generate` on the very states of that round (a second pool with the actor's seed replays
them) with the actor's own SamplingParams. Figures:

- actor_tokens_per_s: response tokens / whole-round wall time (median round);
- vllm_tokens_per_s: response tokens / plain generate time (median round);
- ratio: the median of the rounds' actor/plain ratios (target >= 0.9 on CPU with the tiny model);
- outside_generation_share: share of the actor's round time not spent in generate (median round).

Every run starts with the engine's prefix, encoder and image caches emptied, and the first round is a warm-up.
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
import time  # noqa: E402

import numpy as np  # noqa: E402

from actors.config import RolloutConfig  # noqa: E402
from actors.models import MODEL_NAMES, resolve_model  # noqa: E402
from actors.prompts import chat_prompt, engine_input  # noqa: E402
from actors.rollout_actor import RolloutActor, RoundStats  # noqa: E402
from envs import GAMES, GamePool, GameSpec, PoolConfig  # noqa: E402


def forget(actor: RolloutActor) -> None:
    """Empties the engine's prefix, encoder and image-processor caches, so that each run starts equally cold.

    Without this the second run on a round's states would find their prompts and images already processed.
    """
    actor.engine.reset_caches()
    actor.engine.llm.reset_mm_cache()


def actor_round(actor: RolloutActor) -> RoundStats:
    forget(actor)
    return actor.run_round().stats


def plain_generate(actor: RolloutActor, inputs: list[dict], params) -> tuple[int, float]:
    """Plain `LLM.generate` on the actor's engine: (response tokens, seconds)."""
    forget(actor)
    begin = time.perf_counter()
    outputs = actor.engine.llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - begin
    return sum(len(c.token_ids) for o in outputs for c in o.outputs), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=MODEL_NAMES)
    parser.add_argument("--model-path", default=None, help="local directory of the model")
    parser.add_argument("--game", default="tetris", choices=list(GAMES))
    parser.add_argument("--states", type=int, default=16, help="states per round")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=12, help="measured rounds (after one warm-up round)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    args = parser.parse_args()

    source = resolve_model(args.model, args.model_path)
    config = RolloutConfig(
        group_size=args.group_size,
        states_per_round=args.states,
        max_new_tokens=args.max_new_tokens,
        tp=args.tp,
        max_model_len=4096,
    )
    pool = PoolConfig(games=(GameSpec(args.game),), num_games=args.states, seed=0)
    start = time.perf_counter()
    actor = RolloutActor(config, pool, source)
    print(f"model {source.name} ({source.path}); engine built in {time.perf_counter() - start:.1f} s")
    print(f"game {args.game}: {args.states} states x G={args.group_size}, {args.max_new_tokens} new tokens max")

    # The actor's pool is seeded with pool.seed + actor_id (0): this twin hands out the same states in the same order.
    twin = GamePool.from_config(pool)
    params = actor.engine.sampling_params(args.group_size, config.temperature, config.top_p, args.max_new_tokens)
    actor_rates, plain_rates, outside = [], [], []
    for round_index in range(args.rounds + 1):
        states = twin.sample(args.states)
        inputs = [engine_input(chat_prompt(actor.engine.tokenizer, s.prompt), s.image) for s in states]
        # Alternate who goes first, so that drift in the machine's load favours neither.
        if round_index % 2:
            plain_tokens, plain_s = plain_generate(actor, inputs, params)
            stats = actor_round(actor)
        else:
            stats = actor_round(actor)
            plain_tokens, plain_s = plain_generate(actor, inputs, params)
        print(
            f"round {round_index}{' (warm-up)' if round_index == 0 else ''}: "
            f"actor {stats.tokens_generated} tok in {stats.round_s:.3f} s "
            f"(generate {stats.generation_s:.3f} s, env {stats.env_s:.3f} s) = "
            f"{stats.tokens_generated / stats.round_s:.0f} tok/s; "
            f"plain vLLM {plain_tokens} tok in {plain_s:.3f} s = {plain_tokens / plain_s:.0f} tok/s"
        )
        if round_index > 0:
            actor_rates.append(stats.tokens_generated / stats.round_s)
            plain_rates.append(plain_tokens / plain_s)
            outside.append(stats.outside_generation_share)

    # Medians: a busy neighbour on a shared machine stalls single runs; the median is the typical one. The ratio is
    # the median of each round's paired ratio (actor and plain ran back to back on the same states).
    actor_rate, plain_rate = float(np.median(actor_rates)), float(np.median(plain_rates))
    ratio = float(np.median(np.array(actor_rates) / np.array(plain_rates)))
    print(
        f"rollout: actor_tokens_per_s={actor_rate:.0f} vllm_tokens_per_s={plain_rate:.0f} "
        f"ratio={ratio:.3f} outside_generation_share={float(np.median(outside)):.3f}"
    )


if __name__ == "__main__":
    main()
