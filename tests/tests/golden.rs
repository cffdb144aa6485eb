//! Golden tests: whole GPT-2 exports compiled, written as artifacts, read back and run in
//! clear, against the stored onnxruntime/torch outputs and against tract-onnx.

use std::collections::HashMap;

use fhe_exec::artifact::{read_graphs, write_graphs};
use fhe_exec::tensor_io::read_safetensors;
use fhe_exec::Model;
use fhe_ir::{NodeBody, Tensor};
use fhe_tests::{max_abs_diff, registry, repo_path, Random, TractModel};

const TOLERANCE: f32 = 1e-4;

/// Imports, writes the graph as an artifact would, reads it back.
fn compiled(model: &str) -> (Model, Vec<u8>) {
    let bytes = std::fs::read(repo_path(model)).unwrap();
    let imported = fhe_onnx::import_bytes(&bytes, &registry()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut files = write_graphs(dir.path(), &[("model", &imported.graph)], "weights.safetensors").unwrap();
    let weights = files.pop().unwrap();
    let graph = read_graphs(dir.path(), &files, &weights, &registry()).unwrap().remove(0);
    (Model::new(graph), bytes)
}

fn reference(path: &str) -> HashMap<String, Tensor> {
    read_safetensors(&repo_path(path)).unwrap().into_iter().collect()
}

fn run(model: &Model, inputs: &[(&str, &Tensor)]) -> Tensor {
    let inputs = inputs.iter().map(|(n, t)| (n.to_string(), (*t).clone())).collect();
    model.run(inputs).unwrap().remove(0).1
}

#[test]
fn tiny_gpt2_matches_stored_onnxruntime_logits() {
    let (model, _) = compiled("models/gpt2-tiny/model.onnx");
    let io = reference("models/gpt2-tiny/reference_io.safetensors");
    let logits = run(&model, &[("input_ids", &io["input_ids"])]);
    let diff = max_abs_diff(&logits, &io["logits"]).unwrap();
    assert!(diff <= TOLERANCE, "max |Δlogit| = {diff}");
}

#[test]
fn tiny_gpt2_matches_tract_for_several_batches_and_lengths() {
    let (model, bytes) = compiled("models/gpt2-tiny/model.onnx");
    let mut r = Random::new(3);
    for (batch, seq) in [(1, 1), (1, 7), (2, 16), (2, 33), (1, 128)] {
        let ids = r.i64(&[batch, seq], 0, 50257);
        let ours = run(&model, &[("input_ids", &ids)]);
        let theirs = TractModel::new(&bytes, &[&ids]).unwrap().run(&[&ids]).unwrap().remove(0);
        let diff = max_abs_diff(&ours, &theirs).unwrap();
        assert!(diff <= TOLERANCE, "batch {batch}, seq {seq}: max |Δlogit| = {diff}");
    }
}

#[test]
fn opset14_export_with_attention_mask_matches_torch_and_tract() {
    let (model, bytes) = compiled("tools/fixtures/gpt2-opset14-mask/model.onnx");
    let io = reference("tools/fixtures/gpt2-opset14-mask/reference_io.safetensors");
    let logits = run(&model, &[("input_ids", &io["input_ids"]), ("attention_mask", &io["attention_mask"])]);
    let diff = max_abs_diff(&logits, &io["logits"]).unwrap();
    assert!(diff <= TOLERANCE, "vs torch: max |Δlogit| = {diff}");

    let mut r = Random::new(4);
    for (batch, seq) in [(1, 5), (3, 32)] {
        let ids = r.i64(&[batch, seq], 0, 300);
        let mask = r.i64(&[batch, seq], 0, 2);
        let ours = run(&model, &[("input_ids", &ids), ("attention_mask", &mask)]);
        let theirs = TractModel::new(&bytes, &[&ids, &mask]).unwrap().run(&[&ids, &mask]).unwrap().remove(0);
        let diff = max_abs_diff(&ours, &theirs).unwrap();
        assert!(diff <= TOLERANCE, "batch {batch}, seq {seq}: max |Δlogit| = {diff}");
    }
}

#[test]
fn specialization_folds_the_shape_subgraphs() {
    let (model, _) = compiled("models/gpt2-tiny/model.onnx");
    let shapes = HashMap::from([("input_ids".to_string(), vec![2, 16])]);
    let spec = fhe_ir::specialize(model.graph(), &shapes).unwrap();
    let shape_ops = ["Shape", "Range", "ConstantOfShape", "Concat", "Squeeze", "Unsqueeze"];
    let left: Vec<String> = spec
        .graph
        .node_ids()
        .filter_map(|id| {
            let node = spec.graph.node(id);
            matches!(&node.body, NodeBody::Op(op) if shape_ops.contains(&op.kind())).then(|| node.name.clone())
        })
        .collect();
    assert!(left.is_empty(), "shape ops left after specialization: {left:?}");
    assert!(spec.graph.node_count() < model.graph().node_count() / 2, "{} of {} nodes left", spec.graph.node_count(), model.graph().node_count());
}

#[test]
fn a_sequence_longer_than_the_context_is_an_error() {
    let (model, _) = compiled("models/gpt2-tiny/model.onnx");
    let ids = Random::new(5).i64(&[1, 129], 0, 50257);
    let err = model.run(HashMap::from([("input_ids".to_string(), ids)])).err().expect("129 tokens exceed n_positions = 128");
    let message = format!("{:#}", anyhow::Error::from(err));
    assert!(message.contains("out of range for axis 0 of size 128"), "{message}");
}
