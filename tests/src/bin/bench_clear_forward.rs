//! Benchmark: clear forward of a compiled GPT-2 export against tract-onnx, same model and
//! tokens, in the same run (the machines are shared and noisy: only the ratio is stable).
//!
//! cargo run --release -p fhe-tests --bin bench_clear_forward -- [MODEL.onnx] [--batch B] [--seq S] [--iters N]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fhe_exec::Model;
use fhe_tests::{max_abs_diff, registry, Random, TractModel};

struct Options {
    model: String,
    batch: usize,
    seq: usize,
    iters: usize,
}

fn options() -> Result<Options> {
    let mut o = Options { model: "models/gpt2-small/model.onnx".into(), batch: 1, seq: 128, iters: 10 };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || -> Result<usize> { args.next().context("missing value")?.parse().context("not a number") };
        match arg.as_str() {
            "--batch" => o.batch = value()?,
            "--seq" => o.seq = value()?,
            "--iters" => o.iters = value()?,
            flag if flag.starts_with("--") => bail!("unknown option {flag}"),
            path => o.model = path.into(),
        }
    }
    Ok(o)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn time(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    f()?; // warm-up: first-touch allocations, caches
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    Ok(median(times))
}

fn main() -> Result<()> {
    let o = options()?;
    let bytes = std::fs::read(&o.model).with_context(|| {
        format!("reading {} (make it with tools/export_gpt2.py, see docs/BENCHMARKS.md)", o.model)
    })?;
    let ids = Random::new(0).i64(&[o.batch, o.seq], 0, 50257);

    let start = Instant::now();
    let imported = fhe_onnx::import_bytes(&bytes, &registry())?;
    let model = Model::new(imported.graph);
    let plan = model.plan(&HashMap::from([("input_ids".to_string(), vec![o.batch, o.seq])]))?;
    let ours_load = start.elapsed();

    let start = Instant::now();
    let tract = TractModel::new(&bytes, &[&ids])?;
    let tract_load = start.elapsed();

    let run_ours = || plan.run(HashMap::from([("input_ids".to_string(), ids.clone())])).map(|mut o| o.remove(0).1);
    let diff = max_abs_diff(&run_ours()?, &tract.run(&[&ids])?.remove(0))?;

    let ours = time(o.iters, || Ok(drop(run_ours()?)))?;
    let theirs = time(o.iters, || tract.run(&[&ids]).map(drop))?;
    let threads = rayon::current_num_threads();
    println!("model {} | batch {} × seq {} | {} iterations, median | {threads} rayon threads", o.model, o.batch, o.seq, o.iters);
    println!("load+plan: fhe-lora {:.2} s, tract {:.2} s", ours_load.as_secs_f64(), tract_load.as_secs_f64());
    println!("forward:   fhe-lora {:.1} ms, tract {:.1} ms", ours.as_secs_f64() * 1e3, theirs.as_secs_f64() * 1e3);
    println!("ratio fhe-lora / tract = {:.2} (target ≤ 1.5); max |Δlogit| = {diff:.2e}", ours.as_secs_f64() / theirs.as_secs_f64());
    Ok(())
}
