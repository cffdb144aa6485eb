//! fhe-compile as a library: the compile pipeline and the `--check-io` check, shared by
//! the `fhe-compile` binary and the tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fhe_backend_clear::{F32Backend, Int8Backend};
use fhe_exec::artifact::{
    sha256_hex, write_artifact, ClientArtifact, ClientPartData, LayerEntry, LoraManifest, ServerArtifact, ServerLayerData, SourceInfo,
};
use fhe_exec::tensor_io::read_safetensors;
use fhe_exec::{LinearBackend, Model};
use fhe_ir::{Registry, Tensor};
use fhe_passes::{LoraConfig, SplitReport};

/// What to compile and how.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub model: PathBuf,
    pub output: PathBuf,
    pub lora: LoraConfig,
    /// The tokenizer to ship in the client part [default: `tokenizer.json` beside the model,
    /// if there is one].
    pub tokenizer: Option<PathBuf>,
}

/// What compiling produced, for the report.
#[derive(Debug)]
pub struct Compiled {
    pub opset: i64,
    pub server_layers: usize,
    pub adapters: usize,
    pub tied_head: bool,
    pub forward_nodes: usize,
    pub train_nodes: usize,
    pub report: SplitReport,
}

/// Every plugin this build has.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    fhe_ops_std::register_all(&mut registry);
    fhe_ops_linear::register_all(&mut registry);
    registry
}

/// `<model dir>/<model name>.fhe`.
pub fn default_output(model: &Path) -> PathBuf {
    let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    model.with_file_name(format!("{stem}.fhe"))
}

fn tokenizer_bytes(options: &CompileOptions) -> Result<Option<Vec<u8>>> {
    let beside = options.model.with_file_name("tokenizer.json");
    match &options.tokenizer {
        Some(path) => Ok(Some(std::fs::read(path).with_context(|| format!("reading --tokenizer {}", path.display()))?)),
        None if beside.is_file() => Ok(Some(std::fs::read(&beside).with_context(|| format!("reading {}", beside.display()))?)),
        None => Ok(None),
    }
}

/// Imports, transforms and writes the artifact for `options`.
pub fn compile(options: &CompileOptions, registry: &Registry) -> Result<Compiled> {
    let output = &options.output;
    let bytes = std::fs::read(&options.model).with_context(|| format!("reading model `{}`", options.model.display()))?;
    let imported = fhe_onnx::import_bytes(&bytes, registry).with_context(|| format!("importing `{}`", options.model.display()))?;
    let mut graph = imported.graph;
    fhe_ir::specialize(&graph, &fhe_passes::smallest_shapes(&graph))
        .with_context(|| format!("checking `{}` (every dynamic dimension set to 1)", options.model.display()))?;

    fhe_passes::fuse_gelu(&mut graph).context("fusing GELU")?;
    let lora = &options.lora;
    let layers = fhe_passes::discover_linear_layers(&mut graph).context("finding the linear layers")?;
    let adapters = fhe_passes::insert_lora(&mut graph, &layers, lora).context("inserting LoRA")?;
    let report = fhe_passes::split_report(&graph, &layers, &adapters);
    let trainable: Vec<String> = adapters.iter().flat_map(|a| [a.a_key.clone(), a.b_key.clone()]).collect();
    let train = fhe_passes::build_training_graph(&graph, "input_ids", &trainable).context("building the backward graph")?;
    let server_layers: Vec<_> = layers.iter().filter(|l| l.info.on_server).collect();
    let infos: Vec<_> = server_layers.iter().map(|l| l.info.clone()).collect();
    let mut forward = graph;
    let mut train = train;
    fhe_passes::partition(&mut forward, &infos).context("partitioning the forward graph")?;
    fhe_passes::partition(&mut train, &infos).context("partitioning the training graph")?;

    let quantized = server_layers.iter().map(|l| fhe_passes::quantize_weight(&l.weight)).collect::<Result<Vec<_>, _>>()?;
    let table: Vec<LayerEntry> = infos
        .iter()
        .map(|l| LayerEntry {
            id: l.id,
            name: l.name.clone(),
            in_features: l.in_features,
            out_features: l.out_features,
        })
        .collect();
    let client = ClientPartData {
        forward: &forward,
        train: &train,
        lora: LoraManifest {
            rank: lora.rank,
            alpha: lora.alpha,
            target_modules: lora.targets.peft_modules(),
            seed: lora.seed,
            adapters: adapters.iter().map(|a| (a.layer.clone(), a.a_key.clone(), a.b_key.clone())).collect(),
        },
        lora_init: adapters.iter().flat_map(|a| [(a.a_key.clone(), &a.a_init), (a.b_key.clone(), &a.b_init)]).collect(),
        weight_scales: infos.iter().zip(&quantized).map(|(l, q)| (l.id, q.scales.clone())).collect(),
        tokenizer: tokenizer_bytes(options)?,
    };
    let server: Vec<ServerLayerData> = server_layers
        .iter()
        .zip(&quantized)
        .map(|(l, q)| ServerLayerData { id: l.info.id, weight: &l.weight, qweight: &q.values, scales: &q.scales })
        .collect();
    let source = SourceInfo {
        file: options.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        sha256: sha256_hex(&bytes),
        opset: imported.opset,
        producer: imported.producer.clone(),
    };
    write_artifact(output, source, &table, client, &server).with_context(|| format!("writing artifact `{}`", output.display()))?;

    Ok(Compiled {
        opset: imported.opset,
        server_layers: infos.len(),
        adapters: adapters.len(),
        tied_head: layers.iter().any(|l| !l.info.on_server && l.node.is_none()),
        forward_nodes: forward.node_count(),
        train_nodes: train.node_count(),
        report,
    })
}

/// Max |Δ| and the smallest per-row cosine similarity of two equally shaped tensors.
fn compare(got: &Tensor, want: &Tensor) -> Result<(f32, f32)> {
    let (g, w) = (got.to_f32_vec()?, want.to_f32_vec()?);
    let row = *got.shape().last().unwrap_or(&1);
    let max = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let cosine = g
        .chunks(row.max(1))
        .zip(w.chunks(row.max(1)))
        .map(|(a, b)| {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            (dot / (na * nb).max(f64::MIN_POSITIVE)) as f32
        })
        .fold(1.0f32, f32::min);
    Ok((max, cosine))
}

/// Runs the compiled client graph on stored inputs and compares with stored outputs: with
/// the server layers in f32 (judged against `tolerance`) and in int8 (reported). Returns
/// whether the f32 run is within tolerance.
pub fn check_io(artifact: &Path, io: &Path, tolerance: f32, registry: &Registry) -> Result<bool> {
    let client = ClientArtifact::load(artifact, registry).context("loading the client part just written")?;
    let server = ServerArtifact::load(artifact).context("loading the server part just written")?;
    let stored: HashMap<String, Tensor> =
        read_safetensors(io).with_context(|| format!("reading --check-io file `{}`", io.display()))?.into_iter().collect();
    let names: Vec<&String> = stored.keys().collect();
    let mut inputs: HashMap<String, Tensor> = client.lora_init.clone();
    for &id in client.forward.inputs() {
        let name = &client.forward.node(id).name;
        if inputs.contains_key(name) {
            continue;
        }
        let value = stored.get(name).with_context(|| {
            format!("the --check-io file has no tensor named `{name}` (the model's input); it holds {names:?}")
        })?;
        inputs.insert(name.clone(), value.clone());
    }
    if let (Some(context), Some(ids)) = (client.context_length(), inputs.get("input_ids")) {
        let tokens = ids.shape().last().copied().unwrap_or(0);
        if tokens > context {
            bail!("input `input_ids` has sequences of {tokens} tokens, but this model's context (n_positions) is {context}; use at most {context} tokens");
        }
    }
    for output in client.forward.outputs() {
        if !stored.contains_key(&output.name) {
            bail!("the --check-io file has no tensor named `{}` (the model's output); it holds {names:?}", output.name);
        }
    }
    let shape = inputs.get("input_ids").map(|t| format!("{:?}", t.shape())).unwrap_or_default();
    let model = Model::new(client.forward);
    let backends: [(&str, Box<dyn LinearBackend>); 2] =
        [("server layers in f32", Box::new(F32Backend::new(&server))), ("server layers in int8 (simulated FHE)", Box::new(Int8Backend::new(&server)))];
    println!("check-io (input_ids {shape}):");
    let mut pass = true;
    for (i, (label, backend)) in backends.iter().enumerate() {
        let outputs = model.run_with(inputs.clone(), Some(backend.as_ref())).with_context(|| format!("running the compiled model ({label})"))?;
        for (name, got) in outputs {
            let want = &stored[&name];
            if got.shape() != want.shape() {
                bail!("output `{name}` has shape {:?}, the file stores {:?}", got.shape(), want.shape());
            }
            let (max, cosine) = compare(&got, want).with_context(|| format!("comparing output `{name}`"))?;
            // The f32 run must reproduce the model; the int8 run is reported, not judged.
            let verdict = if i > 0 { "for information".to_string() } else if max <= tolerance { "ok".into() } else { "ABOVE TOLERANCE".into() };
            pass &= i > 0 || max <= tolerance;
            println!("  {name}, {label}: max |Δ| = {max:.3e}, min cosine per token = {cosine:.5} ({verdict})");
        }
    }
    Ok(pass)
}

