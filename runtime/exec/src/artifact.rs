//! Compiled artifacts. A directory with a top-level manifest and two parts that can be
//! shipped apart; each side loads only its own part, and every load checks the format
//! version and every file's sha256 before using anything.
//!
//! ```text
//! DIR/manifest.json                  everything: versions, model hash, LoRA, quantization,
//!                                    parameter set, layer table, the parts' manifest hashes
//! DIR/client/part.json               part = client, its files and their hashes
//! DIR/client/forward.json            forward graph (logits), server layers as server calls
//! DIR/client/train.json              training graph (loss + LoRA gradients)
//! DIR/client/weights.safetensors     constants of both graphs (embeddings, norms, biases)
//! DIR/client/lora_init.safetensors   initial adapter, PEFT key names
//! DIR/client/weight_scales.safetensors  per-output-channel weight scales, to dequantize
//! DIR/server/part.json               part = server, layer table, its file and hash
//! DIR/server/weights.safetensors     per layer: f32 `weight`, int8 `qweight`, f32 `scale`
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fhe_ir::{Graph, InputSpec, LayerId, NodeBody, OutletId, Registry, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::tensor_io::{self, decode_safetensors, tensor_bytes};
use crate::ExecError;

pub const FORMAT: &str = "fhe-lora-artifact";
/// Bumped on every incompatible change of the files below.
pub const FORMAT_VERSION: u32 = 2;
/// The FHE parameter set the server layers are quantized for (see docs/CRYPTO.md).
pub const PARAMETER_SET: &str = "rlwe-tokenmajor-n2048-q64-int8";

const MANIFEST: &str = "manifest.json";
const PART: &str = "part.json";

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

/// One frozen linear layer of the layer table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerEntry {
    pub id: LayerId,
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
}

/// LoRA as the client trains it and PEFT stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraManifest {
    pub rank: usize,
    pub alpha: f32,
    pub target_modules: Vec<String>,
    pub seed: u64,
    /// (layer name, A key, B key) in graph order.
    pub adapters: Vec<(String, String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantManifest {
    pub weights: String,
    pub activations: String,
}

impl Default for QuantManifest {
    fn default() -> QuantManifest {
        QuantManifest {
            weights: "int8 symmetric, static, per output channel".into(),
            activations: "int8 symmetric, dynamic, per token (gradients scaled by the weight scales first)".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartKind {
    Client,
    Server,
}

impl PartKind {
    fn dir(self) -> &'static str {
        match self {
            PartKind::Client => "client",
            PartKind::Server => "server",
        }
    }
}

/// The manifest of one part: enough to check it and use it without the rest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartManifest {
    pub format: String,
    pub format_version: u32,
    pub part: PartKind,
    pub model_sha256: String,
    pub parameter_set: String,
    pub layers: Vec<LayerEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraManifest>,
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub source: SourceInfo,
    pub parameter_set: String,
    pub quantization: QuantManifest,
    pub lora: LoraManifest,
    pub layers: Vec<LayerEntry>,
    pub client: FileEntry,
    pub server: FileEntry,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn artifact_error(dir: &Path, what: impl Into<String>) -> ExecError {
    ExecError::Artifact { dir: dir.display().to_string(), what: what.into() }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExecError + '_ {
    move |error| ExecError::Io { path: path.display().to_string(), error }
}

/// Writes `bytes` under `dir/name` atomically (beside, then renamed) and returns its entry.
fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry, ExecError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(FileEntry { file: name.into(), sha256: sha256_hex(bytes) })
}

fn read_checked(dir: &Path, entry: &FileEntry) -> Result<Vec<u8>, ExecError> {
    let bytes = std::fs::read(dir.join(&entry.file)).map_err(|e| artifact_error(dir, format!("cannot read {} ({e})", entry.file)))?;
    if sha256_hex(&bytes) != entry.sha256 {
        return Err(artifact_error(
            dir,
            format!("{} does not match the manifest's hash: the artifact was modified or partly copied; re-run fhe-compile", entry.file),
        ));
    }
    Ok(bytes)
}

/// Reads a JSON manifest, checking the format name and version before its other fields.
fn read_versioned<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<(T, Vec<u8>), ExecError> {
    let bytes = std::fs::read(dir.join(name))
        .map_err(|e| artifact_error(dir, format!("cannot read {name} ({e}); is this a directory written by fhe-compile?")))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| artifact_error(dir, format!("{name} is not valid JSON ({e})")))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(artifact_error(dir, format!("{name} does not describe an fhe-lora artifact")));
    }
    let version = value.get("format_version").and_then(|v| v.as_u64());
    if version != Some(u64::from(FORMAT_VERSION)) {
        return Err(artifact_error(
            dir,
            format!(
                "artifact format version {} cannot be read by this build (it reads version {FORMAT_VERSION}); re-run fhe-compile with this build",
                version.map_or("missing".to_string(), |v| v.to_string())
            ),
        ));
    }
    let parsed = serde_json::from_value(value).map_err(|e| artifact_error(dir, format!("{name} is malformed ({e})")))?;
    Ok((parsed, bytes))
}

// ---- graphs ----------------------------------------------------------------------------

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

/// Writes graphs as `<name>.json` plus one weights file holding their constants; a constant
/// shared between graphs (same `Arc`) is stored once.
pub fn write_graphs(dir: &Path, graphs: &[(&str, &Graph)], weights_file: &str) -> Result<Vec<FileEntry>, ExecError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut keys: HashMap<*const Tensor, String> = HashMap::new();
    let mut used = HashSet::new();
    let mut weights: Vec<(String, Arc<Tensor>)> = Vec::new();
    let mut entries = Vec::new();
    for (name, graph) in graphs {
        let order = graph.topo_order()?;
        let index: HashMap<_, _> = order.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut nodes = Vec::with_capacity(order.len());
        for id in &order {
            let node = graph.node(*id);
            let body = match &node.body {
                NodeBody::Input(spec) => BodyEntry::Input { spec: spec.clone() },
                NodeBody::Const(value) => {
                    let key = keys.entry(Arc::as_ptr(value)).or_insert_with(|| {
                        let mut key = node.name.clone();
                        let mut n = 1;
                        while !used.insert(key.clone()) {
                            key = format!("{}#{n}", node.name);
                            n += 1;
                        }
                        weights.push((key.clone(), value.clone()));
                        key
                    });
                    BodyEntry::Const { tensor: key.clone() }
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
        let bytes = serde_json::to_vec(&GraphFile { nodes, outputs }).expect("graph entries are plain data");
        entries.push(write_file(dir, &format!("{name}.json"), &bytes)?);
    }
    let named: Vec<(String, &Tensor)> = weights.iter().map(|(k, t)| (k.clone(), t.as_ref())).collect();
    entries.push(write_file(dir, weights_file, &encode_tensors(&named)?)?);
    Ok(entries)
}

/// Reads graphs written by [`write_graphs`]; `weights` is the shared weights file.
pub fn read_graphs(dir: &Path, graphs: &[FileEntry], weights: &FileEntry, registry: &Registry) -> Result<Vec<Graph>, ExecError> {
    let weight_bytes = read_checked(dir, weights)?;
    let tensors: HashMap<String, Arc<Tensor>> = decode_safetensors(&weight_bytes)
        .map_err(|e| artifact_error(dir, format!("{}: {e}", weights.file)))?
        .into_iter()
        .map(|(k, t)| (k, Arc::new(t)))
        .collect();
    graphs.iter().map(|entry| read_graph(dir, entry, &tensors, registry)).collect()
}

fn read_graph(dir: &Path, entry: &FileEntry, weights: &HashMap<String, Arc<Tensor>>, registry: &Registry) -> Result<Graph, ExecError> {
    let bytes = read_checked(dir, entry)?;
    let file: GraphFile = serde_json::from_slice(&bytes).map_err(|e| artifact_error(dir, format!("{} is malformed ({e})", entry.file)))?;
    let mut graph = Graph::new();
    let mut ids = Vec::with_capacity(file.nodes.len());
    for node in file.nodes {
        let inputs = node
            .inputs
            .iter()
            .map(|&(n, slot)| ids.get(n).map(|&id| OutletId::new(id, slot)).ok_or_else(|| artifact_error(dir, format!("{} refers to a later node", entry.file))))
            .collect::<Result<Vec<_>, _>>()?;
        let id = match node.body {
            BodyEntry::Input { spec } => graph.add_input(node.name, spec).node,
            BodyEntry::Const { tensor } => {
                let value = weights.get(&tensor).ok_or_else(|| artifact_error(dir, format!("weight `{tensor}` is missing")))?;
                graph.add_const(node.name, value.clone()).node
            }
            BodyEntry::Op { kind, params } => graph.add_op(node.name, registry.decode_op(&kind, params)?, &inputs, node.outputs)?,
        };
        ids.push(id);
    }
    for (name, node, slot) in file.outputs {
        let id = *ids.get(node).ok_or_else(|| artifact_error(dir, format!("{} names a missing output node", entry.file)))?;
        graph.add_output(name, OutletId::new(id, slot))?;
    }
    graph.verify()?;
    Ok(graph)
}

fn encode_tensors(tensors: &[(String, &Tensor)]) -> Result<Vec<u8>, ExecError> {
    tensor_io::encode_tensors(tensors).map_err(|what| ExecError::Safetensors { path: "(in memory)".into(), what })
}

fn encode_raw(raw: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> Result<Vec<u8>, ExecError> {
    tensor_io::encode_raw(raw).map_err(|what| ExecError::Safetensors { path: "(in memory)".into(), what })
}

// ---- parts -----------------------------------------------------------------------------

/// Everything the client part holds.
pub struct ClientPartData<'a> {
    pub forward: &'a Graph,
    pub train: &'a Graph,
    pub lora: LoraManifest,
    pub lora_init: Vec<(String, &'a Tensor)>,
    /// Per server layer, the per-output-channel scales of its int8 weight.
    pub weight_scales: Vec<(LayerId, Vec<f32>)>,
    /// The tokenizer (`tokenizer.json` bytes), when one was found for the model.
    pub tokenizer: Option<Vec<u8>>,
}

/// One server layer's weights.
pub struct ServerLayerData<'a> {
    pub id: LayerId,
    pub weight: &'a Tensor,
    pub qweight: &'a [i8],
    pub scales: &'a [f32],
}

fn scale_key(id: LayerId) -> String {
    format!("layer{}.scale", id.0)
}

fn part_manifest(part: PartKind, model_sha256: &str, layers: &[LayerEntry], lora: Option<LoraManifest>, files: Vec<FileEntry>) -> PartManifest {
    PartManifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        part,
        model_sha256: model_sha256.into(),
        parameter_set: PARAMETER_SET.into(),
        layers: layers.to_vec(),
        lora,
        files: files.into_iter().map(|f| (f.file.trim_end_matches(".json").trim_end_matches(".safetensors").to_string(), f)).collect(),
    }
}

/// Writes the whole artifact: both parts, then the top-level manifest (last, so a directory
/// without one is recognisably incomplete).
pub fn write_artifact(
    dir: &Path,
    source: SourceInfo,
    layers: &[LayerEntry],
    client: ClientPartData,
    server: &[ServerLayerData],
) -> Result<Manifest, ExecError> {
    let client_dir = dir.join(PartKind::Client.dir());
    let mut files = write_graphs(&client_dir, &[("forward", client.forward), ("train", client.train)], "weights.safetensors")?;
    files.push(write_file(&client_dir, "lora_init.safetensors", &encode_tensors(&client.lora_init)?)?);
    let scales: Vec<(String, Tensor)> = client
        .weight_scales
        .iter()
        .map(|(id, s)| Ok((scale_key(*id), Tensor::from_f32(&[s.len()], s.clone())?)))
        .collect::<Result<_, fhe_ir::IrError>>()?;
    let scale_refs: Vec<(String, &Tensor)> = scales.iter().map(|(k, t)| (k.clone(), t)).collect();
    files.push(write_file(&client_dir, "weight_scales.safetensors", &encode_tensors(&scale_refs)?)?);
    if let Some(tokenizer) = &client.tokenizer {
        files.push(write_file(&client_dir, "tokenizer.json", tokenizer)?);
    }
    let client_part = part_manifest(PartKind::Client, &source.sha256, layers, Some(client.lora.clone()), files);
    let client_entry = write_file(&client_dir, PART, &serde_json::to_vec_pretty(&client_part).expect("plain data"))?;

    let server_dir = dir.join(PartKind::Server.dir());
    std::fs::create_dir_all(&server_dir).map_err(io(&server_dir))?;
    let mut raw = Vec::new();
    for layer in server {
        let [rows, cols] = layer.weight.shape() else {
            return Err(ExecError::Backend(format!("{} weight is not a matrix", layer.id)));
        };
        let prefix = format!("layer{}", layer.id.0);
        let (dtype, bytes) = tensor_bytes(layer.weight);
        raw.push((format!("{prefix}.weight"), dtype, vec![*rows, *cols], bytes));
        raw.push((format!("{prefix}.qweight"), Dtype::I8, vec![*rows, *cols], layer.qweight.iter().map(|&v| v as u8).collect()));
        raw.push((scale_key(layer.id), Dtype::F32, vec![*cols], layer.scales.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let server_files = vec![write_file(&server_dir, "weights.safetensors", &encode_raw(&raw)?)?];
    let server_part = part_manifest(PartKind::Server, &source.sha256, layers, None, server_files);
    let server_entry = write_file(&server_dir, PART, &serde_json::to_vec_pretty(&server_part).expect("plain data"))?;

    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        source,
        parameter_set: PARAMETER_SET.into(),
        quantization: QuantManifest::default(),
        lora: client.lora,
        layers: layers.to_vec(),
        client: FileEntry { file: format!("client/{PART}"), sha256: client_entry.sha256 },
        server: FileEntry { file: format!("server/{PART}"), sha256: server_entry.sha256 },
    };
    write_file(dir, MANIFEST, &serde_json::to_vec_pretty(&manifest).expect("plain data"))?;
    Ok(manifest)
}

/// Reads and checks the top-level manifest and both part manifests' hashes.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ExecError> {
    let (manifest, _): (Manifest, _) = read_versioned(dir, MANIFEST)?;
    read_checked(dir, &manifest.client)?;
    read_checked(dir, &manifest.server)?;
    Ok(manifest)
}

/// Finds a part given the artifact directory or the part's own directory, and refuses the
/// other part with a message saying what to pass instead.
fn locate_part(path: &Path, want: PartKind) -> Result<(PathBuf, PartManifest), ExecError> {
    let dir = if path.join(PART).is_file() { path.to_path_buf() } else { path.join(want.dir()) };
    if !dir.join(PART).is_file() {
        return Err(artifact_error(
            path,
            format!("no {} part here: pass the directory written by fhe-compile or its {}/ folder", want.dir(), want.dir()),
        ));
    }
    let (part, _): (PartManifest, _) = read_versioned(&dir, PART)?;
    if part.part != want {
        return Err(artifact_error(
            &dir,
            format!("this is the {} part of an artifact, but the {} part is needed here: pass the artifact directory or its {}/ folder", part.part.dir(), want.dir(), want.dir()),
        ));
    }
    Ok((dir, part))
}

fn file<'a>(dir: &Path, part: &'a PartManifest, key: &str) -> Result<&'a FileEntry, ExecError> {
    part.files.get(key).ok_or_else(|| artifact_error(dir, format!("{PART} lists no `{key}` file")))
}

/// The client's part: graphs, its constants, the initial adapter, the weight scales.
#[derive(Debug)]
pub struct ClientArtifact {
    pub dir: PathBuf,
    pub manifest: PartManifest,
    pub lora: LoraManifest,
    pub forward: Graph,
    pub train: Graph,
    pub lora_init: HashMap<String, Tensor>,
    pub weight_scales: HashMap<LayerId, Vec<f32>>,
    /// Path of the checked tokenizer file, if the artifact has one.
    pub tokenizer: Option<PathBuf>,
}

impl ClientArtifact {
    /// GPT-2's context length (n_positions): rows of the position-embedding table, when the
    /// forward graph has one.
    pub fn context_length(&self) -> Option<usize> {
        let graph = &self.forward;
        graph.node_ids().find_map(|id| match &graph.node(id).body {
            NodeBody::Const(t) if graph.node(id).name.ends_with("wpe.weight") => t.shape().first().copied(),
            _ => None,
        })
    }

    pub fn load(path: &Path, registry: &Registry) -> Result<ClientArtifact, ExecError> {
        let (dir, manifest) = locate_part(path, PartKind::Client)?;
        let graphs = [file(&dir, &manifest, "forward")?.clone(), file(&dir, &manifest, "train")?.clone()];
        let [forward, train]: [Graph; 2] = read_graphs(&dir, &graphs, file(&dir, &manifest, "weights")?, registry)?
            .try_into()
            .expect("two graphs were asked for");
        let lora_init = decode_safetensors(&read_checked(&dir, file(&dir, &manifest, "lora_init")?)?)
            .map_err(|e| artifact_error(&dir, format!("lora_init.safetensors: {e}")))?
            .into_iter()
            .collect();
        let scales: HashMap<String, Tensor> = decode_safetensors(&read_checked(&dir, file(&dir, &manifest, "weight_scales")?)?)
            .map_err(|e| artifact_error(&dir, format!("weight_scales.safetensors: {e}")))?
            .into_iter()
            .collect();
        let weight_scales = manifest
            .layers
            .iter()
            .filter_map(|l| scales.get(&scale_key(l.id)).map(|t| Ok((l.id, t.to_f32_vec()?))))
            .collect::<Result<_, fhe_ir::IrError>>()?;
        let lora = manifest.lora.clone().ok_or_else(|| artifact_error(&dir, "the client part has no LoRA description"))?;
        let tokenizer = match manifest.files.get("tokenizer") {
            Some(entry) => {
                read_checked(&dir, entry)?;
                Some(dir.join(&entry.file))
            }
            None => None,
        };
        Ok(ClientArtifact { dir, manifest, lora, forward, train, lora_init, weight_scales, tokenizer })
    }
}

/// One layer as the server holds it.
#[derive(Debug)]
pub struct ServerLayer {
    pub entry: LayerEntry,
    /// `[in, out]`, row-major.
    pub weight: Vec<f32>,
    pub qweight: Vec<i8>,
    pub scales: Vec<f32>,
}

/// The server's part: the layer table and each layer's weights. Holds nothing the client owns.
#[derive(Debug)]
pub struct ServerArtifact {
    pub dir: PathBuf,
    pub manifest: PartManifest,
    pub layers: HashMap<LayerId, ServerLayer>,
}

impl ServerArtifact {
    pub fn load(path: &Path) -> Result<ServerArtifact, ExecError> {
        let (dir, manifest) = locate_part(path, PartKind::Server)?;
        let bytes = read_checked(&dir, file(&dir, &manifest, "weights")?)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| artifact_error(&dir, format!("weights.safetensors: {e}")))?;
        let get = |key: String, dtype: Dtype, len: usize| -> Result<Vec<u8>, ExecError> {
            let view = st.tensor(&key).map_err(|_| artifact_error(&dir, format!("weights.safetensors has no `{key}`")))?;
            if view.dtype() != dtype || view.data().len() != len * dtype.bitsize() / 8 {
                return Err(artifact_error(&dir, format!("`{key}` has the wrong type or size")));
            }
            Ok(view.data().to_vec())
        };
        let floats = |b: Vec<u8>| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<f32>>();
        let mut layers = HashMap::new();
        for entry in &manifest.layers {
            let n = entry.in_features * entry.out_features;
            let prefix = format!("layer{}", entry.id.0);
            let layer = ServerLayer {
                entry: entry.clone(),
                weight: floats(get(format!("{prefix}.weight"), Dtype::F32, n)?),
                qweight: get(format!("{prefix}.qweight"), Dtype::I8, n)?.into_iter().map(|b| b as i8).collect(),
                scales: floats(get(scale_key(entry.id), Dtype::F32, entry.out_features)?),
            };
            layers.insert(entry.id, layer);
        }
        Ok(ServerArtifact { dir, manifest, layers })
    }
}
