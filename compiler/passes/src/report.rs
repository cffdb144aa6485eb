//! The split report: how much of the model moved to the server and what the client keeps.

use std::collections::HashSet;
use std::fmt;

use fhe_ir::{DType, Graph, NodeBody};
use fhe_ops_std::{Gather, LayerNorm};

use crate::linear::Linear;
use crate::lora::Adapter;

/// Parameter counts of the split, the way the reference reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SplitReport {
    pub total: usize,
    pub server: usize,
    pub client_embeddings: usize,
    pub client_norms: usize,
    pub client_biases: usize,
    pub client_other: usize,
    pub lora: usize,
}

impl SplitReport {
    pub fn client(&self) -> usize {
        self.total - self.server
    }
}

/// Counts the model's parameters per use: exporters share identical constants (all-zero
/// biases, all-one norm scales) between layers, yet each layer has its own parameters.
/// `graph` is the forward graph after discovery, before LoRA.
pub fn split_report(graph: &Graph, layers: &[Linear], adapters: &[Adapter]) -> SplitReport {
    let mut r = SplitReport::default();
    let weights: HashSet<*const fhe_ir::Tensor> = layers.iter().filter(|l| l.info.on_server).map(|l| std::sync::Arc::as_ptr(&l.weight)).collect();
    for l in layers.iter().filter(|l| l.info.on_server) {
        r.server += l.info.in_features * l.info.out_features;
    }
    // The client-side head reads the (tied) embedding table, already counted at its Gather.
    let head: HashSet<fhe_ir::NodeId> = layers.iter().filter(|l| !l.info.on_server).map(|l| l.output.node).collect();
    for id in graph.node_ids() {
        let node = graph.node(id);
        let Some(op) = node.op() else { continue };
        if head.contains(&id) {
            continue;
        }
        for (slot, input) in node.inputs.iter().enumerate() {
            let NodeBody::Const(t) = &graph.node(input.node).body else { continue };
            if t.dtype() != DType::F32 || t.len() <= 1 || weights.contains(&std::sync::Arc::as_ptr(t)) {
                continue;
            }
            let n = t.len();
            if node.op_as::<Gather>().is_some() {
                r.client_embeddings += n;
            } else if node.op_as::<LayerNorm>().is_some() {
                r.client_norms += n;
            } else if op.kind() == "Binary" && slot == 1 && graph.node(node.inputs[0].node).op().is_some_and(|o| o.kind() == "FrozenLinear") {
                r.client_biases += n;
            } else {
                r.client_other += n;
            }
        }
    }
    r.total = r.server + r.client_embeddings + r.client_norms + r.client_biases + r.client_other;
    r.lora = adapters.iter().map(|a| a.a_init.len() + a.b_init.len()).sum();
    r
}

fn pct(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

impl fmt::Display for SplitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "split report:")?;
        writeln!(f, "  model parameters          {:>12}", self.total)?;
        writeln!(f, "  moved to the server       {:>12}  ({:.2}% of the model)", self.server, pct(self.server, self.total))?;
        writeln!(f, "  kept on the client        {:>12}  ({:.2}%)", self.client(), pct(self.client(), self.total))?;
        writeln!(f, "    embeddings (tied head)  {:>12}", self.client_embeddings)?;
        writeln!(f, "    layer norms             {:>12}", self.client_norms)?;
        writeln!(f, "    biases of server layers {:>12}", self.client_biases)?;
        if self.client_other > 0 {
            writeln!(f, "    other                   {:>12}", self.client_other)?;
        }
        write!(f, "  LoRA parameters (trained) {:>12}  ({:.3}% of the model)", self.lora, pct(self.lora, self.total))
    }
}
