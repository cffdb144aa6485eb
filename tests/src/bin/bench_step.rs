//! Benchmark: one LoRA training step on a GPT-2 export, in clear f32 and with real
//! encryption (in-process server, real wire format), in the same run.
//!
//! cargo run --release -p fhe-tests --bin bench_step -- [MODEL.onnx] [--batch 16] [--seq 128]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use fhe_backend_clear::F32Backend;
use fhe_backend_rlwe::{ClientKey, FheBackend, LinearServer, LocalTransport, Setting};
use fhe_compile::{compile, CompileOptions};
use fhe_exec::artifact::{ClientArtifact, ServerArtifact};
use fhe_exec::LinearBackend;
use fhe_passes::{LoraConfig, LoraTargets};
use fhe_tests::{registry, Random};
use fhe_train::data::Block;
use fhe_train::trainer::{TrainConfig, Trainer};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Peak resident memory of this process so far, in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0)
}

fn main() -> Result<()> {
    let (mut model, mut batch, mut seq) = ("models/gpt2-small/model.onnx".to_string(), 16usize, 128usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--batch" => batch = args.next().context("--batch needs a value")?.parse()?,
            "--seq" => seq = args.next().context("--seq needs a value")?.parse()?,
            flag if flag.starts_with("--") => bail!("unknown option {flag}"),
            path => model = path.to_string(),
        }
    }
    let dir = tempfile::tempdir()?;
    let lora = LoraConfig { rank: 8, alpha: 32.0, targets: LoraTargets::Modules(vec!["c_attn".into()]), seed: 0 };
    compile(&CompileOptions { model: model.clone().into(), output: dir.path().to_path_buf(), lora, tokenizer: None }, &registry())?;
    let client = ClientArtifact::load(dir.path(), &registry())?;
    let server = ServerArtifact::load(dir.path())?;
    let ids = Random::new(1).i64(&[batch, seq], 0, 50257).to_i64_vec()?;
    let blocks: Vec<Block> = ids
        .chunks(seq)
        .map(|row| Block { ids: row.to_vec(), labels: row[1..].iter().copied().chain([-100]).collect() })
        .collect();
    let config = TrainConfig { steps: 2, batch, grad_accum: 1, lr: 1e-3, warmup: 0, weight_decay: 0.0, seed: 0 };
    let tokens = batch * seq;
    println!("model {model} | {batch} × {seq} = {tokens} tokens per step | {} rayon threads", rayon::current_num_threads());

    let step_time = |backend: &dyn LinearBackend| -> Result<(f64, f32)> {
        let mut trainer = Trainer::new(&client, config.clone(), blocks.len());
        let start = Instant::now();
        let log = trainer.train_step(&blocks, backend)?;
        Ok((start.elapsed().as_secs_f64(), log.loss))
    };
    let clear_backend = F32Backend::new(&server);
    let (clear, clear_loss) = step_time(&clear_backend)?;
    println!("clear f32 step:  {clear:.2} s (loss {clear_loss:.4}), peak RSS so far {:.0} MiB", peak_rss_mib());
    drop(clear_backend);
    let transport = Arc::new(LocalTransport(Arc::new(LinearServer::new(&server))));
    let fhe = FheBackend::new(Arc::new(ClientKey::from_seed(1)), Setting::Compact, &client, transport);
    let (encrypted, fhe_loss) = step_time(&fhe)?;
    let (up, down) = (fhe.traffic.up.load(Ordering::Relaxed), fhe.traffic.down.load(Ordering::Relaxed));
    println!("encrypted step:  {encrypted:.2} s (loss {fhe_loss:.4}), peak RSS {:.0} MiB (client and server in one process)", peak_rss_mib());
    println!("ratio encrypted / clear = {:.1} (target ≤ 5)", encrypted / clear);
    println!(
        "traffic per token per step: {:.2} MB up, {:.2} MB down, {:.2} MB total (target ≤ 2)",
        up as f64 / tokens as f64 / 1e6,
        down as f64 / tokens as f64 / 1e6,
        (up + down) as f64 / tokens as f64 / 1e6
    );
    Ok(())
}
