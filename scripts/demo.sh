#!/usr/bin/env bash
# The main job on the shipped tiny GPT-2: compile it into client and server parts, fine-tune
# LoRA with real encryption (an embedded server on loopback computes the frozen layers on
# ciphertexts), then generate an answer with the trained adapter. Outputs go to out/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p fhe-compile -p fhe-run
bin="${CARGO_TARGET_DIR:-target}/release"
"$bin/fhe-compile" models/gpt2-tiny/model.onnx -o out/gpt2-tiny.fhe --check-io models/gpt2-tiny/reference_io.safetensors
"$bin/fhe-run" client train --artifact out/gpt2-tiny.fhe --data data_finetune/private_ml_qa.txt \
    --steps "${STEPS:-30}" --batch 4 --block-size 32 --lr 1e-2 --out out/run
"$bin/fhe-run" client generate --artifact out/gpt2-tiny.fhe --adapter out/run/adapter \
    --prompt "What is fully homomorphic encryption?" --max-new-tokens 16
