"""Can the tiny model's text stack learn which 2048 moves change the board, from the board as it writes it?

    .venv/bin/python -P bench/legality_probe.py                      # down, both board formats, 1,500 steps each
    .venv/bin/python -P bench/legality_probe.py --steps 4000 --formats cells --width 256

G1's tiny cold start reads 2048 boards but does not learn the decision after reading (README, "Cold start"): with
the corner expert (`+game.2048.difficulty.expert=corner`), whose `<think>` asks "down blocked or moves?" before
anything else, the cold-started model said "down moves" on 48% of boards where that was right, chance, after 2,000
states and DAgger. This bench asks the question alone, without images, vLLM or DeepSpeed, so that it takes minutes:
the tiny model's architecture (Qwen2.5-VL, the dimensions `actors/tiny_model.py` builds, `--width`/`--layers` to size
it up) and its tokenizer, freshly initialised, trained with AdamW on one token: after "<board>\\n<move>", " moves"
or " blocked". Boards come from the corner expert's own play from reset, a fifth of the moves random (the states a
cold start sees), the held-out ones from other seeds. Two ways to write a board:
    text   the game's own `text_observation` (what `<perception>` holds): `2|-|-|1024`; the tokenizer merges runs of
           empty cells and splits numbers into digits, so a row is 4-12 tokens and the cell below is no fixed offset
    cells  one character a cell: `-` or the tile's log2 as a letter (2 -> a, 4 -> b, ...): `a--j`
Prints each format's held-out accuracy beside the majority answer's, and ends with
`legality_probe: move=<m> steps=<n> width=<w> layers=<l> majority=<share> text=<accuracy> cells=<accuracy>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# Run as a script, this file's folder comes first on sys.path, and bench/envs.py would shadow the `envs` package.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import envs  # noqa: E402
from envs.game_2048 import ACTIONS, Game2048  # noqa: E402

FORMATS = ("text", "cells")


def corner_states(n: int, seed: int) -> list[Game2048]:
    """n live boards along the corner expert's play from reset (a fifth of its moves random), 0-180 moves in."""
    rng = np.random.default_rng(seed)
    states = []
    while len(states) < n:
        game = envs.make("2048", seed=int(rng.integers(1 << 30)), expert="corner")
        for _ in range(int(rng.integers(0, 181))):
            if game.terminated:
                break
            game.step(game.expert_move().action if rng.random() < 0.8 else game.random_legal_action(rng))
        if not game.terminated:
            states.append(game)
    return states


def board_text(game: Game2048, fmt: str) -> str:
    if fmt == "text":
        return game.text_observation()
    return "\n".join("".join(chr(ord("a") + v.bit_length() - 2) if v else "-" for v in row) for row in game.board)


def encode(tokenizer, states: list[Game2048], fmt: str, move: str):
    """Left-padded token ids, attention mask, and the label token of each state (" moves" or " blocked")."""
    import torch

    yes, no = tokenizer.encode(" moves")[-1], tokenizer.encode(" blocked")[-1]
    rows = [tokenizer.encode(f"{board_text(game, fmt)}\n{move}") for game in states]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    labels = torch.tensor([yes if ACTIONS.index(move) in game.legal_actions() else no for game in states])
    return ids, mask, labels, torch.tensor([yes, no])


def probe(model_dir, width: int | None, layers: int | None, train, test, steps: int, batch: int, lr: float) -> float:
    """Trains a fresh model of the tiny model's config on (ids, mask, labels) = train; its accuracy on test."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir)
    if width:
        config.text_config.hidden_size = config.vision_config.out_hidden_size = width
        config.text_config.intermediate_size = 2 * width
        config.text_config.num_attention_heads = width // 64  # head_dim 64, as the tiny model's (M-RoPE sections)
    if layers:
        config.text_config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    ids, mask, labels, _ = train
    for _ in range(steps):
        pick = torch.randint(0, len(ids), (batch,))
        logits = model(input_ids=ids[pick], attention_mask=mask[pick]).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ids, mask, labels, choices = test
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1, choices]
    return (choices[logits.argmax(-1)] == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--move", choices=ACTIONS, default="down")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--states", type=int, default=8000, help="training boards")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=None, help="text hidden size (the tiny model's: 128)")
    parser.add_argument("--layers", type=int, default=None, help="text layers (the tiny model's: 2)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from actors.tiny_model import TEXT_CONFIG, ensure_tiny_model

    torch.set_num_threads(1)
    model_dir = ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_states, test_states = corner_states(args.states, seed=0), corner_states(1000, seed=1)
    moving = np.mean([ACTIONS.index(args.move) in game.legal_actions() for game in test_states])
    majority = max(moving, 1 - moving)
    print(f"{args.move} changes the board on {moving:.3f} of {len(test_states)} held-out boards")
    results = {}
    for fmt in args.formats:
        start = time.perf_counter()
        train = encode(tokenizer, train_states, fmt, args.move)
        test = encode(tokenizer, test_states, fmt, args.move)
        results[fmt] = probe(model_dir, args.width, args.layers, train, test, args.steps, args.batch, args.lr)
        tokens = (train[1].sum(1).float().mean()).item()
        print(
            f"{fmt:6s} accuracy {results[fmt]:.3f} (majority {majority:.3f}); {tokens:.1f} tokens a board and move; "
            f"{time.perf_counter() - start:.0f} s"
        )
    shown = " ".join(f"{fmt}={results.get(fmt, float('nan')):.3f}" for fmt in FORMATS)
    print(
        f"legality_probe: move={args.move} steps={args.steps} width={args.width or TEXT_CONFIG['hidden_size']} "
        f"layers={args.layers or TEXT_CONFIG['num_hidden_layers']} "
        f"majority={majority:.3f} {shown}"
    )


if __name__ == "__main__":
    main()
