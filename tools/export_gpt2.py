#!/usr/bin/env python3
"""Export a GPT2LMHeadModel of any size to ONNX, the way Hugging Face GPT-2 is normally
exported, with random weights (there is no model hub on our machines).

Needs torch and transformers from PyPI (tested with torch 2.3.1, transformers 4.46.3):

    python3 -m venv .venv && .venv/bin/pip install torch==2.3.1 transformers==4.46.3 onnx

Examples:

    # GPT-2-small shapes (124M parameters, ~650 MB), for benchmarks; not committed:
    .venv/bin/python tools/export_gpt2.py --out models/gpt2-small/model.onnx

    # The opset-14 test fixture: decomposed LayerNorm and an attention_mask input:
    .venv/bin/python tools/export_gpt2.py --n-embd 32 --n-layer 2 --n-head 2 \
        --n-positions 32 --vocab-size 300 --opset 14 --attention-mask \
        --out tools/fixtures/gpt2-opset14-mask/model.onnx \
        --reference-io tools/fixtures/gpt2-opset14-mask/reference_io.safetensors

With --reference-io, the script also stores `input_ids` (and `attention_mask`) of shape
[--batch, --seq] and the `logits` torch computes for them, for `fhe-compile --check-io`.
"""

import argparse
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def add_model_args(p):
    """The GPT2Config options and the seed (shared with tools/bench_torch_step.py)."""
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-positions", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50257)
    p.add_argument("--seed", type=int, default=0)


def build_model(args):
    """A GPT2LMHeadModel with random weights from `args.seed`: the same weights every time."""
    torch.manual_seed(args.seed)
    config = GPT2Config(
        vocab_size=args.vocab_size,
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


class LogitsOnly(torch.nn.Module):
    """GPT2LMHeadModel returning only the logits, so the export has one output."""

    def __init__(self, model, with_mask):
        super().__init__()
        self.model = model
        self.with_mask = with_mask

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14 to 17 (below 17 LayerNorm is decomposed)")
    p.add_argument("--attention-mask", action="store_true", help="add an attention_mask input")
    p.add_argument("--out", required=True, help="path of the .onnx file to write")
    p.add_argument("--reference-io", help="also write inputs and torch logits to this safetensors file")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    args = p.parse_args()

    model = build_model(args).eval()
    wrapper = LogitsOnly(model, args.attention_mask).eval()

    g = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(0, args.vocab_size, (args.batch, args.seq), generator=g)
    names = ["input_ids"]
    example = (input_ids,)
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    attention_mask = None
    if args.attention_mask:
        attention_mask = torch.ones(args.batch, args.seq, dtype=torch.int64)
        attention_mask[0, : args.seq // 4] = 0  # left padding on the first row
        names.append("attention_mask")
        example = (input_ids, attention_mask)
        dynamic["attention_mask"] = {0: "batch", 1: "sequence"}

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            example,
            args.out,
            input_names=names,
            output_names=["logits"],
            dynamic_axes=dynamic,
            opset_version=args.opset,
            do_constant_folding=True,
        )
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {params} parameters, opset {args.opset}")

    if args.reference_io:
        from safetensors.torch import save_file

        with torch.no_grad():
            logits = wrapper(input_ids, attention_mask)
        tensors = {"input_ids": input_ids.contiguous(), "logits": logits.contiguous()}
        if attention_mask is not None:
            tensors["attention_mask"] = attention_mask.contiguous()
        save_file(tensors, args.reference_io)
        print(f"wrote {args.reference_io}")


if __name__ == "__main__":
    main()
