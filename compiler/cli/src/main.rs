//! `fhe-compile`: compiles a GPT-2 ONNX export into an fhe-lora artifact directory, and
//! optionally checks the compiled model against stored reference inputs and outputs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use fhe_exec::artifact::{read_artifact, sha256_hex, write_artifact, SourceInfo};
use fhe_exec::tensor_io::read_safetensors;
use fhe_exec::Model;
use fhe_ir::{Dim, Graph, NodeBody, Registry, Tensor};

#[derive(Parser, Debug)]
#[command(name = "fhe-compile", version, about = "Compile a GPT-2 ONNX export into an fhe-lora artifact directory.")]
struct Args {
    /// The ONNX model (a Hugging Face GPT2LMHeadModel export, opset 14 to 17).
    model: PathBuf,

    /// Output directory [default: next to the model, `<model name>.fhe`].
    #[arg(short, long)]
    output: Option<PathBuf>,

    /// After compiling, run the compiled model in clear on the inputs stored in this
    /// safetensors file (tensors named after the graph inputs) and compare with its stored
    /// outputs (named after the graph outputs).
    #[arg(long, value_name = "IO.safetensors")]
    check_io: Option<PathBuf>,

    /// Largest accepted max |difference| per output for `--check-io`.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f32,
}

fn registry() -> Registry {
    let mut registry = Registry::new();
    fhe_ops_std::register_all(&mut registry);
    registry
}

fn default_output(model: &Path) -> PathBuf {
    let stem = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    model.with_file_name(format!("{stem}.fhe"))
}

/// Shapes with every dynamic dimension set to 1: enough to prove every op has a shape rule.
fn smallest_shapes(graph: &Graph) -> HashMap<String, Vec<usize>> {
    graph
        .inputs()
        .iter()
        .filter_map(|&id| {
            let spec = graph.input_spec(id)?;
            let dims = spec.dims.iter().map(|d| if let Dim::Fixed(n) = d { *n } else { 1 }).collect();
            Some((graph.node(id).name.clone(), dims))
        })
        .collect()
}

/// GPT-2's context length, read from the position-embedding table, when the graph has one.
fn context_length(graph: &Graph) -> Option<usize> {
    graph.node_ids().find_map(|id| {
        let node = graph.node(id);
        match &node.body {
            NodeBody::Const(t) if node.name.ends_with("wpe.weight") => t.shape().first().copied(),
            _ => None,
        }
    })
}

fn print_summary(graph: &Graph) {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut parameters = 0usize;
    for id in graph.node_ids() {
        let node = graph.node(id);
        match &node.body {
            NodeBody::Const(t) if t.dtype() == fhe_ir::DType::F32 && t.len() > 1 => parameters += t.len(),
            NodeBody::Op(op) => *kinds.entry(op.kind()).or_default() += 1,
            _ => {}
        }
    }
    let ops: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}×{n}")).collect();
    println!("  {} nodes, {parameters} weights; ops: {}", graph.node_count(), ops.join(" "));
    for &id in graph.inputs() {
        println!("  input  {}: {}", graph.node(id).name, graph.input_spec(id).expect("an input"));
    }
    for output in graph.outputs() {
        println!("  output {}", output.name);
    }
}

fn check_io(artifact: &Path, io: &Path, tolerance: f32, registry: &Registry) -> Result<bool> {
    let (graph, _) = read_artifact(artifact, registry).context("reloading the artifact just written")?;
    let stored: HashMap<String, Tensor> =
        read_safetensors(io).with_context(|| format!("reading --check-io file `{}`", io.display()))?.into_iter().collect();
    let names: Vec<&String> = stored.keys().collect();
    let mut inputs = HashMap::new();
    for &id in graph.inputs() {
        let name = &graph.node(id).name;
        let value = stored.get(name).with_context(|| {
            format!("the --check-io file has no tensor named `{name}` (the model's input); it holds {names:?}")
        })?;
        inputs.insert(name.clone(), value.clone());
    }
    if let (Some(context), Some(ids)) = (context_length(&graph), inputs.get("input_ids")) {
        let tokens = ids.shape().last().copied().unwrap_or(0);
        if tokens > context {
            bail!("input `input_ids` has sequences of {tokens} tokens, but this model's context (n_positions) is {context}; use at most {context} tokens");
        }
    }
    for output in graph.outputs() {
        if !stored.contains_key(&output.name) {
            bail!("the --check-io file has no tensor named `{}` (the model's output); it holds {names:?}", output.name);
        }
    }
    let shapes: Vec<String> = inputs.iter().map(|(n, t)| format!("{n} {:?}", t.shape())).collect();
    let model = Model::new(graph);
    let outputs = model.run(inputs).context("running the compiled model")?;
    println!("check-io ({}):", shapes.join(", "));
    let mut pass = true;
    for (name, got) in outputs {
        let want = &stored[&name];
        if got.shape() != want.shape() {
            bail!("output `{name}` has shape {:?}, the file stores {:?}", got.shape(), want.shape());
        }
        let (got, want) = (got.to_f32_vec()?, want.to_f32_vec().with_context(|| format!("stored output `{name}`"))?);
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let ok = max <= tolerance;
        pass &= ok;
        println!("  {name}: max |Δ| = {max:.3e} ({})", if ok { "ok" } else { "ABOVE TOLERANCE" });
    }
    Ok(pass)
}

fn run(args: Args) -> Result<bool> {
    let registry = registry();
    let bytes = std::fs::read(&args.model).with_context(|| format!("reading model `{}`", args.model.display()))?;
    let imported = fhe_onnx::import_bytes(&bytes, &registry).with_context(|| format!("importing `{}`", args.model.display()))?;
    fhe_ir::specialize(&imported.graph, &smallest_shapes(&imported.graph))
        .with_context(|| format!("checking `{}` (every dynamic dimension set to 1)", args.model.display()))?;
    let output = args.output.clone().unwrap_or_else(|| default_output(&args.model));
    let source = SourceInfo {
        file: args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        sha256: sha256_hex(&bytes),
        opset: imported.opset,
        producer: imported.producer.clone(),
    };
    write_artifact(&output, &imported.graph, source).with_context(|| format!("writing artifact `{}`", output.display()))?;
    println!("compiled {} (opset {}) → {}", args.model.display(), imported.opset, output.display());
    print_summary(&imported.graph);
    match &args.check_io {
        Some(io) => check_io(&output, io, args.tolerance, &registry),
        None => Ok(true),
    }
}

fn main() -> ExitCode {
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
