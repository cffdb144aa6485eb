//! The training loop on the client: the compiled training graph gives loss and LoRA
//! gradients (the frozen layers go through whatever linear backend is given); AdamW with
//! decoupled weight decay updates the adapters; the learning rate warms up linearly, then
//! decays linearly to zero; gradients can be accumulated over several micro-batches.

use std::collections::HashMap;
use std::path::Path;

use fhe_exec::artifact::{ClientArtifact, LoraManifest};
use fhe_exec::tensor_io::write_safetensors;
use fhe_exec::{ExecError, LinearBackend, Model};
use fhe_ir::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data::Block;

#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch: usize,
    pub grad_accum: usize,
    pub lr: f32,
    pub warmup: usize,
    pub weight_decay: f32,
    pub seed: u64,
}

/// AdamW moments of one tensor.
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;

/// One step's record.
#[derive(Clone, Debug, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub loss: f32,
    pub lr: f32,
    pub tokens: usize,
}

pub struct Trainer {
    model: Model,
    lora_manifest: LoraManifest,
    /// Adapter tensors by PEFT key, in a fixed order.
    pub adapter: Vec<(String, Tensor)>,
    moments: Vec<Moments>,
    config: TrainConfig,
    step: usize,
    /// Shuffled block order and the position in it.
    order: Vec<usize>,
    cursor: usize,
    epoch: u64,
}

impl Trainer {
    pub fn new(client: &ClientArtifact, config: TrainConfig, blocks: usize) -> Trainer {
        let mut adapter: Vec<(String, Tensor)> = client.lora_init.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        adapter.sort_by(|a, b| a.0.cmp(&b.0));
        let moments = adapter.iter().map(|(_, t)| Moments { m: vec![0.0; t.len()], v: vec![0.0; t.len()] }).collect();
        let mut trainer = Trainer {
            model: Model::new(client.train.clone()),
            lora_manifest: client.lora.clone(),
            adapter,
            moments,
            config,
            step: 0,
            order: (0..blocks).collect(),
            cursor: 0,
            epoch: 0,
        };
        trainer.shuffle();
        trainer
    }

    fn shuffle(&mut self) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.config.seed ^ self.epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.order.sort_unstable();
        self.order.shuffle(&mut rng);
    }

    /// The next `batch` block indices, reshuffling at each epoch's end.
    fn next_batch(&mut self) -> Vec<usize> {
        (0..self.config.batch)
            .map(|_| {
                if self.cursor == self.order.len() {
                    self.epoch += 1;
                    self.cursor = 0;
                    self.shuffle();
                }
                self.cursor += 1;
                self.order[self.cursor - 1]
            })
            .collect()
    }

    /// Linear warm-up to `lr`, then linear decay to zero at the last step.
    pub fn learning_rate(&self, step: usize) -> f32 {
        let c = &self.config;
        if step < c.warmup {
            c.lr * (step + 1) as f32 / c.warmup as f32
        } else {
            let remaining = c.steps.saturating_sub(step) as f32;
            let span = c.steps.saturating_sub(c.warmup).max(1) as f32;
            c.lr * remaining / span
        }
    }

    pub fn step(&self) -> usize {
        self.step
    }

    /// One optimizer step over `grad_accum` micro-batches of `batch` blocks each.
    pub fn train_step(&mut self, blocks: &[Block], backend: &dyn LinearBackend) -> Result<StepLog, ExecError> {
        let mut grads: Vec<Vec<f32>> = self.adapter.iter().map(|(_, t)| vec![0.0; t.len()]).collect();
        let mut loss = 0.0;
        let mut tokens = 0;
        for _ in 0..self.config.grad_accum {
            let batch = self.next_batch();
            let seq = blocks[batch[0]].ids.len();
            let ids: Vec<i64> = batch.iter().flat_map(|&b| blocks[b].ids.clone()).collect();
            let labels: Vec<i64> = batch.iter().flat_map(|&b| blocks[b].labels.clone()).collect();
            tokens += ids.len();
            let mut inputs: HashMap<String, Tensor> = self.adapter.iter().cloned().collect();
            inputs.insert("input_ids".into(), Tensor::from_i64(&[batch.len(), seq], ids)?);
            inputs.insert("labels".into(), Tensor::from_i64(&[batch.len(), seq], labels)?);
            let outputs: HashMap<String, Tensor> = self.model.run_with(inputs, Some(backend))?.into_iter().collect();
            loss += outputs["loss"].to_f32_vec()?[0] / self.config.grad_accum as f32;
            for ((key, _), g) in self.adapter.iter().zip(&mut grads) {
                for (acc, v) in g.iter_mut().zip(outputs[&format!("grad:{key}")].to_f32_vec()?) {
                    *acc += v / self.config.grad_accum as f32;
                }
            }
        }
        let lr = self.learning_rate(self.step);
        self.step += 1;
        let t = self.step as i32;
        let (bias1, bias2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        for (((_, param), moments), grad) in self.adapter.iter_mut().zip(&mut self.moments).zip(&grads) {
            let mut values = param.to_f32_vec()?;
            for (i, w) in values.iter_mut().enumerate() {
                let g = grad[i];
                moments.m[i] = BETA1 * moments.m[i] + (1.0 - BETA1) * g;
                moments.v[i] = BETA2 * moments.v[i] + (1.0 - BETA2) * g * g;
                let update = (moments.m[i] / bias1) / ((moments.v[i] / bias2).sqrt() + EPS);
                *w -= lr * (update + self.config.weight_decay * *w);
            }
            *param = Tensor::from_f32(param.shape(), values)?;
        }
        Ok(StepLog { step: self.step, loss, lr, tokens })
    }

    /// Writes the adapter in PEFT's layout: `adapter_model.safetensors` (PEFT key names) and
    /// `adapter_config.json`.
    pub fn save_adapter(&self, dir: &Path) -> Result<(), ExecError> {
        std::fs::create_dir_all(dir).map_err(|error| ExecError::Io { path: dir.display().to_string(), error })?;
        let named: Vec<(String, &Tensor)> = self.adapter.iter().map(|(k, t)| (k.clone(), t)).collect();
        write_safetensors(&dir.join("adapter_model.safetensors"), &named)?;
        let l = &self.lora_manifest;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "gpt2",
            "r": l.rank,
            "lora_alpha": l.alpha,
            "lora_dropout": 0.0,
            "target_modules": l.target_modules,
            "fan_in_fan_out": true,
            "bias": "none",
            "inference_mode": true,
        });
        let path = dir.join("adapter_config.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("plain data")).map_err(|error| ExecError::Io { path: path.display().to_string(), error })
    }
}
