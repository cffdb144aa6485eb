//! The compiled-model artifact: a directory with a versioned manifest, the graph and its
//! weights. Loading checks the format and the files' hashes before anything else.
//!
//! ```text
//! DIR/manifest.json          format, version, source model hash, file hashes
//! DIR/graph.json             nodes in topological order: kind, parameters, operands
//! DIR/weights.safetensors    every constant of the graph, keyed by its node's name
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fhe_ir::{Graph, InputSpec, NodeBody, OutletId, Registry, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::tensor_io::{decode_safetensors, write_safetensors};
use crate::ExecError;

pub const FORMAT: &str = "fhe-lora-artifact";
/// Bumped on every incompatible change of the files below.
pub const FORMAT_VERSION: u32 = 1;
const GRAPH_FILE: &str = "graph.json";
const WEIGHTS_FILE: &str = "weights.safetensors";
const MANIFEST_FILE: &str = "manifest.json";

/// Where the model came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub file: String,
    pub sha256: String,
    pub opset: i64,
    pub producer: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub source: SourceInfo,
    pub graph: FileEntry,
    pub weights: FileEntry,
}

#[derive(Serialize, Deserialize)]
struct GraphFile {
    nodes: Vec<NodeEntry>,
    outputs: Vec<(String, usize, usize)>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "body", rename_all = "snake_case")]
enum BodyEntry {
    Input { spec: InputSpec },
    Const { tensor: String },
    Op { kind: String, params: serde_json::Value },
}

#[derive(Serialize, Deserialize)]
struct NodeEntry {
    name: String,
    #[serde(flatten)]
    body: BodyEntry,
    /// (node index in this file, output slot).
    inputs: Vec<(usize, usize)>,
    outputs: usize,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn artifact_error(dir: &Path, what: impl Into<String>) -> ExecError {
    ExecError::Artifact { dir: dir.display().to_string(), what: what.into() }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ExecError> {
    // Written beside and renamed, so a crash never leaves a half-written file under the real name.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|error| ExecError::Io { path: path.display().to_string(), error })
}

/// Writes `graph` as an artifact into `dir` (created if needed). The manifest is written
/// last, so a directory without one is recognisably incomplete.
pub fn write_artifact(dir: &Path, graph: &Graph, source: SourceInfo) -> Result<Manifest, ExecError> {
    std::fs::create_dir_all(dir).map_err(|error| ExecError::Io { path: dir.display().to_string(), error })?;
    let order = graph.topo_order()?;
    let index: HashMap<_, _> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut weights: Vec<(String, &Tensor)> = Vec::new();
    let mut used_names = HashSet::new();
    let mut nodes = Vec::with_capacity(order.len());
    for id in &order {
        let node = graph.node(*id);
        let body = match &node.body {
            NodeBody::Input(spec) => BodyEntry::Input { spec: spec.clone() },
            NodeBody::Const(value) => {
                let mut key = node.name.clone();
                let mut n = 1;
                while !used_names.insert(key.clone()) {
                    key = format!("{}#{n}", node.name);
                    n += 1;
                }
                weights.push((key.clone(), value.as_ref()));
                BodyEntry::Const { tensor: key }
            }
            NodeBody::Op(op) => BodyEntry::Op { kind: op.kind().to_string(), params: op.params() },
        };
        nodes.push(NodeEntry {
            name: node.name.clone(),
            body,
            inputs: node.inputs.iter().map(|i| (index[&i.node], i.slot)).collect(),
            outputs: node.n_outputs,
        });
    }
    let outputs = graph.outputs().iter().map(|o| (o.name.clone(), index[&o.outlet.node], o.outlet.slot)).collect();
    let graph_bytes = serde_json::to_vec(&GraphFile { nodes, outputs }).expect("graph entries are plain data");
    write_file(&dir.join(GRAPH_FILE), &graph_bytes)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    write_safetensors(&weights_path.with_extension("tmp"), &weights)?;
    std::fs::rename(weights_path.with_extension("tmp"), &weights_path)
        .map_err(|error| ExecError::Io { path: weights_path.display().to_string(), error })?;
    let weights_bytes = std::fs::read(&weights_path).map_err(|error| ExecError::Io { path: weights_path.display().to_string(), error })?;
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        source,
        graph: FileEntry { file: GRAPH_FILE.into(), sha256: sha256_hex(&graph_bytes) },
        weights: FileEntry { file: WEIGHTS_FILE.into(), sha256: sha256_hex(&weights_bytes) },
    };
    write_file(&dir.join(MANIFEST_FILE), &serde_json::to_vec_pretty(&manifest).expect("plain data"))?;
    Ok(manifest)
}

/// Reads and checks the manifest only.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ExecError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).map_err(|e| {
        artifact_error(dir, format!("cannot read {MANIFEST_FILE} ({e}); is this a directory written by fhe-compile?"))
    })?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| artifact_error(dir, format!("{MANIFEST_FILE} is not valid JSON ({e})")))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(artifact_error(dir, format!("{MANIFEST_FILE} does not describe an fhe-lora artifact")));
    }
    let version = value.get("format_version").and_then(|v| v.as_u64());
    if version != Some(FORMAT_VERSION as u64) {
        return Err(artifact_error(
            dir,
            format!(
                "artifact format version {} cannot be read by this build (it reads version {FORMAT_VERSION}); re-run fhe-compile with this build",
                version.map_or("missing".to_string(), |v| v.to_string())
            ),
        ));
    }
    serde_json::from_value(value).map_err(|e| artifact_error(dir, format!("{MANIFEST_FILE} is malformed ({e})")))
}

fn read_checked(dir: &Path, entry: &FileEntry) -> Result<Vec<u8>, ExecError> {
    let path: PathBuf = dir.join(&entry.file);
    let bytes = std::fs::read(&path).map_err(|e| artifact_error(dir, format!("cannot read {} ({e})", entry.file)))?;
    if sha256_hex(&bytes) != entry.sha256 {
        return Err(artifact_error(
            dir,
            format!("{} does not match the manifest's hash: the artifact was modified or partly copied; re-run fhe-compile", entry.file),
        ));
    }
    Ok(bytes)
}

/// Loads an artifact, checking format version and file hashes first.
pub fn read_artifact(dir: &Path, registry: &Registry) -> Result<(Graph, Manifest), ExecError> {
    let manifest = read_manifest(dir)?;
    let graph_bytes = read_checked(dir, &manifest.graph)?;
    let weights_bytes = read_checked(dir, &manifest.weights)?;
    let file: GraphFile = serde_json::from_slice(&graph_bytes)
        .map_err(|e| artifact_error(dir, format!("{} is malformed ({e})", manifest.graph.file)))?;
    let mut weights: HashMap<String, Tensor> = decode_safetensors(&weights_bytes)
        .map_err(|e| artifact_error(dir, format!("{}: {e}", manifest.weights.file)))?
        .into_iter()
        .collect();

    let mut graph = Graph::new();
    let mut ids = Vec::with_capacity(file.nodes.len());
    for entry in file.nodes {
        let inputs = entry
            .inputs
            .iter()
            .map(|&(node, slot)| {
                ids.get(node).map(|&id| OutletId::new(id, slot)).ok_or_else(|| artifact_error(dir, "graph.json refers to a later node"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let id = match entry.body {
            BodyEntry::Input { spec } => graph.add_input(entry.name, spec).node,
            BodyEntry::Const { tensor } => {
                let value = weights
                    .remove(&tensor)
                    .ok_or_else(|| artifact_error(dir, format!("weight `{tensor}` is missing from {}", manifest.weights.file)))?;
                graph.add_const(entry.name, Arc::new(value)).node
            }
            BodyEntry::Op { kind, params } => {
                let op = registry.decode_op(&kind, params)?;
                graph.add_op(entry.name, op, &inputs, entry.outputs)?
            }
        };
        ids.push(id);
    }
    for (name, node, slot) in file.outputs {
        let id = *ids.get(node).ok_or_else(|| artifact_error(dir, "graph.json names a missing output node"))?;
        graph.add_output(name, OutletId::new(id, slot))?;
    }
    graph.verify()?;
    Ok((graph, manifest))
}
