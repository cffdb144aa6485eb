//! Reverse-mode differentiation at compile time: appends the loss and the backward graph,
//! pruned to what the gradients of the trainable inputs need.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use fhe_ir::{specialize, DType, Dim, GradBuilder, Graph, InputSpec, NodeBody, NodeId, OutletId, Tensor};
use fhe_ops_std::{Binary, BinaryFn, CrossEntropy, MatMul, ProjectedCrossEntropy};

use crate::PassError;

/// Name of the training graph's label input and loss output; gradients are output as
/// `grad:<input name>`.
pub const LABELS: &str = "labels";
pub const LOSS: &str = "loss";

pub fn grad_output_name(input: &str) -> String {
    format!("grad:{input}")
}

/// `(h, w, transpose_b)` when `logits` is only the output `h·w` (or `h·wᵀ`) of a constant
/// matrix `w` (GPT-2's lm_head on the tied embedding table): the loss then fuses with that
/// projection and never holds the logits of all tokens at once.
fn projection_of(graph: &Graph, logits: OutletId) -> Option<(OutletId, OutletId, bool)> {
    let node = graph.node(logits.node);
    let matmul = node.op_as::<MatMul>().filter(|m| !m.transpose_a)?;
    let w = node.inputs[1];
    let is_matrix = matches!(&graph.node(w.node).body, NodeBody::Const(t) if t.shape().len() == 2);
    (is_matrix && graph.consumers(logits.node).is_empty()).then_some((node.inputs[0], w, matmul.transpose_b))
}

/// Turns a forward graph with output `logits` into a training graph: adds a `labels` input
/// shaped like `like_input`, the cross-entropy loss, and the gradient of the loss with
/// respect to every input in `trainable`. Outputs become `loss` and the gradients.
pub fn build_training_graph(forward: &Graph, like_input: &str, trainable: &[String]) -> Result<Graph, PassError> {
    let mut graph = forward.clone();
    let logits = graph
        .outputs()
        .iter()
        .find(|o| o.name == "logits")
        .map(|o| o.outlet)
        .ok_or_else(|| PassError::Config("the model has no `logits` output to train on".into()))?;
    let ids = graph
        .inputs()
        .iter()
        .copied()
        .find(|&id| graph.node(id).name == like_input)
        .ok_or_else(|| PassError::Config(format!("the model has no `{like_input}` input")))?;
    let ids_spec = graph.input_spec(ids).expect("an input").clone();
    let labels = graph.add_input(LABELS, InputSpec { dtype: DType::I64, dims: ids_spec.dims });
    let loss_node = match projection_of(&graph, logits) {
        Some((h, w, transpose_b)) => graph.add_op(LOSS, Arc::new(ProjectedCrossEntropy { transpose_b }), &[h, w, labels], 2)?,
        None => graph.add_op(LOSS, Arc::new(CrossEntropy), &[logits, labels], 1)?,
    };
    let loss = OutletId::new(loss_node, 0);
    // An output from here on, so the analysis below sees the loss as live.
    graph.add_output(LOSS, loss)?;

    let params: Vec<(String, OutletId)> = trainable
        .iter()
        .map(|name| {
            graph
                .inputs()
                .iter()
                .find(|&&id| &graph.node(id).name == name)
                .map(|&id| (name.clone(), OutletId::new(id, 0)))
                .ok_or_else(|| PassError::Config(format!("no trainable input `{name}`")))
        })
        .collect::<Result<_, _>>()?;

    let order = graph.topo_order()?;
    let carriers = gradient_carriers(&graph)?;
    let depends = depends_on(&graph, &order, params.iter().map(|p| p.1.node), &carriers);
    let feeds_loss = ancestors(&graph, loss_node);

    let mut grads: HashMap<OutletId, OutletId> = HashMap::new();
    let one = graph.add_const("loss/seed", Arc::new(Tensor::from_f32(&[], vec![1.0])?));
    grads.insert(loss, one);
    for &id in order.iter().rev() {
        if !(depends.contains(&id) && feeds_loss.contains(&id)) {
            continue;
        }
        let node = graph.node(id);
        let NodeBody::Op(op) = &node.body else { continue };
        let op = op.clone();
        let output_grads: Vec<Option<OutletId>> = (0..node.n_outputs).map(|k| grads.get(&OutletId::new(id, k)).copied()).collect();
        if output_grads.iter().all(Option::is_none) {
            continue;
        }
        let needs: Vec<bool> = node.inputs.iter().map(|i| depends.contains(&i.node)).collect();
        let inputs = node.inputs.clone();
        let name = node.name.clone();
        let input_grads = op
            .gradient(&mut GradBuilder::new(&mut graph, id, output_grads, needs.clone()))
            .map_err(|e| e.in_node(&name, op.kind()))?;
        for ((input, grad), needed) in inputs.iter().zip(input_grads).zip(needs) {
            let Some(grad) = grad.filter(|_| needed) else { continue };
            let total = match grads.get(input) {
                Some(&previous) => {
                    let add = graph.add_op(format!("{name}/grad_sum"), Arc::new(Binary { f: BinaryFn::Add }), &[previous, grad], 1)?;
                    OutletId::new(add, 0)
                }
                None => grad,
            };
            grads.insert(*input, total);
        }
    }

    graph.retain_outputs(|name| name == LOSS);
    for (name, outlet) in &params {
        let grad = grads.get(outlet).copied().ok_or_else(|| PassError::Config(format!("the loss does not depend on `{name}`")))?;
        graph.add_output(grad_output_name(name), grad)?;
    }
    graph.remove_unused();
    graph.verify()?;
    Ok(graph)
}

/// Shapes with every dynamic dimension set to 1.
pub fn smallest_shapes(graph: &Graph) -> HashMap<String, Vec<usize>> {
    graph
        .inputs()
        .iter()
        .filter_map(|&id| {
            let spec = graph.input_spec(id)?;
            let dims = spec.dims.iter().map(|d| if let Dim::Fixed(n) = d { *n } else { 1 }).collect();
            Some((graph.node(id).name.clone(), dims))
        })
        .collect()
}

/// The nodes whose outputs can carry a gradient: float values that stay dynamic once input
/// shapes are fixed. Shape arithmetic (integers, or folded away) never does, even where it
/// reads trainable activations through `Shape`.
fn gradient_carriers(graph: &Graph) -> Result<HashSet<NodeId>, PassError> {
    let spec = specialize(graph, &smallest_shapes(graph))?;
    Ok(graph
        .node_ids()
        .filter(|&id| spec.source_facts.get(&OutletId::new(id, 0)).is_some_and(|f| f.dtype == DType::F32 && f.konst.is_none()))
        .collect())
}

/// Nodes whose value depends on any of `roots` through gradient-carrying values.
fn depends_on(graph: &Graph, order: &[NodeId], roots: impl Iterator<Item = NodeId>, carriers: &HashSet<NodeId>) -> HashSet<NodeId> {
    let mut set: HashSet<NodeId> = roots.collect();
    for &id in order {
        let node = graph.node(id);
        if carriers.contains(&id) && node.inputs.iter().any(|i| set.contains(&i.node)) {
            set.insert(id);
        }
    }
    set
}

/// `node` and every node it depends on.
fn ancestors(graph: &Graph, node: NodeId) -> HashSet<NodeId> {
    let mut seen = HashSet::new();
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(graph.node(n).inputs.iter().map(|i| i.node));
        }
    }
    seen
}
