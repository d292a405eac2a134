"""A tiny Qwen2.5-VL, built locally and deterministically, so everything runs with no model hub and no GPU.

The directory it writes is a complete Hugging Face model: config, random weights, a byte-level BPE tokenizer trained
on the games' own prompts, board texts and answers, Qwen's special tokens and chat template, and the Qwen2-VL image
processor. Both transformers (`AutoProcessor`, `Qwen2_5_VLForConditionalGeneration`) and vLLM load it offline.

Two details decide whether the tiny model can learn anything (see docs cpu-stack.md):
- the six tags `<perception> </perception> <think> </think> <answer> </answer>` are *added* tokens (single ids that
  survive save/load). Qwen2's pre-tokenizer splits `<think>` into `<think` + `>`, so BPE merges alone can never make
  a tag one token, and a random policy then practically never writes a tag pair;
- the image processor keeps boards small (a few dozen image tokens) so prompts stay short on CPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from envs.rewards import TAG_PAIRS

TAGS = tuple(tag for pair in TAG_PAIRS for tag in pair)  # the answer convention's six tags, one token each
# Qwen2-VL's special tokens; their ids follow the BPE vocabulary, as in the real tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
BPE_VOCAB_SIZE = 1000  # 256 bytes + the merges the corpus supports (~680): a Tetris prompt is ~430 tokens, not ~730
VOCAB_PAD_MULTIPLE = 64  # the embedding is padded past the tokenizer's end, like Qwen's (these ids are never sampled)
SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2-VL's chat template (as published with Qwen2-VL/Qwen2.5-VL-Instruct).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Dimensions of docs cpu-stack.md: ~0.7 M parameters, fast in vLLM's CPU build on one thread.
TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,  # head_dim 64
    num_key_value_heads=1,  # grouped-query attention, as in the real 3B/7B models
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
)
VISION_CONFIG = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
    out_hidden_size=128,  # = text hidden size
)
# Boards are resized to at most 48 merged 28x28 cells (e.g. 196x224 px): 48 image tokens per prompt.
IMAGE_MIN_PIXELS = 4 * 28 * 28
IMAGE_MAX_PIXELS = 48 * 28 * 28
QWEN_MAX_PIXELS = 16384 * 28 * 28  # Qwen2.5-VL's own processor cap: a 644 x 840 board is 690 image tokens
CORPUS_SEEDS = 4  # episodes per game in the tokenizer corpus
CORPUS_STEPS = 6  # random steps per episode


def game_corpus(seeds: int = CORPUS_SEEDS, steps: int = CORPUS_STEPS) -> list[str]:
    """Texts the policy reads and writes: every game's prompt, board texts and answers along random episodes.

    Deterministic: game seeds and the random action choices come from fixed seeds.
    """
    import envs

    texts = [SYSTEM_PROMPT, "".join(TAGS)]
    for name in sorted(envs.GAMES):
        for seed in range(seeds):
            game = envs.make(name, seed=seed)
            rng = np.random.default_rng(seed)
            texts.append(game.prompt)
            for _ in range(steps):
                actions = game.legal_actions()
                board = game.text_observation()
                texts.append(board)
                if not actions:
                    break
                answers = [game.format_action(a) for a in actions]
                texts.extend(answers)
                action = actions[int(rng.integers(len(actions)))]
                texts.append(f"<perception>\n{board}\n</perception>\n<think>\n</think>\n<answer>{answers[0]}</answer>")
                game.step(action)
    return texts


def build_tokenizer(corpus: list[str]):
    """A Qwen2Tokenizer whose BPE is trained on `corpus`, with Qwen's special tokens, the tags and chat template.

    The BPE is trained with exactly the normalizer and pre-tokenizer that `Qwen2Tokenizer` rebuilds on load, so the
    merges learned here are the merges applied after `from_pretrained`.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]  # the Python API exposes the vocab but not the merges
    vocab, merges = trained["vocab"], [tuple(m) for m in trained["merges"]]

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=TEXT_CONFIG["max_position_embeddings"],
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer):
    """The Qwen2.5-VL processor (image + video processors and the tokenizer), built from arguments."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    vision = dict(patch_size=VISION_CONFIG["patch_size"], merge_size=VISION_CONFIG["spatial_merge_size"])
    size = {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(
        size=size, temporal_patch_size=VISION_CONFIG["temporal_patch_size"], **vision
    )
    video_processor = Qwen2VLVideoProcessor(size=size, **vision)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def set_pixel_cap(model_dir: str | os.PathLike, max_pixels: int) -> None:
    """Sets the saved processor's pixel cap (images and videos), e.g. to Qwen's own, so that boards get as many
    image tokens as the real model would give them: the tiny cap hides errors that only long image runs show."""
    path = Path(model_dir) / "processor_config.json"
    processor = json.loads(path.read_text())
    for key in ("image_processor", "video_processor"):
        processor[key]["size"]["longest_edge"] = max_pixels
    path.write_text(json.dumps(processor, indent=2))


def build_config(tokenizer, text_config: dict, vision_config: dict, vocab_size: int | None, dtype: str):
    """Qwen2.5-VL config of the given dimensions; token ids from `tokenizer`, the vocab padded past its end."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    padded = -(-len(tokenizer) // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    text = dict(
        text_config,
        vocab_size=vocab_size or padded,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(vision_config),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text.pop("tie_word_embeddings", False),
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.dtype = dtype
    return config


def build_tiny_model(
    out_dir: str | os.PathLike,
    seed: int = 0,
    corpus: list[str] | None = None,
    text_config: dict | None = None,
    vision_config: dict | None = None,
    vocab_size: int | None = None,
    dtype: str = "float32",
    write_weights: bool = True,
) -> Path:
    """Writes a Qwen2.5-VL model directory: config, random weights from `seed`, tokenizer and processor.

    The defaults make the tiny model; other dimensions (e.g. the published 3B's, for GPU benchmarks) reuse the same
    tokenizer and processor.

    Args:
        out_dir: directory to create (parents too); existing files in it are overwritten.
        seed: seeds the weight initialization: the same seed gives the same weights.
        corpus: tokenizer training texts; `game_corpus()` when None.
        text_config: language-model dimensions; TEXT_CONFIG when None.
        vision_config: vision-tower dimensions; VISION_CONFIG when None.
        vocab_size: embedding rows; the tokenizer's size rounded up to VOCAB_PAD_MULTIPLE when None.
        dtype: dtype of the weights and of `config.dtype`.
        write_weights: False writes everything but the weights (vLLM then loads with `load_format="dummy"`).

    Returns:
        The directory, loadable by `AutoProcessor.from_pretrained` / `vllm.LLM(model=...)` offline.
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(game_corpus() if corpus is None else corpus)
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, text_config or TEXT_CONFIG, vision_config or VISION_CONFIG, vocab_size, dtype)
    generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id],
        pad_token_id=config.text_config.pad_token_id,
    )
    processor.save_pretrained(out)
    if not write_weights:
        config.save_pretrained(out)
        generation_config.save_pretrained(out)
        return out
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
    model.generation_config = generation_config
    model.save_pretrained(out)
    return out


def default_cache_dir() -> Path:
    """`$VLM_GYM_RL_CACHE` or `~/.cache/vlm_gym_rl`."""
    return Path(os.environ.get("VLM_GYM_RL_CACHE", Path.home() / ".cache" / "vlm_gym_rl"))


def ensure_model_dir(name: str, cache_dir: str | os.PathLike | None = None, seed: int = 0, **build_kwargs) -> Path:
    """A model directory built by `build_tiny_model(..., **build_kwargs)` on first use, then reused from the cache.

    The cache key changes with this module's source, the corpus (the games' texts), the arguments and the library
    versions, so a changed builder or game never serves a stale model.
    """
    import tokenizers
    import transformers

    corpus = game_corpus()
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update("\x00".join(corpus).encode())
    digest.update(repr((seed, sorted(build_kwargs.items()), transformers.__version__, tokenizers.__version__)).encode())
    build = functools.partial(build_tiny_model, seed=seed, corpus=corpus, **build_kwargs)
    return cached_build(name, digest.hexdigest(), build, cache_dir)


def cached_build(
    name: str, key: str, build: Callable[[Path], object], cache_dir: str | os.PathLike | None = None
) -> Path:
    """`<cache>/<name>-<key[:16]>`: a model directory that `build(directory)` writes on first use, then reused.

    `key` (a hex digest) must cover everything that made the model (sources, data, settings), so that a change never
    serves a stale one. Safe when several processes (e.g. rollout actors) call it at once: each builds into a private
    temporary directory and renames it into place; the loser of the race uses the winner's copy. A directory counts
    as built once it has a config.json, which the rename makes appear at once.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{name}-{key[:16]}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-building-", dir=root))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """The tiny model's directory, built once and cached (see `ensure_model_dir`)."""
    return ensure_model_dir("tiny-qwen2_5_vl", cache_dir, seed)
