//! LoRA insertion: `y = x·W + b + (alpha/r)·(x·Aᵀ)·Bᵀ` on the target layers, with `A`
//! and `B` as graph inputs named by their PEFT keys, so the runtime feeds the current
//! adapter each step and the trained adapter saves under the names PEFT loads.

use std::sync::Arc;

use fhe_ir::{DType, Dim, Graph, InputSpec, OutletId, Tensor};
use fhe_ops_std::{Binary, BinaryFn, MatMul};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::linear::Linear;
use crate::PassError;

/// Which layers get adapters, as PEFT's `target_modules` says it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoraTargets {
    /// Every server layer whose name ends in one of these module names (`c_attn`), or equals
    /// a full name (`transformer.h.0.mlp.c_fc`).
    Modules(Vec<String>),
    /// Every frozen linear layer but the output head (PEFT's `all-linear`).
    AllLinear,
}

impl LoraTargets {
    /// Parses `c_attn`, `all-linear` or a comma-separated list of names.
    pub fn parse(spec: &str) -> Result<LoraTargets, PassError> {
        let spec = spec.trim();
        if spec == "all-linear" {
            return Ok(LoraTargets::AllLinear);
        }
        let names: Vec<String> = spec.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if names.is_empty() {
            return Err(PassError::Config("--lora-targets is empty; give `c_attn`, `all-linear` or module names".into()));
        }
        Ok(LoraTargets::Modules(names))
    }

    fn matches(&self, layer: &str) -> bool {
        match self {
            LoraTargets::AllLinear => true,
            LoraTargets::Modules(names) => names.iter().any(|n| layer == n || layer.ends_with(&format!(".{n}"))),
        }
    }

    /// The names for `adapter_config.json`'s `target_modules`.
    pub fn peft_modules(&self) -> Vec<String> {
        match self {
            LoraTargets::AllLinear => vec!["c_attn".into(), "c_proj".into(), "c_fc".into()],
            LoraTargets::Modules(names) => names.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub targets: LoraTargets,
    pub seed: u64,
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// One adapter pair with its initial values.
#[derive(Debug)]
pub struct Adapter {
    pub layer: String,
    /// PEFT keys, also the graph input names.
    pub a_key: String,
    pub b_key: String,
    pub a_init: Tensor,
    pub b_init: Tensor,
}

pub fn peft_key(layer: &str, which: &str) -> String {
    format!("base_model.model.{layer}.lora_{which}.weight")
}

/// Inserts adapters on every target server layer. `A` is Kaiming-uniform as PEFT draws it
/// (bound 1/√in), `B` is zero, so the adapted model starts equal to the base model.
pub fn insert_lora(graph: &mut Graph, layers: &[Linear], config: &LoraConfig) -> Result<Vec<Adapter>, PassError> {
    if config.rank == 0 {
        return Err(PassError::Config("--lora-rank must be at least 1".into()));
    }
    let mut adapters = Vec::new();
    for layer in layers.iter().filter(|l| l.info.on_server && config.targets.matches(&l.info.name)) {
        let (n_in, n_out, r) = (layer.info.in_features, layer.info.out_features, config.rank);
        let name = &layer.info.name;
        let (a_key, b_key) = (peft_key(name, "A"), peft_key(name, "B"));
        let spec = |rows, cols| InputSpec { dtype: DType::F32, dims: vec![Dim::Fixed(rows), Dim::Fixed(cols)] };
        let a = graph.add_input(a_key.clone(), spec(r, n_in));
        let b = graph.add_input(b_key.clone(), spec(n_out, r));
        let down = graph.add_op(format!("{name}/lora_down"), Arc::new(MatMul { transpose_a: false, transpose_b: true }), &[layer.input, a], 1)?;
        let up = graph.add_op(format!("{name}/lora_up"), Arc::new(MatMul { transpose_a: false, transpose_b: true }), &[OutletId::new(down, 0), b], 1)?;
        let scale = graph.add_const(format!("{name}/lora_scale"), Arc::new(Tensor::from_f32(&[], vec![config.scale()])?));
        let scaled = graph.add_op(format!("{name}/lora_scaled"), Arc::new(Binary { f: BinaryFn::Mul }), &[OutletId::new(up, 0), scale], 1)?;
        let sum = graph.add_op(format!("{name}/lora_add"), Arc::new(Binary { f: BinaryFn::Add }), &[layer.output, OutletId::new(scaled, 0)], 1)?;
        graph.replace_uses(layer.output, OutletId::new(sum, 0), Some(sum))?;

        let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed ^ (u64::from(layer.info.id.0) << 32));
        let bound = 1.0 / (n_in as f32).sqrt();
        let a_init = Tensor::from_f32(&[r, n_in], (0..r * n_in).map(|_| rng.random_range(-bound..bound)).collect())?;
        let b_init = Tensor::from_f32(&[n_out, r], vec![0.0; n_out * r])?;
        adapters.push(Adapter { layer: name.clone(), a_key, b_key, a_init, b_init });
    }
    if adapters.is_empty() {
        let names: Vec<&str> = layers.iter().filter(|l| l.info.on_server).map(|l| l.info.name.as_str()).collect();
        return Err(PassError::Config(format!("--lora-targets {:?} matches no layer; the layers are {names:?}", config.targets)));
    }
    graph.verify()?;
    Ok(adapters)
}
