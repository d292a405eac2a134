"""The evaluation's policies (actors/policies.py): config checks, random and expert answers, the tiny model on an
in-process vLLM engine, and an unreachable OpenAI-compatible endpoint (a real closed port). The policy against a real
vLLM OpenAI server is tested end to end in tests/launch/test_eval.py."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

import envs
from actors.policies import ExpertPolicy, PolicyConfig, RandomPolicy, make_policy


def _games() -> list[envs.Game]:
    return [envs.make(name, seed=3) for name in envs.GAMES]


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"kind": "genius"}, ["'kind'", "random, expert, vllm, openai"]),
        ({"kind": "vllm"}, ["'path'", "local model directory"]),
        ({"kind": "openai", "model": "m"}, ["'base_url'", "http"]),
        ({"kind": "openai", "base_url": "http://h/v1"}, ["'model'"]),
        ({"concurrency": 0}, ["'concurrency'", "integer >= 1"]),
        ({"retries": -1}, ["'retries'", ">= 0"]),
        ({"timeout_s": 0}, ["'timeout_s'", "> 0"]),
        ({"temperature": -0.5}, ["'temperature'", ">= 0"]),
        ({"top_p": 1.5}, ["'top_p'", "(0, 1]"]),
        ({"max_tokens": 64, "max_model_len": 64}, ["'max_model_len'", "max_tokens (64)"]),
        ({"top_k": 5}, ["unknown key 'top_k'", "allowed keys", "temperature"]),
    ],
)
def test_bad_config_names_the_key_and_the_allowed_values(values, names):
    with pytest.raises(ValueError) as error:
        PolicyConfig.from_dict(values)
    for name in names:
        assert name in str(error.value)


def test_random_policy_answers_a_legal_action_per_game_reproducibly_without_changing_the_games():
    games = _games()
    observations = [g.text_observation() for g in games]
    first = make_policy(PolicyConfig(kind="random", seed=5)).respond(games)
    assert [g.text_observation() for g in games] == observations
    assert make_policy(PolicyConfig(kind="random", seed=5)).respond(games) == first
    for game, response in zip(games, first, strict=True):
        assert game.parse_action(response) in game.legal_actions()
    sequences = {tuple(RandomPolicy(seed).respond([games[1]] * 8)) for seed in range(4)}
    assert len(sequences) > 1  # the seed matters


def test_expert_policy_gets_full_format_and_perception_credit_on_every_game():
    games = _games()
    responses = ExpertPolicy().respond(games)
    for game, response in zip(games, responses, strict=True):
        reward = envs.score(game, response)
        assert reward.format == 1.0 and reward.perception == 1.0 and reward.valid_action


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_endpoint_gives_empty_replies_counted_after_retries_with_back_off():
    config = PolicyConfig(
        kind="openai", base_url=f"http://127.0.0.1:{_closed_port()}/v1", model="m", retries=2, timeout_s=2
    )
    policy = make_policy(config)
    games = _games()
    start = time.perf_counter()
    replies = policy.respond(games)
    elapsed = time.perf_counter() - start
    assert replies == [""] * len(games) and policy.failures == len(games)
    assert 1.5 <= elapsed < 10  # back-off of 0.5 s then 1 s (in parallel for every request), no long hang
    assert all(game.parse_action(reply) is None for game, reply in zip(games, replies, strict=True))
    policy.respond(games[:1])
    assert policy.failures == len(games) + 1


def test_vllm_policy_answers_every_state_with_the_tiny_model(tiny_model_dir):
    config = PolicyConfig(kind="vllm", path=str(tiny_model_dir), max_tokens=24, max_model_len=1024)
    games = _games() * 2
    with contextlib.closing(make_policy(config)) as policy:  # its engine core ends here, not at interpreter exit
        replies = policy.respond(games)
    assert len(replies) == len(games) and all(isinstance(r, str) and r for r in replies)
    assert policy.name == f"vllm:{tiny_model_dir.name}" and policy.failures == 0
    assert len(set(replies)) > 1  # sampled per state, not one answer broadcast


def test_vllm_policy_names_a_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_policy(PolicyConfig(kind="vllm", path=str(tmp_path / "nothing")))
