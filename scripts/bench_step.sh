#!/usr/bin/env bash
# Reproduces the training-step numbers of docs/BENCHMARKS.md: for 16 × 128 and 4 × 128
# tokens per step on GPT-2-small shapes, the clear step, the encrypted step (split into
# client compute, encryption, transfer, server, decryption), traffic, client and server peak
# memory, and the PyTorch + PEFT reference step on the same model and tokens.
#
#   bash scripts/bench_step.sh            # both sizes
#   bash scripts/bench_step.sh 16x128     # one size
#
# Needs python3 with pip for the GPT-2-small export and the PyTorch reference (installed
# into .venv on first use, from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("${@:-16x128 4x128}")
model=models/gpt2-small/model.onnx
target_dir=${CARGO_TARGET_DIR:-target}

if ! .venv/bin/python -c 'import torch, transformers, peft, onnx' 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install -q torch==2.3.1 transformers==4.46.3 peft==0.13.2 onnx
fi
[ -f "$model" ] || .venv/bin/python tools/export_gpt2.py --out "$model"
cargo build --release -p fhe-run -p fhe-tests --bins
lscpu | grep -E '^(Model name|CPU\(s\))' || true
for size in ${sizes[*]}; do
    batch=${size%x*} seq=${size#*x}
    ids=$(mktemp --suffix .safetensors)
    echo "== $batch x $seq tokens per step =="
    "$target_dir/release/bench_step" "$model" --batch "$batch" --seq "$seq" --ids-out "$ids"
    .venv/bin/python tools/bench_torch_step.py --ids "$ids" --threads "$(nproc)"
    rm -f "$ids"
done
