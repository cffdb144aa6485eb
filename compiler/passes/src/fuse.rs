//! Fusions of op patterns that exporters spell out: fewer passes over the data and fewer
//! values kept for the backward pass.

use std::sync::Arc;

use fhe_ir::{Graph, NodeBody, NodeId, OutletId};
use fhe_ops_std::{Binary, BinaryFn, Gelu, Unary, UnaryFn, GELU_CUBIC, GELU_SQRT_2_OVER_PI};

use crate::PassError;

/// The value of a one-element f32 constant.
fn scalar(graph: &Graph, outlet: OutletId) -> Option<f32> {
    match &graph.node(outlet.node).body {
        NodeBody::Const(t) if t.len() == 1 => t.to_f32_vec().ok().map(|v| v[0]),
        _ => None,
    }
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1.0)
}

/// The operands of a node that is `Binary { f }`.
fn binary(graph: &Graph, outlet: OutletId, f: BinaryFn) -> Option<(OutletId, OutletId)> {
    let node = graph.node(outlet.node);
    (node.op_as::<Binary>()?.f == f).then(|| (node.inputs[0], node.inputs[1]))
}

/// `a op b` with one operand the constant `value` (either side): the other operand.
fn with_constant(graph: &Graph, outlet: OutletId, f: BinaryFn, value: f32) -> Option<OutletId> {
    let (a, b) = binary(graph, outlet, f)?;
    match (scalar(graph, a), scalar(graph, b)) {
        (_, Some(v)) if close(v, value) => Some(a),
        (Some(v), _) if close(v, value) && f != BinaryFn::Pow => Some(b),
        _ => None,
    }
}

/// Matches `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` ending at the node of `tanh`:
/// returns `x` and the outlet of the whole expression.
fn match_gelu(graph: &Graph, tanh: NodeId) -> Option<(OutletId, OutletId)> {
    let node = graph.node(tanh);
    if node.op_as::<Unary>()?.f != UnaryFn::Tanh {
        return None;
    }
    // Inside the tanh: √(2/π)·(x + 0.044715·x³).
    let sum = with_constant(graph, node.inputs[0], BinaryFn::Mul, GELU_SQRT_2_OVER_PI)?;
    let (a, b) = binary(graph, sum, BinaryFn::Add)?;
    let cube_of = |cubic: OutletId| with_constant(graph, with_constant(graph, cubic, BinaryFn::Mul, GELU_CUBIC)?, BinaryFn::Pow, 3.0);
    let x = match (cube_of(b), cube_of(a)) {
        (Some(x), _) if x == a => a,
        (_, Some(x)) if x == b => b,
        _ => return None,
    };
    // Outside: (0.5·x)·(1 + tanh), the only use of the tanh.
    let [one_plus] = graph.consumers(tanh)[..] else { return None };
    let one_plus = OutletId::new(one_plus, 0);
    if with_constant(graph, one_plus, BinaryFn::Add, 1.0)? != OutletId::new(tanh, 0) {
        return None;
    }
    let [product] = graph.consumers(one_plus.node)[..] else { return None };
    let product = OutletId::new(product, 0);
    let (p, q) = binary(graph, product, BinaryFn::Mul)?;
    let half = if p == one_plus { q } else { p };
    (with_constant(graph, half, BinaryFn::Mul, 0.5)? == x).then_some((x, product))
}

/// Replaces every tanh-approximation GELU spelled out in elementwise ops with one [`Gelu`]
/// op; returns how many it replaced. The old ops go with `remove_unused`.
pub fn fuse_gelu(graph: &mut Graph) -> Result<usize, PassError> {
    let tanhs: Vec<NodeId> = graph.node_ids().filter(|&id| graph.node(id).op_as::<Unary>().is_some_and(|u| u.f == UnaryFn::Tanh)).collect();
    let mut fused = 0;
    for tanh in tanhs {
        let Some((x, out)) = match_gelu(graph, tanh) else { continue };
        let name = format!("{}/gelu", graph.node(tanh).name.rsplit_once('/').map_or("", |(scope, _)| scope));
        let gelu = graph.add_op(name, Arc::new(Gelu), &[x], 1)?;
        graph.replace_uses(out, OutletId::new(gelu, 0), None)?;
        fused += 1;
    }
    graph.remove_unused();
    Ok(fused)
}
