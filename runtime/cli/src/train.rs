//! `fhe-run client train`: fine-tunes the LoRA adapters with the frozen layers computed by a
//! server on ciphertexts (or, to compare, in the 8-bit simulation or in clear f32).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fhe_backend_clear::{F32Backend, Int8Backend};
use fhe_backend_rlwe::{ClientKey, FheBackend, Setting, Traffic, PARAMETER_SET_ID};
use fhe_client::{ClientConfig, HttpClient};
use fhe_exec::artifact::{ClientArtifact, ServerArtifact};
use fhe_exec::LinearBackend;
use fhe_ir::Registry;
use fhe_server::{serve, ServerConfig};
use fhe_train::data::{load_examples, Encoder};
use fhe_train::trainer::{TrainConfig, Trainer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fhe {
    /// Real encryption: the server computes on ciphertexts.
    Execute,
    /// The same integers in clear, no server (reads the artifact's server part).
    Simulate,
    /// Plain f32, no quantization, no server (reads the artifact's server part).
    Clear,
}

/// Where the frozen layers run: shared by `train` and `generate`.
#[derive(clap::Args, Debug)]
pub struct BackendArgs {
    /// The artifact directory written by fhe-compile (its client part; the server part too for
    /// the embedded server and for --fhe simulate|clear).
    #[arg(long)]
    pub artifact: PathBuf,
    /// Server URL; without it, a server from the artifact's server part runs on loopback.
    #[arg(long)]
    server: Option<String>,
    /// Bearer token for --server.
    #[arg(long)]
    token: Option<String>,
    #[arg(long, value_enum, default_value = "execute")]
    fhe: Fhe,
    /// Wire setting of --fhe execute: `compact` (5 bytes per value up, 7 down) or `exact`
    /// (results equal the integer products; resumed runs then match uninterrupted ones).
    #[arg(long, default_value = "compact", value_parser = ["compact", "exact"])]
    setting: String,
}

/// The linear backend the options ask for, and its traffic counters when it talks to a server.
pub fn make_backend(args: &BackendArgs, client: &ClientArtifact, key_path: &std::path::Path) -> Result<(Box<dyn LinearBackend>, Option<Arc<Traffic>>)> {
    Ok(match args.fhe {
        Fhe::Clear => (Box::new(F32Backend::new(&ServerArtifact::load(&args.artifact)?)), None),
        Fhe::Simulate => (Box::new(Int8Backend::new(&ServerArtifact::load(&args.artifact)?)), None),
        Fhe::Execute => {
            let url = match &args.server {
                Some(url) => url.clone(),
                None => format!("http://{}", embedded_server(args.artifact.clone())?),
            };
            let http = HttpClient::new(ClientConfig { token: args.token.clone(), ..ClientConfig::new(&url) })?;
            let info = http.info().with_context(|| format!("asking {url} what it serves"))?;
            if info.parameter_set_id != PARAMETER_SET_ID || info.model_sha256 != client.manifest.model_sha256 {
                bail!(
                    "the server at {url} serves model {} with parameter set {}, but this artifact is model {} with parameter set {PARAMETER_SET_ID}; compile both from the same model",
                    info.model_sha256, info.parameter_set_id, client.manifest.model_sha256
                );
            }
            let key = Arc::new(ClientKey::load_or_generate(key_path)?);
            let setting = Setting::parse(&args.setting).expect("clap checked the value");
            let fhe = FheBackend::new(key, setting, client, Arc::new(http));
            let traffic = fhe.traffic.clone();
            (Box::new(fhe), Some(traffic))
        }
    })
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// Training data: question/answer lines (.txt) or JSONL (.jsonl).
    #[arg(long)]
    data: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 20, conflicts_with = "epochs")]
    steps: usize,
    /// Passes over the data, instead of --steps.
    #[arg(long)]
    epochs: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence (at most the model's context).
    #[arg(long, default_value_t = 32)]
    block_size: usize,
    #[arg(long, default_value_t = 1e-2)]
    lr: f32,
    /// Warm-up steps of the learning rate.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory: adapter (PEFT layout), metrics.csv, client key.
    #[arg(long, default_value = "fhe-lora-out")]
    out: PathBuf,
    /// Client secret key file [default: OUT/client.key]; created if missing, never sent.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Write a checkpoint (adapter, optimizer, data position) every this many steps.
    #[arg(long, default_value_t = 5)]
    checkpoint_every: usize,
    /// Continue from OUT/checkpoint instead of starting over.
    #[arg(long)]
    resume: bool,
}

pub fn registry() -> Registry {
    let mut registry = Registry::new();
    fhe_ops_std::register_all(&mut registry);
    fhe_ops_linear::register_all(&mut registry);
    registry
}

/// A real `fhe-server` on a loopback port, in this process, for as long as the run lasts.
fn embedded_server(artifact: PathBuf) -> Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    let config = ServerConfig {
        artifact,
        listen: "127.0.0.1:0".parse().expect("address"),
        max_body: 64 << 20,
        max_concurrent: 2,
        token: None,
        tls: None,
        request_timeout: Duration::from_secs(600),
    };
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let ready = tx.clone();
        let result = runtime.block_on(serve(config, move |addr, _| drop(ready.send(Ok(addr))), std::future::pending()));
        if let Err(e) = result {
            let _ = tx.send(Err(e.to_string()));
        }
    });
    rx.recv().context("the embedded server thread stopped")?.map_err(|e| anyhow::anyhow!("embedded server: {e}"))
}

pub fn run(mut args: TrainArgs) -> Result<()> {
    if args.steps == 0 || args.batch == 0 || args.grad_accum == 0 || args.epochs == Some(0) {
        bail!("--steps, --batch and --grad-accum must be at least 1");
    }
    let client = ClientArtifact::load(&args.backend.artifact, &registry()).context("loading the client part")?;
    let tokenizer = client.tokenizer.clone().context("the artifact has no tokenizer; re-run fhe-compile with tokenizer.json beside the model or --tokenizer FILE")?;
    let encoder = Encoder::load(&tokenizer)?;
    let examples = load_examples(&args.data)?;
    let blocks = encoder.blocks(&examples, args.block_size, client.context_length().unwrap_or(usize::MAX))?;
    if let Some(epochs) = args.epochs {
        args.steps = (epochs * blocks.len()).div_ceil(args.batch * args.grad_accum);
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating --out {}", args.out.display()))?;

    let key_path = args.key.clone().unwrap_or_else(|| args.out.join("client.key"));
    let (backend, traffic) = make_backend(&args.backend, &client, &key_path)?;

    let config = TrainConfig {
        steps: args.steps,
        batch: args.batch,
        grad_accum: args.grad_accum,
        lr: args.lr,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        seed: args.seed,
    };
    let mut trainer = Trainer::new(&client, config, blocks.len());
    let checkpoint = args.out.join("checkpoint");
    let metrics_path = args.out.join("metrics.csv");
    let mut rows = vec!["step,loss,lr,tokens,seconds,bytes_up,bytes_down".to_string()];
    if args.resume {
        trainer.resume(&checkpoint).context("resuming (remove --resume to start over)")?;
        // Keep the rows up to the checkpoint; the steps after it run again.
        let previous = std::fs::read_to_string(&metrics_path).unwrap_or_default();
        rows.extend(previous.lines().skip(1).filter(|l| l.split(',').next().and_then(|s| s.parse::<usize>().ok()).is_some_and(|s| s <= trainer.step())).map(String::from));
        println!("resuming after step {}", trainer.step());
    }
    let mut metrics = std::fs::File::create(&metrics_path).with_context(|| format!("creating {}", metrics_path.display()))?;
    for row in &rows {
        writeln!(metrics, "{row}")?;
    }
    println!("training {} examples ({} blocks of {} tokens), --fhe {:?}, {} steps", examples.len(), blocks.len(), args.block_size, args.backend.fhe, args.steps);
    // Drawn only on a terminal; the per-step lines are printed above it either way.
    let bar = indicatif::ProgressBar::new(args.steps as u64).with_position(trainer.step() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}").expect("valid template"),
    );
    while trainer.step() < args.steps {
        let started = Instant::now();
        let log = trainer.train_step(&blocks, backend.as_ref()).context("training step")?;
        let (up, down) = traffic.as_ref().map_or((0, 0), |t| (t.up.load(std::sync::atomic::Ordering::Relaxed), t.down.load(std::sync::atomic::Ordering::Relaxed)));
        let seconds = started.elapsed().as_secs_f64();
        writeln!(metrics, "{},{},{},{},{seconds:.3},{up},{down}", log.step, log.loss, log.lr, log.tokens)?;
        metrics.flush()?;
        let line = format!("step {:>4}  loss {:.4}  lr {:.2e}  {:.0} tokens/s  {:.1} MB sent", log.step, log.loss, log.lr, log.tokens as f64 / seconds, up as f64 / 1e6);
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(&line);
        }
        bar.set_message(format!("loss {:.4}  {:.0} tokens/s  {:.1} MB sent", log.loss, log.tokens as f64 / seconds, up as f64 / 1e6));
        bar.inc(1);
        if args.checkpoint_every > 0 && (log.step % args.checkpoint_every == 0 || log.step == args.steps) {
            trainer.save_checkpoint(&checkpoint).context("writing a checkpoint")?;
        }
    }
    bar.finish_and_clear();
    let adapter = args.out.join("adapter");
    trainer.save_adapter(&adapter)?;
    let plot = args.out.join("loss.svg");
    plot_losses(&metrics_path, &plot).context("drawing loss.svg")?;
    println!("adapter saved to {} (PEFT layout), metrics in {}, plot in {}", adapter.display(), metrics_path.display(), plot.display());
    Ok(())
}

/// Loss per step from `metrics.csv`, drawn as an SVG line chart.
fn plot_losses(metrics: &std::path::Path, out: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let points: Vec<(f64, f64)> = std::fs::read_to_string(metrics)?
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect();
    let (lo, hi) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let root = SVGBackend::new(out, (720, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("training loss", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..points.len().max(1) as f64 + 1.0, lo - pad..hi + pad)?;
    chart.configure_mesh().x_desc("step").y_desc("loss").draw()?;
    chart.draw_series(LineSeries::new(points, &BLUE))?;
    root.present()?;
    Ok(())
}

