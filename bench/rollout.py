"""Streaming rollout actor throughput beside plain vLLM `AsyncLLM` fed the same prompts, same engine, same run.

    .venv/bin/python -P bench/rollout.py [--game tetris] [--states 48] [--in-flight 16] [--group-size 4]
    .venv/bin/python -P bench/rollout.py --model qwen2_5_vl_3b_random --states 256 --in-flight 64   # on a GPU

The actor (the plain class, in this process, pushing into a real buffer actor) streams (`RolloutActor.stream`): a
thread prepares states (game, render, chat prompt), up to `--in-flight` states are in the engine at once, finished
requests are scored on clones, built into trajectory groups and pushed with one `put_many` per batch. It is stopped
once `--states` groups reached the buffer (its requests in flight then finish). The plain run then feeds the very
prompts of those groups (their templated text and board image) to the same `AsyncLLM` with the same SamplingParams
and the same number of requests in flight, refilled as they finish, and nothing else. Figures, per repetition:

- actor_tokens_per_s: response tokens / wall time from the stream's start to its end;
- vllm_tokens_per_s: response tokens / wall time of the plain run;
- ratio: the median of the repetitions' actor/plain ratios (the issue's target: >= 0.97 for every game);
- busy_ratio: the same with the actor's tokens over the time its engine had requests (`RoundStats.generation_s`):
  without the stream's start (the first states are prepared before anything can be submitted) and its end (the
  last groups scored and pushed), which a long stream pays once;
- engine_idle_share: share of the stream's wall time the engine had no request (median).

Every run starts with the engine's prefix, encoder and image caches emptied, and the first repetition is a warm-up.
"""

from __future__ import annotations

import os
import sys

# Before torch/vLLM load (see tests/conftest.py): one OpenMP thread, no hub.
for _key, _value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}.items():
    os.environ.setdefault(_key, _value)
# Run as a script, this folder comes first on sys.path and bench/envs.py would shadow the `envs` package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import ray  # noqa: E402

from actors.config import RolloutConfig  # noqa: E402
from actors.models import MODEL_NAMES, resolve_model  # noqa: E402
from actors.prompts import engine_input  # noqa: E402
from actors.rollout_actor import RolloutActor  # noqa: E402
from envs import GAMES, GameSpec, PoolConfig  # noqa: E402
from replay import BufferConfig, ReplayBuffer, TrajectoryGroup  # noqa: E402


def forget(actor: RolloutActor) -> None:
    """Empties the engine's prefix, encoder and image-processor caches, so that each run starts equally cold.

    Without this the plain run would find the actor's prompts and images already processed.
    """
    engine = actor.engine
    engine.reset_caches()
    engine._run(engine.llm.reset_mm_cache())


def stream_run(actor: RolloutActor, buffer, states: int, in_flight: int) -> tuple[list[TrajectoryGroup], float, float]:
    """Streams until `states` groups reached the buffer: (the groups, wall seconds, engine busy seconds)."""
    forget(actor)
    actor.drain_stats()
    result = {}
    thread = threading.Thread(target=lambda: result.update(summary=actor.stream(in_flight)))
    begin = time.perf_counter()
    thread.start()
    while ray.get(buffer.stats.remote()).size < states:
        time.sleep(0.01)
    actor.stop_stream()
    thread.join()
    seconds = time.perf_counter() - begin
    stats = actor.drain_stats()
    items = ray.get(buffer.get.remote(result["summary"].num_accepted, timeout_s=10.0))
    return ray.get([item.ref for item in items]), seconds, stats.generation_s


def plain_run(actor: RolloutActor, groups: list[TrajectoryGroup], in_flight: int) -> tuple[int, float]:
    """The groups' prompts through the same engine, `in_flight` requests at a time: (response tokens, seconds)."""
    forget(actor)
    prompts = [engine_input(group.prompt_text, group.image) for group in groups]
    pending, tokens, done = list(reversed(prompts)), 0, threading.Semaphore(0)
    outputs = []
    begin = time.perf_counter()

    def submit() -> None:
        future = actor.engine.submit(pending.pop(), actor._params)
        future.add_done_callback(lambda f: (outputs.append(f.result()), done.release()))

    for _ in range(min(in_flight, len(pending))):
        submit()
    for _ in range(len(prompts)):
        done.acquire()
        if pending:
            submit()
    seconds = time.perf_counter() - begin
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=MODEL_NAMES)
    parser.add_argument("--model-path", default=None, help="local directory of the model")
    parser.add_argument("--game", default="tetris", choices=list(GAMES))
    parser.add_argument("--states", type=int, default=48, help="groups per repetition")
    parser.add_argument("--in-flight", type=int, default=16, help="states in the engine at once")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5, help="measured repetitions (after one warm-up)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    source = resolve_model(args.model, args.model_path)
    config = RolloutConfig(
        group_size=args.group_size,
        states_per_round=args.in_flight,
        max_new_tokens=args.max_new_tokens,
        tp=args.tp,
        max_model_len=4096,
    )
    buffer = ray.remote(ReplayBuffer).remote(BufferConfig(capacity=4 * args.states + args.in_flight))
    pool = PoolConfig(games=(GameSpec(args.game),), num_games=max(args.in_flight, 16), seed=0)
    start = time.perf_counter()
    actor = RolloutActor(config, pool, source, buffer=buffer)
    print(f"model {source.name} ({source.path}); engine built in {time.perf_counter() - start:.1f} s")
    print(f"game {args.game}: {args.states} states x G={args.group_size}, {args.in_flight} in flight, "
          f"{args.max_new_tokens} new tokens max")  # fmt: skip

    ratios, busy_ratios, actor_rates, plain_rates, idle = [], [], [], [], []
    for rep in range(args.reps + 1):
        groups, actor_s, busy_s = stream_run(actor, buffer, args.states, args.in_flight)
        idle_share = 1.0 - busy_s / actor_s
        actor_tokens = sum(len(ids) for g in groups for ids in g.response_ids)
        plain_tokens, plain_s = plain_run(actor, groups, args.in_flight)
        actor_rate, plain_rate = actor_tokens / actor_s, plain_tokens / plain_s
        print(
            f"rep {rep}{' (warm-up)' if rep == 0 else ''}: actor {len(groups)} groups, {actor_tokens} tok in "
            f"{actor_s:.3f} s = {actor_rate:.0f} tok/s (engine idle {idle_share:.3f}); "
            f"plain AsyncLLM {plain_tokens} tok in {plain_s:.3f} s = {plain_rate:.0f} tok/s; "
            f"ratio {actor_rate / plain_rate:.3f}, busy ratio {actor_tokens / busy_s / plain_rate:.3f}"
        )
        if rep > 0:
            ratios.append(actor_rate / plain_rate)
            busy_ratios.append(actor_tokens / busy_s / plain_rate)
            actor_rates.append(actor_rate)
            plain_rates.append(plain_rate)
            idle.append(idle_share)
    actor.engine.shutdown()
    ray.shutdown()

    # Medians: a busy neighbour on a shared machine stalls single runs; the median is the typical one. The ratio is
    # the median of each repetition's paired ratio (the actor and plain runs back to back on the same prompts).
    print(
        f"rollout: game={args.game} actor_tokens_per_s={np.median(actor_rates):.0f} "
        f"vllm_tokens_per_s={np.median(plain_rates):.0f} ratio={np.median(ratios):.3f} "
        f"busy_ratio={np.median(busy_ratios):.3f} "
        f"engine_idle_share={np.median(idle):.3f}"
    )


if __name__ == "__main__":
    main()
