"""The real vLLM CPU engine on the tiny model, driven through a plain (in-process) RolloutActor: one engine per module.

Covers what the learner relies on: G samples per prompt with one log-prob per token, log-probs equal to the masked
softmax the learner computes, weight loads that really change the policy (and restore it), and the actor's skipping
of a game that raises.
"""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

import envs
from actors.config import RolloutConfig
from actors.models import ModelSource, check_model_dir
from actors.prompts import chat_prompt, engine_input
from actors.rollout_actor import RolloutActor
from actors.tiny_model import build_tiny_model
from actors.vllm_engine import VLLMEngine
from envs import GameSpec, PoolConfig

G = 3
CONFIG = RolloutConfig(group_size=G, states_per_round=4, max_new_tokens=24, max_model_len=2048)


@pytest.fixture(scope="module")
def actor(tiny_model_dir):
    pool = PoolConfig(games=(GameSpec("2048"), GameSpec("tetris")), num_games=4, seed=3)
    actor = RolloutActor(CONFIG, pool, tiny_model_dir)
    yield actor
    actor.engine.shutdown()  # its engine-core process, before the modules that follow build theirs


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


def prompts_of(engine, seeds=range(3)):
    games = [envs.make("2048", seed=s) for s in seeds]
    return [engine_input(chat_prompt(engine.tokenizer, g.prompt), g.render_array()) for g in games]


def greedy(engine, prompts) -> list[list[int]]:
    outputs = engine.generate(prompts, engine.sampling_params(n=1, temperature=0.0, top_p=1.0, max_tokens=12))
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_g_samples_per_prompt_with_a_logprob_per_token(actor):
    engine = actor.engine
    outputs = engine.generate(prompts_of(engine), engine.sampling_params(G, temperature=1.0, top_p=1.0, max_tokens=24))
    allowed = set(engine.allowed_token_ids)
    assert len(outputs) == 3
    for output in outputs:
        assert len(output.outputs) == G
        for completion in output.outputs:
            ids, logprobs = list(completion.token_ids), list(completion.logprobs.logprobs)
            assert 1 <= len(ids) == len(logprobs) <= 24
            assert set(ids) <= allowed  # never a vision/special token or a padding id
            assert all(lp <= 0.0 for lp in logprobs)
        assert len({tuple(c.token_ids) for c in output.outputs}) > 1  # G distinct draws, not one repeated


def test_logprobs_are_the_masked_softmax_the_learner_computes(actor, hf_model, tiny_model_dir):
    engine = actor.engine
    game = envs.make("tetris", seed=5)
    text, image = chat_prompt(engine.tokenizer, game.prompt), game.render_array()
    params = engine.sampling_params(n=2, temperature=1.0, top_p=1.0, max_tokens=16)
    output = engine.generate([engine_input(text, image)], params)[0]
    batch = AutoProcessor.from_pretrained(tiny_model_dir)(
        text=[text], images=[Image.fromarray(image)], return_tensors="pt"
    )
    assert batch["input_ids"][0].tolist() == list(output.prompt_token_ids)  # same prompt ids, image pads expanded
    allowed = torch.zeros(hf_model.config.text_config.vocab_size, dtype=torch.bool)
    allowed[engine.allowed_token_ids] = True
    prompt_len = batch["input_ids"].shape[1]
    for completion in output.outputs:
        response = torch.tensor(completion.token_ids)  # (T,)
        ids = torch.cat([batch["input_ids"][0], response])[None]  # (1, P + T)
        with torch.no_grad():
            logits = hf_model(
                input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]
            ).logits[0, prompt_len - 1 : -1]  # (T, vocab): the logits that predicted each response token
        masked = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
        expected = masked.gather(-1, response[:, None])[:, 0]  # (T,)
        unmasked = logits.log_softmax(-1).gather(-1, response[:, None])[:, 0]
        got = torch.tensor(completion.logprobs.logprobs)
        assert torch.allclose(got, expected, atol=1e-2), (got - expected).abs().max()
        assert (got - unmasked).abs().min() > 5e-2  # the raw (unmasked) log-probs would be measurably different


def test_weight_load_changes_greedy_outputs_and_the_originals_restore_them(actor, hf_model):
    engine = actor.engine
    prompts = prompts_of(engine)
    rendered = [engine.render(p) for p in prompts]  # as the actor prepares states: before the weights change
    original = {name: tensor.clone() for name, tensor in hf_model.state_dict().items()}
    before = greedy(engine, prompts)
    assert greedy(engine, prompts) == before  # greedy decoding is deterministic: differences come from the weights
    assert greedy(engine, rendered) == before

    generator = torch.Generator().manual_seed(0)
    perturbed = {n: t + 0.2 * torch.randn(t.shape, generator=generator) for n, t in original.items()}
    assert actor.load_weights(perturbed, version=1)
    changed = greedy(engine, rendered)  # image prompts right after a load: the encoder cache was reset
    assert changed != before
    assert greedy(engine, prompts) == changed
    assert actor.load_weights(original.items(), version=2)
    assert greedy(engine, prompts) == before
    assert actor.get_policy_version() == 2


def test_a_paused_engine_holds_submitted_requests_until_resumed(actor):
    engine = actor.engine
    prompt, params = prompts_of(engine, seeds=[1])[0], engine.sampling_params(2, 1.0, 1.0, max_tokens=8)
    begin = time.perf_counter()
    engine.submit(prompt, params).result(timeout=60)
    took = time.perf_counter() - begin  # the same request, not paused
    engine.pause("keep")
    try:
        future = engine.submit(prompt, params)
        time.sleep(3 * took + 0.5)
        assert not future.done()  # queued, not scheduled, while paused
    finally:
        engine.resume()
    output = future.result(timeout=60)
    assert output.finished and len(output.outputs) == 2  # one final output with all n samples
    assert all(1 <= len(c.token_ids) == len(c.logprobs.logprobs) <= 8 for c in output.outputs)


def test_stale_weight_push_is_skipped(actor, hf_model):
    engine = actor.engine
    prompts = prompts_of(engine, seeds=[7])
    version = actor.get_policy_version()
    before = greedy(engine, prompts)
    zeros = {name: torch.zeros_like(t) for name, t in hf_model.state_dict().items()}
    assert actor.load_weights(zeros, version=version - 1) is False
    assert greedy(engine, prompts) == before and actor.get_policy_version() == version


def test_a_game_that_raises_costs_only_its_own_states(actor, caplog, monkeypatch):
    score = actor.pool.score

    def score_or_fail(state, responses):
        if state.game_name == "tetris":
            raise RuntimeError("tetris broke")
        return score(state, responses)

    monkeypatch.setattr(actor.pool, "score", score_or_fail)
    result = actor.run_round()
    stats = result.stats
    assert stats.num_skipped == 2 and stats.num_groups == 2  # the pool alternates 2048 / tetris slots
    assert {g.game for g in result.groups} == {"2048"}
    assert "tetris broke" in caplog.text
    assert stats.num_responses == 2 * G and stats.tokens_generated > 0


def test_a_stream_renders_its_states_ahead_and_a_prompt_that_fails_to_render_costs_only_its_state(
    actor, caplog, monkeypatch
):
    # What a stream's preparer thread calls (its StreamSource.prepare): the prompt leaves it processed for the engine.
    item = actor._prepare_streamed()
    assert item.engine_input["type"] == "multimodal" and len(item.engine_input["prompt_token_ids"]) > 0
    render = actor.engine.render

    def render_or_fail(prompt):
        if "tetris" in prompt["prompt"].lower():
            raise ValueError("tetris prompt rejected")
        return render(prompt)

    monkeypatch.setattr(actor.engine, "render", render_or_fail)
    items = [actor._prepare_streamed() for _ in range(4)]  # the pool alternates 2048 / tetris slots
    assert sum(item is None for item in items) == 2 and "tetris prompt rejected" in caplog.text
    assert actor.drain_stats().num_skipped == 2  # counted in the stream's stats, as a game that raised would be


def test_a_model_without_weight_files_runs_on_random_weights(tmp_path):
    # The GPU benchmark's path (model=qwen2_5_vl_3b_random): vLLM's dummy loader, here with the tiny dimensions.
    directory = build_tiny_model(tmp_path / "no_weights", write_weights=False)
    engine = VLLMEngine(ModelSource("random", str(directory), random_weights=True), CONFIG)
    try:
        outputs = engine.generate(prompts_of(engine, seeds=[0]), engine.sampling_params(2, 1.0, 1.0, max_tokens=8))
    finally:
        engine.shutdown()
    for completion in outputs[0].outputs:
        logprobs = list(completion.logprobs.logprobs)
        assert 1 <= len(completion.token_ids) == len(logprobs) <= 8 and all(-1e4 < lp <= 0 for lp in logprobs)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):  # the same directory is no real checkpoint
        check_model_dir(directory)


def test_auto_dtype_is_the_models_own_on_cpu(actor):
    # vLLM's CPU build would pick bf16 for this fp32 model; the learner trains in fp32, so the sampler must too.
    assert CONFIG.dtype == "auto"
    assert actor.engine.llm.model_config.dtype == torch.float32
