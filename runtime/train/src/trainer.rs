//! The training loop on the client: the compiled training graph gives loss and LoRA
//! gradients (the frozen layers go through whatever linear backend is given); AdamW with
//! decoupled weight decay updates the adapters; the learning rate warms up linearly, then
//! decays linearly to zero; gradients can be accumulated over several micro-batches.

use std::collections::HashMap;
use std::path::Path;

use fhe_exec::artifact::{ClientArtifact, LoraManifest};
use fhe_exec::tensor_io::{read_safetensors, write_safetensors};
use serde::{Deserialize, Serialize};
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

/// Where a run stands, beside the tensors of a checkpoint.
#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
    seed: u64,
    batch: usize,
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

    /// The compiled training graph being run (for profiling).
    pub fn model(&self) -> &Model {
        &self.model
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

    /// Saves everything needed to continue: adapter, AdamW moments, step, data order and
    /// position. Written beside and swapped in by renames, so a crash leaves either the old
    /// or the new checkpoint, never half of one.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<(), ExecError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |error| ExecError::Io { path, error }
        };
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let mut tensors: Vec<(String, Tensor)> = self.adapter.clone();
        for ((key, t), m) in self.adapter.iter().zip(&self.moments) {
            tensors.push((format!("adam_m:{key}"), Tensor::from_f32(t.shape(), m.m.clone())?));
            tensors.push((format!("adam_v:{key}"), Tensor::from_f32(t.shape(), m.v.clone())?));
        }
        let named: Vec<(String, &Tensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
        write_safetensors(&tmp.join("state.safetensors"), &named)?;
        let state = CheckpointState { step: self.step, epoch: self.epoch, cursor: self.cursor, order: self.order.clone(), seed: self.config.seed, batch: self.config.batch };
        let path = tmp.join("state.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&state).expect("plain data")).map_err(io(&path))?;
        let old = dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(io(dir))?;
        }
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Continues from a checkpoint written by [`Trainer::save_checkpoint`] for the same data
    /// and settings.
    pub fn resume(&mut self, dir: &Path) -> Result<(), ExecError> {
        let bad = |what: String| ExecError::Artifact { dir: dir.display().to_string(), what };
        let path = dir.join("state.json");
        let bytes = std::fs::read(&path).map_err(|e| bad(format!("cannot read state.json ({e}); nothing to resume")))?;
        let state: CheckpointState = serde_json::from_slice(&bytes).map_err(|e| bad(format!("state.json is malformed ({e})")))?;
        if state.seed != self.config.seed || state.batch != self.config.batch || state.order.len() != self.order.len() {
            return Err(bad(format!(
                "the checkpoint was made with --seed {}, --batch {} and {} blocks; this run has {}, {} and {}: resume with the same data and options",
                state.seed, state.batch, state.order.len(), self.config.seed, self.config.batch, self.order.len()
            )));
        }
        let tensors: HashMap<String, Tensor> = read_safetensors(&dir.join("state.safetensors"))?.into_iter().collect();
        for ((key, param), moments) in self.adapter.iter_mut().zip(&mut self.moments) {
            let get = |name: String| tensors.get(&name).cloned().ok_or_else(|| bad(format!("`{name}` is missing")));
            *param = get(key.clone())?;
            moments.m = get(format!("adam_m:{key}"))?.to_f32_vec()?;
            moments.v = get(format!("adam_v:{key}"))?.to_f32_vec()?;
        }
        (self.step, self.epoch, self.cursor, self.order) = (state.step, state.epoch, state.cursor, state.order);
        Ok(())
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
