//! The FHE backend against the clear-integer backend on the compiled tiny GPT-2: in the exact
//! setting every layer output, the logits, the loss and the LoRA gradients are identical.

use std::collections::HashMap;
use std::sync::Arc;

use fhe_backend_clear::Int8Backend;
use fhe_backend_rlwe::{ClientKey, FheBackend, LinearServer, LocalTransport, Setting};
use fhe_compile::{compile, CompileOptions};
use fhe_exec::artifact::{ClientArtifact, ServerArtifact};
use fhe_exec::{LinearBackend, Model};
use fhe_ir::{Direction, LinearCall, Stage, Tensor};
use fhe_passes::{LoraConfig, LoraTargets, LABELS};
use fhe_tests::{registry, repo_path, Random};

struct Setup {
    _dir: tempfile::TempDir,
    client: ClientArtifact,
    fhe: FheBackend,
    int8: Int8Backend,
}

fn setup(setting: Setting) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let lora = LoraConfig { rank: 4, alpha: 32.0, targets: LoraTargets::AllLinear, seed: 0 };
    let options = CompileOptions { model: repo_path("models/gpt2-tiny/model.onnx"), output: dir.path().to_path_buf(), lora, tokenizer: None };
    compile(&options, &registry()).unwrap();
    let client = ClientArtifact::load(dir.path(), &registry()).unwrap();
    let server = ServerArtifact::load(dir.path()).unwrap();
    let transport = Arc::new(LocalTransport(Arc::new(LinearServer::new(&server))));
    let fhe = FheBackend::new(Arc::new(ClientKey::from_seed(21)), setting, &client, transport);
    Setup { _dir: dir, client, fhe, int8: Int8Backend::new(&server) }
}

fn call(backend: &dyn LinearBackend, call: LinearCall, x: &Tensor) -> Tensor {
    let sealed = backend.seal(LinearCall { stage: Stage::Seal, ..call }, x).unwrap();
    let applied = backend.apply(LinearCall { stage: Stage::Apply, ..call }, sealed).unwrap();
    backend.open(LinearCall { stage: Stage::Open, ..call }, applied).unwrap()
}

#[test]
fn every_layer_output_is_identical_in_the_exact_setting() {
    let s = setup(Setting::Exact);
    let mut r = Random::new(1);
    for layer in &s.client.manifest.layers {
        for direction in [Direction::Forward, Direction::Backward] {
            let width = if direction == Direction::Forward { layer.in_features } else { layer.out_features };
            for tokens in [1, 37, 2100] {
                let x = r.f32(&[tokens, width], -3.0, 3.0);
                let c = LinearCall { layer: layer.id, direction, stage: Stage::Seal };
                let (fhe, int8) = (call(&s.fhe, c, &x), call(&s.int8, c, &x));
                assert_eq!(fhe, int8, "{} {direction}, {tokens} tokens", layer.name);
            }
        }
    }
}

#[test]
fn a_whole_training_step_is_identical_in_the_exact_setting() {
    let s = setup(Setting::Exact);
    let mut r = Random::new(2);
    let mut inputs: HashMap<String, Tensor> =
        s.client.lora_init.iter().map(|(k, t)| (k.clone(), if k.contains("lora_B") { r.f32(t.shape(), -0.1, 0.1) } else { t.clone() })).collect();
    inputs.insert("input_ids".into(), r.i64(&[2, 16], 0, 50257));
    inputs.insert(LABELS.into(), r.i64(&[2, 16], 0, 50257));
    let model = Model::new(s.client.train.clone());
    let fhe = model.run_with(inputs.clone(), Some(&s.fhe)).unwrap();
    let int8 = model.run_with(inputs, Some(&s.int8)).unwrap();
    assert_eq!(fhe.len(), 1 + 2 * 8);
    assert_eq!(fhe, int8);
    let up = s.fhe.traffic.up.load(std::sync::atomic::Ordering::Relaxed);
    assert!(up > 0, "the FHE run sent nothing");
}

#[test]
fn the_compact_setting_stays_close_to_the_exact_logits() {
    let s = setup(Setting::Compact);
    let mut inputs = s.client.lora_init.clone();
    inputs.insert("input_ids".into(), Random::new(3).i64(&[1, 24], 0, 50257));
    let model = Model::new(s.client.forward.clone());
    let compact = model.run_with(inputs.clone(), Some(&s.fhe)).unwrap().remove(0).1;
    let exact = model.run_with(inputs, Some(&s.int8)).unwrap().remove(0).1;
    let diff = fhe_tests::max_abs_diff(&compact, &exact).unwrap();
    assert!(diff < 1e-2, "compact vs exact logits: max |Δ| = {diff}");
}
