//! `fhe-compile`: compiles a GPT-2 ONNX export into an fhe-lora artifact: a client part
//! (forward and training graphs with LoRA, embeddings, norms, attention) and a server part
//! (the frozen linear layers, quantized for FHE).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use fhe_compile::{check_io, compile, default_output, registry, CompileOptions};
use fhe_passes::{LoraConfig, LoraTargets};

#[derive(Parser, Debug)]
#[command(name = "fhe-compile", version, about = "Compile a GPT-2 ONNX export into an fhe-lora artifact (client and server parts).")]
struct Args {
    /// The ONNX model (a Hugging Face GPT2LMHeadModel export, opset 14 to 17).
    model: PathBuf,

    /// Output directory [default: next to the model, `<model name>.fhe`].
    #[arg(short, long)]
    output: Option<PathBuf>,

    /// LoRA rank r.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,

    /// LoRA alpha; adapters are scaled by alpha/r.
    #[arg(long, default_value_t = 32.0)]
    lora_alpha: f32,

    /// Layers that get adapters: `c_attn` (PEFT's GPT-2 default), `all-linear`, or a
    /// comma-separated list of module names (`c_attn,c_fc` or `transformer.h.0.mlp.c_fc`).
    #[arg(long, default_value = "c_attn")]
    lora_targets: String,

    /// Seed of the adapters' random initialization.
    #[arg(long, default_value_t = 0)]
    lora_seed: u64,

    /// After compiling, run the compiled client graph (server layers in f32) on the inputs
    /// stored in this safetensors file (tensors named after the graph inputs) and compare
    /// with its stored outputs (named after the graph outputs). Also reports how far the
    /// 8-bit simulation of the encrypted layers is.
    #[arg(long, value_name = "IO.safetensors")]
    check_io: Option<PathBuf>,

    /// Tokenizer to ship in the client part [default: `tokenizer.json` beside the model].
    #[arg(long, value_name = "tokenizer.json")]
    tokenizer: Option<PathBuf>,

    /// Largest accepted max |difference| per output for `--check-io`.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
}

fn run(args: Args) -> Result<bool> {
    let registry = registry();
    let output = args.output.clone().unwrap_or_else(|| default_output(&args.model));
    let lora = LoraConfig { rank: args.lora_rank, alpha: args.lora_alpha, targets: LoraTargets::parse(&args.lora_targets)?, seed: args.lora_seed };
    let options = CompileOptions { model: args.model.clone(), output: output.clone(), lora, tokenizer: args.tokenizer.clone() };
    let c = compile(&options, &registry)?;
    println!("compiled {} (opset {}) → {}", args.model.display(), c.opset, output.display());
    println!(
        "  {} frozen linear layers on the server, LoRA rank {} alpha {} on {} of them; lm_head {}",
        c.server_layers,
        args.lora_rank,
        args.lora_alpha,
        c.adapters,
        if c.tied_head { "tied to the token embedding (one copy kept)" } else { "on the client" }
    );
    println!("  client graphs: forward {} nodes, training {} nodes", c.forward_nodes, c.train_nodes);
    println!("{}", c.report);
    match &args.check_io {
        Some(io) => check_io(&output, io, args.tolerance, &registry),
        None => Ok(true),
    }
}

// Compiling GPT-2 copies hundreds of MB of weights through short-lived buffers; see fhe-alloc.
#[global_allocator]
static ALLOCATOR: fhe_alloc::Allocator = fhe_alloc::Allocator;

fn main() -> ExitCode {
    fhe_alloc::keep_freed_memory();
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: the compiled model differs from the stored outputs by more than --tolerance");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
