"""Config checks: every bad value is rejected with the key and what is allowed."""

from __future__ import annotations

import pytest

from learner.config import CheckpointConfig, GRPOConfig, LearnerConfig, WeightSyncConfig


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (GRPOConfig(loss_agg="token-sum"), "grpo.loss_agg='token-sum' is not allowed: expected one of ('token-mean'"),
        (GRPOConfig(kl_estimator="k4"), "grpo.kl_estimator='k4' is not allowed: expected one of ('k1', 'k2', 'k3')"),
        (GRPOConfig(dual_clip=0.5), "grpo.dual_clip=0.5 is not allowed: expected None or > 1"),
        (GRPOConfig(is_cap=0.5), "grpo.is_cap=0.5 is not allowed"),
        (GRPOConfig(num_minibatches=0), "grpo.num_minibatches=0 is not allowed: expected an integer >= 1"),
        (LearnerConfig(model_dir=""), "learner.model_dir='' is not allowed"),
        (LearnerConfig(model_dir="m", deepspeed_config="zero2"), "learner.deepspeed_config='zero2' is not allowed"),
        (LearnerConfig(model_dir="m", micro_batch_size=0), "learner.micro_batch_size=0 is not allowed"),
        (LearnerConfig(model_dir="m", micro_batch_tokens=0), "learner.micro_batch_tokens=0 is not allowed"),
        (WeightSyncConfig(backend="mpi"), "weight_sync.backend='mpi' is not allowed: expected one of ('auto', 'gloo'"),
        (WeightSyncConfig(bucket_mb=0), "weight_sync.bucket_mb=0 is not allowed"),
        (CheckpointConfig(every_steps=-1), "checkpoint.every_steps=-1 is not allowed"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(config, message):
    with pytest.raises(ValueError) as err:
        config.validate()
    assert message in str(err.value)


def test_defaults_are_valid_and_presets_resolve_per_device():
    for config in (GRPOConfig(), WeightSyncConfig(), CheckpointConfig()):
        assert config.validate() is config
    learner = LearnerConfig(model_dir="m").validate()
    assert learner.deepspeed_config_path(cuda=False).name == "zero3_cpu_fp32.json"
    assert learner.deepspeed_config_path(cuda=True).name == "zero3_gpu_bf16.json"
    assert learner.deepspeed_config_path(cuda=False).exists() and learner.deepspeed_config_path(cuda=True).exists()
    assert LearnerConfig(model_dir="m", deepspeed_config="x.json").deepspeed_config_path(cuda=True).name == "x.json"


def test_checkpoint_due_every_k_steps_only_when_enabled():
    assert [s for s in range(1, 10) if CheckpointConfig(every_steps=3).due(s)] == [3, 6, 9]
    assert not any(CheckpointConfig(every_steps=0).due(s) for s in range(1, 10))
