//! Artifacts round-trip, each part loads alone, and every way of loading a wrong one fails
//! with a clear message. The executor rejects inputs that do not fit the model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fhe_exec::artifact::{
    read_graphs, read_manifest, write_artifact, write_graphs, ClientArtifact, ClientPartData, LayerEntry, LoraManifest, ServerArtifact,
    ServerLayerData, SourceInfo,
};
use fhe_exec::{ExecError, Model};
use fhe_ir::{DType, Dim, Graph, InputSpec, LayerId, OutletId, Registry, Tensor};
use fhe_ops_std::{Binary, BinaryFn, MatMul};

fn registry() -> Registry {
    let mut r = Registry::new();
    fhe_ops_std::register_all(&mut r);
    r
}

/// y = x·W + b, x of shape [batch, 4].
fn small_graph() -> Graph {
    let mut g = Graph::new();
    let x = g.add_input("x", InputSpec { dtype: DType::F32, dims: vec![Dim::Dynamic("batch".into()), Dim::Fixed(4)] });
    let w = g.add_const("w", Arc::new(Tensor::from_f32(&[4, 3], (0..12).map(|v| v as f32 * 0.5).collect()).unwrap()));
    let b = g.add_const("b", Arc::new(Tensor::from_f32(&[3], vec![1.0, -1.0, 0.5]).unwrap()));
    let xw = g.add_op("xw", Arc::new(MatMul::default()), &[x, w], 1).unwrap();
    let y = g.add_op("y", Arc::new(Binary { f: BinaryFn::Add }), &[OutletId::new(xw, 0), b], 1).unwrap();
    g.add_output("y", OutletId::new(y, 0)).unwrap();
    g
}

fn x(batch: usize) -> Tensor {
    Tensor::from_f32(&[batch, 4], (0..batch * 4).map(|v| v as f32).collect()).unwrap()
}

fn run(model: &Model, inputs: Vec<(&str, Tensor)>) -> Result<Tensor, ExecError> {
    Ok(model.run(inputs.into_iter().map(|(n, t)| (n.to_string(), t)).collect())?.remove(0).1)
}

/// A complete artifact around the small graph, with one 4×3 server layer.
fn write_small_artifact(dir: &Path) {
    let graph = small_graph();
    let weight = Tensor::from_f32(&[4, 3], vec![0.5; 12]).unwrap();
    let layers = [LayerEntry { id: LayerId(0), name: "transformer.h.0.attn.c_attn".into(), in_features: 4, out_features: 3 }];
    let a = Tensor::from_f32(&[2, 4], vec![0.1; 8]).unwrap();
    let lora = LoraManifest { rank: 2, alpha: 4.0, target_modules: vec!["c_attn".into()], seed: 0, adapters: vec![] };
    let client = ClientPartData {
        forward: &graph,
        train: &graph,
        lora,
        lora_init: vec![("a".into(), &a)],
        weight_scales: vec![(LayerId(0), vec![0.5 / 127.0; 3])],
        tokenizer: None,
    };
    let server = [ServerLayerData { id: LayerId(0), weight: &weight, qweight: &[127; 12], scales: &[0.5 / 127.0; 3] }];
    let source = SourceInfo { file: "small.onnx".into(), sha256: "00".into(), opset: 17, producer: "test".into() };
    write_artifact(dir, source, &layers, client, &server).unwrap();
}

fn client_error(path: &Path) -> String {
    ClientArtifact::load(path, &registry()).err().expect("loading must fail").to_string()
}

fn server_error(path: &Path) -> String {
    ServerArtifact::load(path).err().expect("loading must fail").to_string()
}

#[test]
fn graphs_round_trip_and_compute_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let graph = small_graph();
    let mut files = write_graphs(dir.path(), &[("g", &graph)], "w.safetensors").unwrap();
    let weights = files.pop().unwrap();
    let loaded = read_graphs(dir.path(), &files, &weights, &registry()).unwrap().remove(0);
    let direct = run(&Model::new(graph), vec![("x", x(2))]).unwrap();
    let reloaded = run(&Model::new(loaded), vec![("x", x(2))]).unwrap();
    assert_eq!(direct, reloaded);
    // Row 0 = [0,1,2,3]·W + b
    assert_eq!(direct.to_f32_vec().unwrap()[..3], [22.0, 23.0, 27.5]);
}

#[test]
fn each_part_loads_alone_from_the_artifact_or_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    write_small_artifact(dir.path());
    let manifest = read_manifest(dir.path()).unwrap();
    assert_eq!(manifest.layers.len(), 1);
    for path in [dir.path().to_path_buf(), dir.path().join("client")] {
        let client = ClientArtifact::load(&path, &registry()).unwrap();
        assert_eq!(client.weight_scales[&LayerId(0)], vec![0.5 / 127.0; 3]);
        assert_eq!(client.lora_init["a"].shape(), [2, 4]);
    }
    // The server part alone, copied elsewhere, is enough for the server.
    let shipped = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(dir.path().join("server")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), shipped.path().join(f.file_name())).unwrap();
    }
    let server = ServerArtifact::load(shipped.path()).unwrap();
    let layer = &server.layers[&LayerId(0)];
    assert_eq!((layer.weight.len(), layer.qweight[0], layer.scales.len()), (12, 127, 3));
}

#[test]
fn the_server_part_holds_nothing_the_client_owns() {
    let dir = tempfile::tempdir().unwrap();
    write_small_artifact(dir.path());
    let names: Vec<String> = std::fs::read_dir(dir.path().join("server")).unwrap().map(|f| f.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, ["part.json", "weights.safetensors"]);
    let part: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("server/part.json")).unwrap()).unwrap();
    let mut keys: Vec<&str> = part.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["files", "format", "format_version", "layers", "model_sha256", "parameter_set", "part"]);
    let files: Vec<&str> = part["files"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(files, ["weights"]);
}

#[test]
fn one_part_given_for_the_other_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_small_artifact(dir.path());
    let message = server_error(&dir.path().join("client"));
    assert!(message.contains("this is the client part") && message.contains("server part is needed"), "{message}");
    let message = client_error(&dir.path().join("server"));
    assert!(message.contains("this is the server part") && message.contains("client part is needed"), "{message}");
}

#[test]
fn a_newer_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_small_artifact(dir.path());
    for part in ["client", "server"] {
        let path = dir.path().join(part).join("part.json");
        let text = std::fs::read_to_string(&path).unwrap().replace("\"format_version\": 2", "\"format_version\": 99");
        std::fs::write(&path, text).unwrap();
    }
    for message in [client_error(dir.path()), server_error(dir.path())] {
        assert!(message.contains("format version 99") && message.contains("re-run fhe-compile"), "{message}");
    }
    // The top-level manifest no longer matches the parts it lists.
    let message = read_manifest(dir.path()).unwrap_err().to_string();
    assert!(message.contains("does not match the manifest's hash"), "{message}");
}

#[test]
fn files_that_do_not_match_their_manifest_are_refused() {
    for file in ["client/weights.safetensors", "client/forward.json", "client/lora_init.safetensors", "server/weights.safetensors"] {
        let dir = tempfile::tempdir().unwrap();
        write_small_artifact(dir.path());
        let path = dir.path().join(file);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let message = if file.starts_with("client") { client_error(dir.path()) } else { server_error(dir.path()) };
        let name = file.split('/').nth(1).unwrap();
        assert!(message.contains(name) && message.contains("does not match the manifest"), "{message}");
    }
}

#[test]
fn a_directory_that_is_not_an_artifact_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(client_error(dir.path()).contains("no client part here"));
    std::fs::write(dir.path().join("part.json"), "{\"format\": \"something-else\"}").unwrap();
    assert!(server_error(dir.path()).contains("does not describe an fhe-lora artifact"));
    std::fs::write(dir.path().join("part.json"), "not json").unwrap();
    assert!(server_error(dir.path()).contains("not valid JSON"));
}

#[test]
fn an_op_kind_unknown_to_this_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_small_artifact(dir.path());
    let message = ClientArtifact::load(dir.path(), &Registry::new()).err().unwrap().to_string();
    assert!(message.contains("op kind `MatMul` is not registered"), "{message}");
}

#[test]
fn inputs_that_do_not_fit_are_rejected() {
    let model = Model::new(small_graph());
    let cases: Vec<(Vec<(&str, Tensor)>, &str)> = vec![
        (vec![], "no shape given for this input"),
        (vec![("x", x(1)), ("z", x(1))], "the graph has no such input"),
        (vec![("x", Tensor::from_f32(&[2, 5], vec![0.0; 10]).unwrap())], "does not match the declared f32[batch, 4]"),
        (vec![("x", Tensor::from_i64(&[2, 4], vec![0; 8]).unwrap())], "is i64[2, 4], the model expects f32[2, 4]"),
    ];
    for (inputs, expected) in cases {
        let message = run(&model, inputs).err().expect("must fail").to_string();
        assert!(message.contains(expected), "`{expected}` not in `{message}`");
    }
    assert!(run(&model, vec![("x", x(3))]).is_ok());
}

#[test]
fn plans_are_made_once_per_shape() {
    let model = Model::new(small_graph());
    let a = model.plan(&HashMap::from([("x".to_string(), vec![2, 4])])).unwrap();
    let b = model.plan(&HashMap::from([("x".to_string(), vec![2, 4])])).unwrap();
    let c = model.plan(&HashMap::from([("x".to_string(), vec![3, 4])])).unwrap();
    assert!(Arc::ptr_eq(&a, &b) && !Arc::ptr_eq(&a, &c));
}
