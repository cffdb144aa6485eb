//! The same seeded fine-tuning run in clear f32, in the 8-bit simulation and with real
//! encryption (in-process server, real wire format): the encrypted loss falls, follows the
//! simulation step by step, and keeps ≥ 90% of the clear run's progress. The adapter is saved
//! in PEFT's layout.

use std::path::Path;
use std::sync::Arc;

use fhe_backend_clear::{F32Backend, Int8Backend};
use fhe_backend_rlwe::{ClientKey, FheBackend, LinearServer, LocalTransport, Setting};
use fhe_compile::{compile, CompileOptions};
use fhe_exec::artifact::{ClientArtifact, ServerArtifact};
use fhe_exec::tensor_io::read_safetensors;
use fhe_exec::LinearBackend;
use fhe_passes::{LoraConfig, LoraTargets};
use fhe_tests::{registry, repo_path};
use fhe_train::data::{load_examples, Encoder};
use fhe_train::trainer::{TrainConfig, Trainer};

fn config() -> TrainConfig {
    TrainConfig { steps: 12, batch: 4, grad_accum: 1, lr: 1e-2, warmup: 2, weight_decay: 0.0, seed: 7 }
}

fn losses(client: &ClientArtifact, backend: &dyn LinearBackend, out: Option<&Path>) -> Vec<f32> {
    let examples = load_examples(&repo_path("data_finetune/private_ml_qa.txt")).unwrap();
    let blocks = Encoder::load(&repo_path("models/gpt2-tiny/tokenizer.json")).unwrap().blocks(&examples, 32, 128).unwrap();
    let mut trainer = Trainer::new(client, config(), blocks.len());
    let losses = (0..config().steps).map(|_| trainer.train_step(&blocks, backend).unwrap().loss).collect();
    if let Some(dir) = out {
        trainer.save_adapter(dir).unwrap();
    }
    losses
}

#[test]
fn encrypted_training_follows_the_simulation_and_keeps_the_clear_progress() {
    let dir = tempfile::tempdir().unwrap();
    let lora = LoraConfig { rank: 8, alpha: 32.0, targets: LoraTargets::Modules(vec!["c_attn".into()]), seed: 0 };
    compile(&CompileOptions { model: repo_path("models/gpt2-tiny/model.onnx"), output: dir.path().to_path_buf(), lora, tokenizer: None }, &registry()).unwrap();
    let client = ClientArtifact::load(dir.path(), &registry()).unwrap();
    let server = ServerArtifact::load(dir.path()).unwrap();

    let clear = losses(&client, &F32Backend::new(&server), None);
    let simulated = losses(&client, &Int8Backend::new(&server), None);
    let transport = Arc::new(LocalTransport(Arc::new(LinearServer::new(&server))));
    let fhe = FheBackend::new(Arc::new(ClientKey::generate()), Setting::Compact, &client, transport);
    let adapter_dir = dir.path().join("adapter");
    let encrypted = losses(&client, &fhe, Some(&adapter_dir));
    println!("clear     {clear:?}\nsimulated {simulated:?}\nencrypted {encrypted:?}");

    let drop = |l: &[f32]| l[0] - l[l.len() - 1];
    assert!(drop(&encrypted) > 0.0, "encrypted loss did not fall: {encrypted:?}");
    for (step, (e, s)) in encrypted.iter().zip(&simulated).enumerate() {
        assert!((e - s).abs() <= 1e-3, "step {step}: encrypted {e} vs simulated {s}");
    }
    assert!(drop(&encrypted) >= 0.9 * drop(&clear), "encrypted drop {} vs clear drop {}", drop(&encrypted), drop(&clear));
    assert!(fhe.traffic.up.load(std::sync::atomic::Ordering::Relaxed) > 0);

    // PEFT layout: key names and shapes PEFT expects for GPT-2 (Conv1D, fan_in_fan_out).
    let tensors = read_safetensors(&adapter_dir.join("adapter_model.safetensors")).unwrap();
    let names: Vec<(String, Vec<usize>)> = tensors.iter().map(|(k, t)| (k.clone(), t.shape().to_vec())).collect();
    assert_eq!(
        names,
        vec![
            ("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight".to_string(), vec![8, 64]),
            ("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight".to_string(), vec![192, 8]),
            ("base_model.model.transformer.h.1.attn.c_attn.lora_A.weight".to_string(), vec![8, 64]),
            ("base_model.model.transformer.h.1.attn.c_attn.lora_B.weight".to_string(), vec![192, 8]),
        ]
    );
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(adapter_dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some("LORA"), Some(8), Some(32.0)));
    assert_eq!(config["target_modules"], serde_json::json!(["c_attn"]));
}
