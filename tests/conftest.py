"""Fixtures shared by every test package: the tiny model and a local Ray cluster, plus CPU defaults for vLLM.

The environment defaults are set when pytest loads this file, before any test imports torch or vLLM (and before
`ray.init`, whose workers inherit them): one in-process vLLM engine, one OpenMP thread (several times faster on a
2-core machine than letting every engine take every core), no model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CPU_TEST_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the model worker inside AsyncLLM's engine-core process (no third one)
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB, for engines built directly with vllm.LLM (VLLMEngine sizes its own)
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for key, value in CPU_TEST_ENV.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL (actors/tiny_model.py), built once per session into a temporary directory (~5 s)."""
    from actors.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def ray_local():
    """A Ray cluster private to this test session (4 logical CPUs), shut down at the end. Never `ray stop`."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
