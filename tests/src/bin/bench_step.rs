//! Benchmark: one LoRA training step on a GPT-2 export, in clear f32 and with real
//! encryption against a real `fhe-run server` process over HTTP, in the same run.
//!
//! cargo build --release -p fhe-run -p fhe-tests
//! target/release/bench_step [MODEL.onnx] [--batch 16] [--seq 128] [--steps 1] [--ids-out FILE]
//!
//! The run compiles the model once, then measures each side in its own process, so that
//! peak resident memory is the client's alone and the server's alone:
//! - `--role clear`: the same training step with the frozen layers in clear f32 in process
//!   (client and server work in one process: the baseline);
//! - `fhe-run server` (found next to this binary) serving the artifact's server part;
//! - `--role client`: the encrypted step, client part only, talking HTTP to that server.
//!
//! Each side first runs one warm-up step (it also builds the execution plan), then `--steps`
//! timed steps; times are medians. `scripts/bench_step.sh` runs this and the PyTorch + PEFT
//! reference on the same tokens.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use fhe_backend_clear::F32Backend;
use fhe_backend_rlwe::{ClientKey, FheBackend, Setting};
use fhe_client::{ClientConfig, HttpClient};
use fhe_compile::{compile, CompileOptions};
use fhe_exec::artifact::{ClientArtifact, ServerArtifact};
use fhe_exec::tensor_io::{read_safetensors, write_safetensors};
use fhe_exec::{stage_key, LinearBackend};
use fhe_ir::{Stage, Tensor};
use fhe_passes::{LoraConfig, LoraTargets};
use fhe_tests::{registry, Random};
use fhe_train::data::Block;
use fhe_train::trainer::{TrainConfig, Trainer};
use serde::{Deserialize, Serialize};

#[global_allocator]
static ALLOCATOR: fhe_alloc::Allocator = fhe_alloc::Allocator;

const VOCAB: i64 = 50257;

/// Peak resident memory of a process, in MiB (`VmHWM` of /proc/PID/status).
fn peak_rss_mib(pid: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM in /proc status")?;
    Ok(kib / 1024.0)
}

/// What one measuring process reports, as one JSON line on stdout.
#[derive(Serialize, Deserialize)]
struct SideReport {
    warmup_s: f64,
    step_s: f64,
    loss: f32,
    /// Seconds per timed step, by profile key (op kind or server-call stage).
    profile: BTreeMap<String, f64>,
    /// Seconds per timed step the profile's own bookkeeping took (in `step_s`, in no key).
    profiling_s: f64,
    up_bytes: u64,
    down_bytes: u64,
    server_s: f64,
    peak_rss_mib: f64,
    /// Most clear tensor bytes alive at once in the executor, and the largest of them.
    peak_live_mib: f64,
    peak_values: Vec<(String, f64)>,
    /// Where in the timed step the resident peak last grew (`None`: it did not).
    rss_peak_grew_at: Option<String>,
}

const REPORT: &str = "REPORT ";

struct Options {
    model: PathBuf,
    batch: usize,
    seq: usize,
    steps: usize,
    ids_out: Option<PathBuf>,
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs one warm-up and `steps` timed training steps through `backend`; the profile covers
/// the timed steps.
fn measure(client: &ClientArtifact, ids: &Tensor, steps: usize, backend: &dyn LinearBackend) -> Result<SideReport> {
    let (batch, seq) = (ids.shape()[0], ids.shape()[1]);
    let blocks: Vec<Block> = ids
        .to_i64_vec()?
        .chunks(seq)
        .map(|row| Block { ids: row.to_vec(), labels: row[1..].iter().copied().chain([-100]).collect() })
        .collect();
    let config = TrainConfig { steps: steps + 1, batch, grad_accum: 1, lr: 1e-3, warmup: 0, weight_decay: 0.0, seed: 0 };
    let mut trainer = Trainer::new(client, config, blocks.len());
    let start = Instant::now();
    let first = trainer.train_step(&blocks, backend)?;
    let warmup_s = start.elapsed().as_secs_f64();
    trainer.model().start_profiling();
    let mut times = Vec::new();
    for _ in 0..steps {
        let start = Instant::now();
        trainer.train_step(&blocks, backend)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let profile = trainer.model().take_profile().unwrap_or_default();
    Ok(SideReport {
        warmup_s,
        step_s: median(times),
        loss: first.loss,
        profile: profile.entries.iter().map(|(k, time)| (k.clone(), time.as_secs_f64() / steps as f64)).collect(),
        profiling_s: profile.bookkeeping.as_secs_f64() / steps as f64,
        up_bytes: 0,
        down_bytes: 0,
        server_s: 0.0,
        peak_rss_mib: 0.0,
        peak_live_mib: mib(profile.peak_live_bytes),
        peak_values: profile.peak_values.iter().map(|(name, b)| (name.clone(), mib(*b))).collect(),
        rss_peak_grew_at: profile.rss_peak.and_then(|p| p.grew_at),
    })
}

fn emit(mut report: SideReport) -> Result<()> {
    report.peak_rss_mib = peak_rss_mib("self")?;
    println!("{REPORT}{}", serde_json::to_string(&report)?);
    Ok(())
}

fn role_clear(artifact: &Path, ids: &Tensor, steps: usize) -> Result<()> {
    let client = ClientArtifact::load(artifact, &registry())?;
    let server = ServerArtifact::load(artifact)?;
    let backend = F32Backend::new(&server);
    emit(measure(&client, ids, steps, &backend)?)
}

fn role_client(artifact: &Path, ids: &Tensor, steps: usize, url: &str) -> Result<()> {
    let client = ClientArtifact::load(artifact, &registry())?;
    let transport = Arc::new(HttpClient::new(ClientConfig::new(url))?);
    let fhe = FheBackend::new(Arc::new(ClientKey::from_seed(1)), Setting::Compact, &client, transport);
    let mut report = measure(&client, ids, steps, &fhe)?;
    // The counters include the warm-up step; per step is what is reported.
    let per_step = |total: u64| total / (steps as u64 + 1);
    report.up_bytes = per_step(fhe.traffic.up.load(Ordering::Relaxed));
    report.down_bytes = per_step(fhe.traffic.down.load(Ordering::Relaxed));
    report.server_s = fhe.traffic.server_nanos.load(Ordering::Relaxed) as f64 / 1e9 / (steps + 1) as f64;
    emit(report)
}

/// Runs this binary in a role and reads its report.
fn run_side(role: &str, artifact: &Path, ids: &Path, steps: usize, url: Option<&str>) -> Result<SideReport> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--role", role, "--artifact"]).arg(artifact).arg("--ids").arg(ids).args(["--steps", &steps.to_string()]);
    if let Some(url) = url {
        cmd.args(["--server", url]);
    }
    let output = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("running the {role} side"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("the {role} side failed ({}): {stdout}", output.status);
    }
    let line = stdout.lines().find_map(|l| l.strip_prefix(REPORT)).with_context(|| format!("the {role} side printed no report: {stdout}"))?;
    Ok(serde_json::from_str(line)?)
}

/// A `fhe-run server` process on a free port, killed when dropped.
struct ServerProcess(std::process::Child);

impl ServerProcess {
    fn start(artifact: &Path) -> Result<(ServerProcess, String)> {
        let exe = std::env::current_exe()?.with_file_name("fhe-run");
        if !exe.exists() {
            bail!("{} is missing; build it first: cargo build --release -p fhe-run", exe.display());
        }
        let mut child = Command::new(&exe)
            .args(["server", "--artifact"])
            .arg(artifact.join("server"))
            .args(["--listen", "127.0.0.1:0", "--max-concurrent", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
        let server = ServerProcess(child);
        let url = line.trim().strip_prefix("listening on ").with_context(|| format!("unexpected first line from the server: `{line}`"))?.to_string();
        Ok((server, url))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn orchestrate(options: &Options) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let artifact = dir.path().join("artifact");
    let lora = LoraConfig { rank: 8, alpha: 32.0, targets: LoraTargets::Modules(vec!["c_attn".into()]), seed: 0 };
    compile(&CompileOptions { model: options.model.clone(), output: artifact.clone(), lora, tokenizer: None }, &registry())?;
    let ids = Random::new(1).i64(&[options.batch, options.seq], 0, VOCAB);
    let ids_file = dir.path().join("ids.safetensors");
    write_safetensors(&ids_file, &[("input_ids".to_string(), &ids)])?;
    if let Some(out) = &options.ids_out {
        std::fs::copy(&ids_file, out).with_context(|| format!("writing --ids-out {}", out.display()))?;
    }
    let tokens = options.batch * options.seq;
    println!(
        "model {} | {} × {} = {tokens} tokens per step | {} threads | warm-up + {} timed step(s) per side",
        options.model.display(),
        options.batch,
        options.seq,
        rayon::current_num_threads(),
        options.steps
    );

    let clear = run_side("clear", &artifact, &ids_file, options.steps, None)?;
    let (server, url) = ServerProcess::start(&artifact)?;
    let fhe = run_side("client", &artifact, &ids_file, options.steps, Some(&url))?;
    let server_rss = peak_rss_mib(&server.0.id().to_string())?;
    drop(server);

    let stage = |s: Stage| fhe.profile.get(stage_key(s)).copied().unwrap_or(0.0);
    let (seal, apply, open) = (stage(Stage::Seal), stage(Stage::Apply), stage(Stage::Open));
    let client_compute = fhe.step_s - seal - apply - open - fhe.profiling_s;
    let server_s = fhe.server_s.min(apply);
    println!("\nclear f32 step (same executor, frozen layers in clear): {:.2} s, first-step loss {:.4}", clear.step_s, clear.loss);
    println!("encrypted step: {:.2} s, first-step loss {:.4}", fhe.step_s, fhe.loss);
    println!("  client clear compute          {client_compute:7.2} s");
    println!("  quantize + encrypt (seal)     {seal:7.2} s");
    println!("  transfer (apply − server)     {:7.2} s", apply - server_s);
    println!("  server compute                {server_s:7.2} s");
    println!("  decrypt + dequantize (open)   {open:7.2} s");
    println!("  (profiling bookkeeping        {:7.2} s, in the step times; clear side {:.2} s)", fhe.profiling_s, clear.profiling_s);
    println!("ratio encrypted / clear = {:.2} (target ≤ 5)", fhe.step_s / clear.step_s);
    let per_token = |bytes: u64| bytes as f64 / tokens as f64 / 1e6;
    println!(
        "traffic per token per step: {:.3} MB up + {:.3} MB down = {:.3} MB (target ≤ 2)",
        per_token(fhe.up_bytes),
        per_token(fhe.down_bytes),
        per_token(fhe.up_bytes + fhe.down_bytes)
    );
    println!(
        "peak RSS: client {:.0} MiB (target ≤ 1.5 GB = 1431 MiB), server {server_rss:.0} MiB, clear baseline (client + clear server in one process) {:.0} MiB",
        fhe.peak_rss_mib, clear.peak_rss_mib
    );
    match &fhe.rss_peak_grew_at {
        Some(step) => println!("the client's resident peak last grew in the timed step, at {step}"),
        None => println!("the client's resident peak was reached in the warm-up step (plan building included)"),
    }
    println!("executor's peak of live tensors (client side): {:.0} MiB; largest then:", fhe.peak_live_mib);
    for (name, mib) in &fhe.peak_values {
        println!("  {name:<60} {mib:7.1} MiB");
    }
    println!("warm-up steps (plan building included): clear {:.2} s, encrypted {:.2} s", clear.warmup_s, fhe.warmup_s);
    println!("\nclear step by op kind (s per step):");
    let mut kinds: Vec<_> = clear.profile.iter().collect();
    kinds.sort_by(|a, b| b.1.total_cmp(a.1));
    for (kind, s) in kinds.iter().take(15) {
        println!("  {kind:<28} {s:7.3}");
    }
    Ok(())
}

fn main() -> Result<()> {
    fhe_alloc::keep_freed_memory();
    let mut options = Options { model: "models/gpt2-small/model.onnx".into(), batch: 16, seq: 128, steps: 1, ids_out: None };
    let (mut role, mut artifact, mut ids, mut url) = (None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--batch" => options.batch = value()?.parse()?,
            "--seq" => options.seq = value()?.parse()?,
            "--steps" => options.steps = value()?.parse::<usize>()?.max(1),
            "--ids-out" => options.ids_out = Some(value()?.into()),
            "--role" => role = Some(value()?),
            "--artifact" => artifact = Some(PathBuf::from(value()?)),
            "--ids" => ids = Some(PathBuf::from(value()?)),
            "--server" => url = Some(value()?),
            flag if flag.starts_with("--") => bail!("unknown option {flag}"),
            path => options.model = path.into(),
        }
    }
    let Some(role) = role else { return orchestrate(&options) };
    let artifact = artifact.context("--role needs --artifact")?;
    let ids = read_safetensors(&ids.context("--role needs --ids")?)?
        .into_iter()
        .find_map(|(name, t)| (name == "input_ids").then_some(t))
        .context("no input_ids in --ids")?;
    match role.as_str() {
        "clear" => role_clear(&artifact, &ids, options.steps),
        "client" => role_client(&artifact, &ids, options.steps, &url.context("--role client needs --server")?),
        other => bail!("unknown role {other}; use clear or client"),
    }
}
