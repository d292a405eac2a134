"""Weight-sync benchmark: ZeRO-3 gather + bucketed broadcast from the learner group into vLLM engines.

For the tiny model and a ~106 M-parameter model of the same architecture (random weights, float32), it times syncs
from a 2-rank ZeRO-3 learner group (every tensor sharded) to vLLM engines in Ray actors, through vLLM's
weight-transfer lifecycle (the CPU engine of actors/weight_transfer.py), and prints per sync where the time goes: on
learner rank 0 the ZeRO-3 gathers, the packing and the sending (which waits for the engines); in the slowest engine
the waits for buckets (transfer), vLLM's layer-wise loading and its finalize; the wall time the driver sees and the
achieved GB/s. With shared memory (engines on the learner's node) there is no gather: every learner rank writes its
own partitions into the segment the engines read, and that write is the "pack". Then, on the same weights, vLLM's
own in-place reload alone (`reload_weights` from tensors already in the engine's process, the floor of any loading
path), and this machine's memcpy GB/s, measured just before and just after each model's syncs (the mean: the machine
may be shared).
The last line is the summary for the larger model:

    weight_sync: params=... sync_s=... gbps=... memcpy_gbps=... memcpy_share=... reload_s=... vs_reload=...

(`vs_reload`: sync time / reload time; `reload_all_s` and `vs_reload_all`: the same with vLLM's reload run in every
engine at once, as a sync loads them, the floor of a sync into that many engines on this machine's cores; `load1`: the
load average at the end.) Run: `.venv/bin/python -P
bench/weight_sync.py [--engines 2] [--syncs 3] [--bucket-mb 512] [--transport auto|shm|gloo]`. With `auto` (engines on
the learner's node) the buckets go through /dev/shm; `gloo` broadcasts them over loopback TCP, as to another node.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import statistics
import time
from collections.abc import Callable
from typing import Any

# One thread per process and vLLM's engine core in-process, before torch or vLLM are imported (docs cpu-stack.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray
import torch

from actors.config import RolloutConfig
from actors.tiny_model import TEXT_CONFIG, VISION_CONFIG, ensure_model_dir, ensure_tiny_model
from actors.vllm_engine import VLLMEngine
from learner import GRPOConfig, LearnerConfig, LearnerGroup, WeightSyncConfig

# ~106 M parameters: a 12-layer 768-wide language model and a 12-block 384-wide vision tower (head_dim 64 in both).
MEDIUM_TEXT = dict(TEXT_CONFIG, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12)
MEDIUM_VISION = dict(
    VISION_CONFIG,
    depth=12,
    hidden_size=384,
    intermediate_size=1536,
    num_heads=6,
    out_hidden_size=768,
    fullatt_block_indexes=[3, 7, 11],
)


def memcpy_gbps(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Best of `repeats` copies of an `nbytes` buffer in this process, in GB/s (bytes copied per second)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def call_worker(engine: ray.actor.ActorHandle, fn: Callable, *args: Any) -> ray.ObjectRef:
    """`fn(worker, *args)` in every vLLM worker of an engine actor (in its engine-core process), through AsyncLLM's
    own `collective_rpc`, which takes a function (`VLLMEngine.collective_rpc` takes method names); a reference to the
    workers' results."""
    return engine.__ray_call__.remote(lambda e: e._run(e.llm.collective_rpc(fn, args=args)))


def in_worker(engine: ray.actor.ActorHandle, fn: Callable, *args: Any) -> Any:
    """`fn(worker, *args)`'s result in the first vLLM worker of an engine actor (`call_worker`, waited for)."""
    return ray.get(call_worker(engine, fn, *args))[0]


def engine_timings(worker: Any) -> dict[str, float]:
    """The gloo engine's phase times of the last update."""
    return worker.weight_transfer_engine.timings


def hold_weights(worker: Any, payload: bytes) -> None:
    """Unpickles (name, tensor) pairs into the worker's memory, as a received bucket is, for `timed_reload`."""
    worker.bench_weights = pickle.loads(payload)


def timed_reload(worker: Any) -> float:
    """Seconds of vLLM's own in-place reload (`Worker.reload_weights`) of the pairs `hold_weights` left there."""
    start = time.perf_counter()
    worker.reload_weights(weights_iterator=iter(worker.bench_weights), is_checkpoint_format=True)
    return time.perf_counter() - start


def reload_seconds(engines: list[ray.actor.ActorHandle]) -> float:
    """vLLM's reload alone in every engine of `engines` at once (started together): the slowest engine's seconds."""
    return max(times[0] for times in ray.get([call_worker(engine, timed_reload) for engine in engines]))


def bench_model(name: str, model_dir: str, args: argparse.Namespace) -> dict[str, float]:
    """Times `args.syncs` syncs (after a first, full one that also warms up) of `model_dir`, then vLLM's reload alone
    of the same weights; returns the medians."""
    config = LearnerConfig(model_dir=model_dir, num=2, param_persistence_threshold=0)
    sync = WeightSyncConfig(bucket_mb=args.bucket_mb, transport=args.transport)
    group = LearnerGroup(config, GRPOConfig(), sync, num_cpus=0.5)
    params = sum(t.numel() for t in group.consolidated_state_dict().values())
    rollout = RolloutConfig(max_model_len=1024, cpu_kv_cache_gib=1)
    engines = [ray.remote(num_cpus=0.5)(VLLMEngine).remote(model_dir, rollout) for _ in range(args.engines)]
    group.init_weight_sync(engines)
    first = group.sync_weights(version=1)
    memcpy_before = memcpy_gbps()
    print(f"{name}: {params / 1e6:.1f} M params, first (full) sync {first.total_s:.3f} s, {first.nbytes / 1e6:.0f} MB")
    runs, phases = [], []
    for version in range(2, 2 + args.syncs):
        stats = group.sync_weights(version)
        engine_phases = [in_worker(e, engine_timings) for e in engines]
        runs.append(stats)
        phases.append({k: max(p[k] for p in engine_phases) for k in engine_phases[0]})
        print(
            f"{name}: sync v{version}: learner gather {stats.gather_s:.3f} s, pack {stats.pack_s:.3f} s, "
            f"send {stats.broadcast_s - stats.pack_s:.3f} s; "
            f"engine receive {phases[-1]['receive_s']:.3f} s, load {phases[-1]['load_s']:.3f} s, "
            f"finalize {phases[-1]['finish_s']:.3f} s, all {stats.load_s:.3f} s; "
            f"total {stats.total_s:.3f} s  {stats.gbps:.2f} GB/s"
        )
    memcpy = (memcpy_before + memcpy_gbps()) / 2
    payload = pickle.dumps(list(group.consolidated_state_dict().items()), protocol=pickle.HIGHEST_PROTOCOL)
    for engine in engines:
        in_worker(engine, hold_weights, payload)
    reloads = [reload_seconds(engines[:1]) for _ in range(args.syncs)]
    print(f"{name}: vLLM's reload alone (in the engine's process): " + ", ".join(f"{t:.3f} s" for t in reloads))
    reloads_all = reloads if len(engines) == 1 else [reload_seconds(engines) for _ in range(args.syncs)]
    print(
        f"{name}: vLLM's reload alone in the {len(engines)} engines at once: "
        + ", ".join(f"{t:.3f} s" for t in reloads_all)
    )
    for engine in engines:
        ray.kill(engine)
    group.shutdown()
    gc.collect()
    return {
        "params": params,
        "nbytes": runs[0].nbytes,
        **{k: statistics.median(getattr(r, k) for r in runs) for k in ("gather_s", "pack_s", "load_s", "total_s")},
        "send_s": statistics.median(r.broadcast_s - r.pack_s for r in runs),
        **{k: statistics.median(p[k] for p in phases) for k in phases[0]},
        "gbps": statistics.median(r.gbps for r in runs),
        "reload_s": statistics.median(reloads),
        "reload_all_s": statistics.median(reloads_all),
        "memcpy_gbps": memcpy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=2, help="vLLM engines receiving each sync")
    parser.add_argument("--syncs", type=int, default=3, help="timed syncs per model (after a first, full one)")
    parser.add_argument("--bucket-mb", type=int, default=512, help="broadcast bucket size in MiB")
    parser.add_argument("--transport", default="auto", help="weight_sync.transport: auto, shm or gloo")
    args = parser.parse_args()

    ray.init(num_cpus=1 + args.engines, include_dashboard=False, log_to_driver=False)
    models = {
        "tiny": str(ensure_tiny_model()),
        "medium": str(ensure_model_dir("bench-medium", text_config=MEDIUM_TEXT, vision_config=MEDIUM_VISION)),
    }
    results = {name: bench_model(name, path, args) for name, path in models.items()}
    for name, r in results.items():
        print(
            f"{name}: {r['params'] / 1e6:.1f} M params, {r['nbytes'] / 1e6:.0f} MB per sync, median of {args.syncs}: "
            f"learner gather {r['gather_s']:.3f} s, pack {r['pack_s']:.3f} s, send {r['send_s']:.3f} s; engine "
            f"receive {r['receive_s']:.3f} s, load {r['load_s']:.3f} s, finalize {r['finish_s']:.3f} s; total "
            f"{r['total_s']:.3f} s = {r['gbps']:.2f} GB/s ({r['gbps'] / r['memcpy_gbps']:.1%} of memcpy at "
            f"{r['memcpy_gbps']:.2f} GB/s, 512 MiB float32 copy, best of 5); vLLM's reload alone {r['reload_s']:.3f} s "
            f"({r['total_s'] / r['reload_s']:.2f}x of it), in all {args.engines} engines at once "
            f"{r['reload_all_s']:.3f} s ({r['total_s'] / r['reload_all_s']:.2f}x)"
        )
    medium = results["medium"]
    memcpy = medium["memcpy_gbps"]
    print(
        f"weight_sync: params={medium['params']} sync_s={medium['total_s']:.3f} gbps={medium['gbps']:.3f} "
        f"memcpy_gbps={memcpy:.2f} memcpy_share={medium['gbps'] / memcpy:.3f} reload_s={medium['reload_s']:.3f} "
        f"vs_reload={medium['total_s'] / medium['reload_s']:.2f} reload_all_s={medium['reload_all_s']:.3f} "
        f"vs_reload_all={medium['total_s'] / medium['reload_all_s']:.2f} gather_s={medium['gather_s']:.3f} "
        f"pack_s={medium['pack_s']:.3f} send_s={medium['send_s']:.3f} engine_load_s={medium['load_s']:.3f} "
        f"finalize_s={medium['finish_s']:.3f} engines={args.engines} bucket_mb={args.bucket_mb} "
        f"transport={args.transport} load1={os.getloadavg()[0]:.1f}"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
