//! Artifacts round-trip, and every way of loading a wrong one fails with a clear message.
//! The executor rejects inputs that do not fit the model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fhe_exec::artifact::{read_artifact, write_artifact, SourceInfo};
use fhe_exec::{ExecError, Model};
use fhe_ir::{Dim, DType, Graph, InputSpec, Registry, Tensor};
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
    let xw = g.add_op("xw", Arc::new(MatMul), &[x, w], 1).unwrap();
    let y = g.add_op("y", Arc::new(Binary { f: BinaryFn::Add }), &[fhe_ir::OutletId::new(xw, 0), b], 1).unwrap();
    g.add_output("y", fhe_ir::OutletId::new(y, 0)).unwrap();
    g
}

fn source() -> SourceInfo {
    SourceInfo { file: "small.onnx".into(), sha256: "00".into(), opset: 17, producer: "test".into() }
}

fn x(batch: usize) -> Tensor {
    Tensor::from_f32(&[batch, 4], (0..batch * 4).map(|v| v as f32).collect()).unwrap()
}

fn run(model: &Model, inputs: Vec<(&str, Tensor)>) -> Result<Tensor, ExecError> {
    Ok(model.run(inputs.into_iter().map(|(n, t)| (n.to_string(), t)).collect())?.remove(0).1)
}

fn load_error(dir: &Path) -> String {
    read_artifact(dir, &registry()).err().expect("loading must fail").to_string()
}

#[test]
fn an_artifact_round_trips_and_computes_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let graph = small_graph();
    let written = write_artifact(dir.path(), &graph, source()).unwrap();
    let (loaded, manifest) = read_artifact(dir.path(), &registry()).unwrap();
    assert_eq!(manifest, written);
    let direct = run(&Model::new(graph), vec![("x", x(2))]).unwrap();
    let reloaded = run(&Model::new(loaded), vec![("x", x(2))]).unwrap();
    assert_eq!(direct, reloaded);
    // Row 0 = [0,1,2,3]·W + b
    assert_eq!(direct.to_f32_vec().unwrap()[..3], [22.0, 23.0, 27.5]);
}

#[test]
fn a_newer_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_artifact(dir.path(), &small_graph(), source()).unwrap();
    let path = dir.path().join("manifest.json");
    let manifest = std::fs::read_to_string(&path).unwrap().replace("\"format_version\": 1", "\"format_version\": 99");
    std::fs::write(&path, manifest).unwrap();
    let message = load_error(dir.path());
    assert!(message.contains("format version 99") && message.contains("re-run fhe-compile"), "{message}");
}

#[test]
fn files_that_do_not_match_the_manifest_are_refused() {
    for file in ["weights.safetensors", "graph.json"] {
        let dir = tempfile::tempdir().unwrap();
        write_artifact(dir.path(), &small_graph(), source()).unwrap();
        let path = dir.path().join(file);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let message = load_error(dir.path());
        assert!(message.contains(file) && message.contains("does not match the manifest"), "{message}");
    }
}

#[test]
fn a_directory_that_is_not_an_artifact_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(load_error(dir.path()).contains("cannot read manifest.json"));
    std::fs::write(dir.path().join("manifest.json"), "{\"format\": \"something-else\"}").unwrap();
    assert!(load_error(dir.path()).contains("does not describe an fhe-lora artifact"));
    std::fs::write(dir.path().join("manifest.json"), "not json").unwrap();
    assert!(load_error(dir.path()).contains("not valid JSON"));
}

#[test]
fn an_op_kind_unknown_to_this_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_artifact(dir.path(), &small_graph(), source()).unwrap();
    let message = read_artifact(dir.path(), &Registry::new()).err().unwrap().to_string();
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
        let message = format!("{:#}", anyhow_chain(run(&model, inputs).err().expect("must fail")));
        assert!(message.contains(expected), "`{expected}` not in `{message}`");
    }
    assert!(run(&model, vec![("x", x(3))]).is_ok());
}

/// The whole cause chain of an error, as the binaries print it.
fn anyhow_chain(e: ExecError) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[test]
fn plans_are_made_once_per_shape() {
    let model = Model::new(small_graph());
    let a = model.plan(&HashMap::from([("x".to_string(), vec![2, 4])])).unwrap();
    let b = model.plan(&HashMap::from([("x".to_string(), vec![2, 4])])).unwrap();
    let c = model.plan(&HashMap::from([("x".to_string(), vec![3, 4])])).unwrap();
    assert!(Arc::ptr_eq(&a, &b) && !Arc::ptr_eq(&a, &c));
}
