//! What a gradient rule sees: the forward node, its output gradients, and a way to add the
//! nodes that compute its input gradients. The reverse-mode driver lives in fhe-passes.

use std::sync::Arc;

use crate::{Graph, IrError, NodeId, Op, OutletId, Tensor};

pub struct GradBuilder<'a> {
    graph: &'a mut Graph,
    node: NodeId,
    output_grads: Vec<Option<OutletId>>,
    needs: Vec<bool>,
    added: usize,
}

impl<'a> GradBuilder<'a> {
    /// For forward node `node`, with the gradients of its outputs (`None`: no gradient flows
    /// back through that output) and which inputs need a gradient.
    pub fn new(graph: &'a mut Graph, node: NodeId, output_grads: Vec<Option<OutletId>>, needs: Vec<bool>) -> GradBuilder<'a> {
        GradBuilder { graph, node, output_grads, needs, added: 0 }
    }

    /// Forward input `i` of the node.
    pub fn input(&self, i: usize) -> OutletId {
        self.graph.node(self.node).inputs[i]
    }

    pub fn n_inputs(&self) -> usize {
        self.graph.node(self.node).inputs.len()
    }

    /// Forward output `k` of the node.
    pub fn output(&self, k: usize) -> OutletId {
        OutletId::new(self.node, k)
    }

    /// Gradient of the loss with respect to output `k`, if any flows back.
    pub fn grad(&self, k: usize) -> Option<OutletId> {
        self.output_grads.get(k).copied().flatten()
    }

    /// Gradient of output `k`; an error if none flows (rules for single-output ops).
    pub fn required_grad(&self, k: usize) -> Result<OutletId, IrError> {
        self.grad(k).ok_or_else(|| IrError::Invalid(format!("no gradient reaches output {k}")))
    }

    pub fn needs_grad(&self, i: usize) -> bool {
        self.needs.get(i).copied().unwrap_or(false)
    }

    /// Adds a single-output op, named after the forward node.
    pub fn add(&mut self, op: impl Op, inputs: &[OutletId]) -> Result<OutletId, IrError> {
        self.add_shared(Arc::new(op), inputs, 1).map(|id| OutletId::new(id, 0))
    }

    /// Adds an op with `n_outputs` outputs.
    pub fn add_shared(&mut self, op: Arc<dyn Op>, inputs: &[OutletId], n_outputs: usize) -> Result<NodeId, IrError> {
        let name = self.next_name();
        self.graph.add_op(name, op, inputs, n_outputs)
    }

    pub fn constant(&mut self, value: Tensor) -> OutletId {
        let name = self.next_name();
        self.graph.add_const(name, Arc::new(value))
    }

    fn next_name(&mut self) -> String {
        self.added += 1;
        format!("{}/grad_{}", self.graph.node(self.node).name, self.added)
    }
}
