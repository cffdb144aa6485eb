#!/usr/bin/env python3
"""Outside reference for `bench_step`: one PyTorch + PEFT LoRA training step of the same
GPT-2 model on the same tokens.

The model is rebuilt exactly as tools/export_gpt2.py builds it (same GPT2Config, same seed,
so the same random weights as the exported ONNX file); the tokens come from the file that
`bench_step --ids-out FILE` writes. LoRA as fhe-lora's default: rank 8, alpha 32, on c_attn,
no dropout; AdamW, no weight decay. The model runs in eval mode (no dropout), like the ONNX
export. Prints the first step's loss (it must match fhe-lora's: LoRA B starts at zero, so
the first loss depends only on the frozen model) and the median step time.

Needs torch, transformers and peft from PyPI (tested with torch 2.3.1, transformers 4.46.3,
peft 0.13.2):

    .venv/bin/pip install torch==2.3.1 transformers==4.46.3 peft==0.13.2
    .venv/bin/python tools/bench_torch_step.py --ids /tmp/ids.safetensors --threads 2
"""

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from export_gpt2 import add_model_args, build_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", required=True, help="safetensors file with `input_ids` [batch, seq] (bench_step --ids-out)")
    add_model_args(p)
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(args)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True, bias="none")
    model = get_peft_model(model, lora).eval()
    ids = load_file(args.ids)["input_ids"].long()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        # Labels are the inputs; the model shifts them, like fhe-lora's blocks.
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    start = time.perf_counter()
    first_loss = step()
    warmup = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    batch, seq = ids.shape
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {batch} x {seq} tokens")
    print(f"first-step loss {first_loss:.4f}")
    print(f"torch+peft step: median {statistics.median(times):.3f} s over {args.steps} steps (warm-up step {warmup:.3f} s)")


if __name__ == "__main__":
    main()
