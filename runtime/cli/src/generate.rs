//! `fhe-run client generate`: text generation through the same path as training (frozen
//! layers on the server, encrypted), with or without a trained adapter.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use fhe_exec::artifact::ClientArtifact;
use fhe_exec::tensor_io::read_safetensors;
use fhe_exec::Model;
use fhe_ir::Tensor;
use fhe_train::data::Encoder;
use rand::{Rng, SeedableRng};

use crate::train::{make_backend, registry, BackendArgs};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// Directory of a trained adapter (`adapter_model.safetensors`); without it, the base model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    /// 0 picks the most likely token every time.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens (with --temperature above 0).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Client secret key file [default: a key in the system's temporary directory].
    #[arg(long)]
    key: Option<PathBuf>,
}

/// The adapter values to feed: the trained ones, checked against the artifact, or the initial ones.
fn adapter(client: &ClientArtifact, dir: Option<&PathBuf>) -> Result<HashMap<String, Tensor>> {
    let Some(dir) = dir else { return Ok(client.lora_init.clone()) };
    let path = dir.join("adapter_model.safetensors");
    let trained: HashMap<String, Tensor> = read_safetensors(&path).with_context(|| format!("reading the adapter {}", path.display()))?.into_iter().collect();
    client
        .lora_init
        .iter()
        .map(|(key, init)| match trained.get(key) {
            Some(t) if t.shape() == init.shape() => Ok((key.clone(), t.clone())),
            Some(t) => bail!("adapter tensor `{key}` has shape {:?}, this artifact needs {:?}", t.shape(), init.shape()),
            None => bail!("the adapter has no `{key}`; was it trained on this artifact?"),
        })
        .collect()
}

/// Picks the next token from the last position's logits.
fn pick(logits: &[f32], temperature: f32, top_k: usize, rng: &mut rand::rngs::StdRng) -> usize {
    let best = || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    if temperature <= 0.0 {
        return best();
    }
    let mut ranked: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked.truncate(top_k.max(1));
    let top = ranked[0].1;
    let weights: Vec<f64> = ranked.iter().map(|(_, v)| (((v - top) / temperature) as f64).exp()).collect();
    let mut x = rng.random::<f64>() * weights.iter().sum::<f64>();
    for ((i, _), w) in ranked.iter().zip(&weights) {
        x -= w;
        if x <= 0.0 {
            return *i;
        }
    }
    ranked[0].0
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let client = ClientArtifact::load(&args.backend.artifact, &registry()).context("loading the client part")?;
    let tokenizer = client.tokenizer.clone().context("the artifact has no tokenizer; re-run fhe-compile with --tokenizer FILE")?;
    let encoder = Encoder::load(&tokenizer)?;
    let key_path = args.key.clone().unwrap_or_else(|| std::env::temp_dir().join("fhe-lora-generate.key"));
    let (backend, _) = make_backend(&args.backend, &client, &key_path)?;
    let lora = adapter(&client, args.adapter.as_ref())?;
    let model = Model::new(client.forward.clone());
    let context = client.context_length().unwrap_or(usize::MAX);
    let mut ids = encoder.encode(&args.prompt);
    if ids.is_empty() {
        bail!("--prompt is empty");
    }
    let prompt_len = ids.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    for _ in 0..args.max_new_tokens {
        let window = &ids[ids.len().saturating_sub(context)..];
        let mut inputs = lora.clone();
        inputs.insert("input_ids".into(), Tensor::from_i64(&[1, window.len()], window.to_vec())?);
        let logits = model.run_with(inputs, Some(backend.as_ref())).context("running the model")?.remove(0).1;
        let vocab = *logits.shape().last().expect("logits have a vocabulary axis");
        let all = logits.to_f32_vec()?;
        let next = pick(&all[all.len() - vocab..], args.temperature, args.top_k, &mut rng) as i64;
        if next == encoder.eos() {
            break;
        }
        ids.push(next);
    }
    println!("{}{}", args.prompt, encoder.decode(&ids[prompt_len..]));
    Ok(())
}
