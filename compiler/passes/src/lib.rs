//! fhe-passes: the compiler's passes, in pipeline order.
//!
//! 0. [`fuse_gelu`]: GPT-2's spelled-out tanh GELU → one op.
//! 1. [`discover_linear_layers`]: frozen linear layers → `FrozenLinear` (+ bias), PEFT names,
//!    tied lm_head shares the embedding table.
//! 2. [`insert_lora`]: adapters on the target layers, as graph inputs.
//! 3. [`build_training_graph`]: loss and backward graph from the ops' gradient rules.
//! 4. [`partition`]: server layers → `Seal → Apply → Open` server calls.
//! 5. [`quantize_weight`]: int8 per-output-channel weights for the server part.

mod autodiff;
mod fuse;
mod linear;
mod lora;
mod partition;
mod quant;
mod report;

pub use autodiff::{build_training_graph, grad_output_name, smallest_shapes, LABELS, LOSS};
pub use fuse::fuse_gelu;
pub use linear::{discover_linear_layers, module_name, LayerInfo, Linear};
pub use lora::{insert_lora, peft_key, Adapter, LoraConfig, LoraTargets};
pub use partition::partition;
pub use quant::{quantize_weight, QuantizedWeight, QMAX, WEIGHT_BITS};
pub use report::{split_report, SplitReport};

use fhe_ir::IrError;

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Ir(#[from] IrError),
    #[error("{0}")]
    Config(String),
}
