//! Finds the frozen linear layers (matmuls whose weight is a constant), names them as PEFT
//! does, and rewrites each into `FrozenLinear(x, W)` plus a separate bias add.

use std::sync::Arc;

use fhe_ir::{Direction, Graph, LayerId, NodeBody, NodeId, OutletId, Tensor};
use fhe_ops_linear::FrozenLinear;
use fhe_ops_std::{Binary, BinaryFn, Gather, Gemm, MatMul};
use serde::{Deserialize, Serialize};

use crate::PassError;

/// One frozen linear layer: `y = x·W (+ b)`, `W` of shape `[in_features, out_features]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub id: LayerId,
    /// PEFT module name, e.g. `transformer.h.3.attn.c_attn`.
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    /// Whether the layer runs on the server (everything but `lm_head`).
    pub on_server: bool,
}

/// What discovery found, with handles into the rewritten graph.
#[derive(Debug)]
pub struct Linear {
    pub info: LayerInfo,
    pub weight: Arc<Tensor>,
    /// The `FrozenLinear` node (absent for a tied lm_head, which stays a MatMul).
    pub node: Option<NodeId>,
    /// The layer's input (2-D rows) and its final output (after the bias).
    pub input: OutletId,
    pub output: OutletId,
}

/// PEFT module name from the exporter's node name: `/m/transformer/h.0/attn/c_attn/Gemm` →
/// `transformer.h.0.attn.c_attn`; falls back to the weight's name without `.weight`.
pub fn module_name(node_name: &str, weight_name: &str) -> String {
    let parts: Vec<&str> = node_name.split('/').filter(|p| !p.is_empty()).collect();
    if let Some(start) = parts.iter().position(|p| *p == "transformer" || *p == "lm_head") {
        if parts.len() > start + 1 || parts[start] == "lm_head" {
            let end = if parts.len() > start + 1 { parts.len() - 1 } else { parts.len() };
            return parts[start..end.max(start + 1)].join(".");
        }
    }
    let trimmed = weight_name.trim_end_matches(".weight");
    match trimmed.find("transformer.") {
        Some(i) => trimmed[i..].to_string(),
        None => trimmed.to_string(),
    }
}

fn const_of(graph: &Graph, outlet: OutletId) -> Option<(Arc<Tensor>, String)> {
    match &graph.node(outlet.node).body {
        NodeBody::Const(t) => Some((t.clone(), graph.node(outlet.node).name.clone())),
        _ => None,
    }
}

/// The token-embedding table, if the graph gathers rows from one.
fn embedding_table(graph: &Graph) -> Option<(OutletId, Arc<Tensor>)> {
    graph.node_ids().find_map(|id| {
        let node = graph.node(id);
        let gather = node.op_as::<Gather>()?;
        if gather.axis != 0 {
            return None;
        }
        let (table, name) = const_of(graph, node.inputs[0])?;
        (name.ends_with("wte.weight") && table.shape().len() == 2).then_some((node.inputs[0], table))
    })
}

fn is_transpose_of(a: &Tensor, b: &Tensor) -> bool {
    let (Ok(a), Ok(b)) = (a.as_f32(), b.as_f32()) else { return false };
    a.ndim() == 2 && b.ndim() == 2 && a.shape() == [b.shape()[1], b.shape()[0]] && a.t() == b
}

/// Rewrites every Gemm/MatMul with a constant 2-D weight. Returns the layers in graph order.
pub fn discover_linear_layers(graph: &mut Graph) -> Result<Vec<Linear>, PassError> {
    let table = embedding_table(graph);
    let mut layers = Vec::new();
    for id in graph.topo_order()? {
        let node = graph.node(id);
        let (x, weight_outlet, bias, transpose_b) = if let Some(gemm) = node.op_as::<Gemm>() {
            if gemm.trans_a || gemm.alpha != 1.0 || gemm.beta != 1.0 {
                continue;
            }
            (node.inputs[0], node.inputs[1], node.inputs.get(2).copied(), gemm.trans_b)
        } else if let Some(mm) = node.op_as::<MatMul>() {
            if mm.transpose_a {
                continue;
            }
            (node.inputs[0], node.inputs[1], None, mm.transpose_b)
        } else {
            continue;
        };
        let Some((weight, weight_name)) = const_of(graph, weight_outlet) else { continue };
        if weight.shape().len() != 2 {
            continue;
        }
        let name = module_name(&node.name, &weight_name);
        let node_name = node.name.clone();
        let weight = if transpose_b {
            Arc::new(Tensor::F32(weight.as_f32()?.t().as_standard_layout().into_owned()))
        } else {
            weight
        };
        let (in_features, out_features) = (weight.shape()[0], weight.shape()[1]);
        let id_of_layer = LayerId(layers.len() as u32);
        let on_server = name != "lm_head";
        let info = LayerInfo { id: id_of_layer, name, in_features, out_features, on_server };

        if !on_server {
            // lm_head stays on the client; share the embedding table when the weight is its
            // transposed copy (GPT-2 ties them; the export duplicates the data).
            let output = OutletId::new(id, 0);
            if let Some((table_outlet, table)) = table.clone().filter(|(_, t)| is_transpose_of(&weight, t)) {
                let tied = graph.add_op(format!("{node_name}/tied"), Arc::new(MatMul { transpose_a: false, transpose_b: true }), &[x, table_outlet], 1)?;
                graph.replace_uses(output, OutletId::new(tied, 0), None)?;
                layers.push(Linear { info, weight: table, node: None, input: x, output: OutletId::new(tied, 0) });
            } else {
                layers.push(Linear { info, weight, node: None, input: x, output });
            }
            continue;
        }

        let w = graph.add_const(format!("{}.weight", info.name), weight.clone());
        let linear = graph.add_op(
            format!("{node_name}/frozen"),
            Arc::new(FrozenLinear { layer: info.id, direction: Direction::Forward }),
            &[x, w],
            1,
        )?;
        let mut output = OutletId::new(linear, 0);
        if let Some(b) = bias {
            let add = graph.add_op(format!("{node_name}/bias"), Arc::new(Binary { f: BinaryFn::Add }), &[output, b], 1)?;
            output = OutletId::new(add, 0);
        }
        graph.replace_uses(OutletId::new(id, 0), output, None)?;
        layers.push(Linear { info, weight, node: Some(linear), input: x, output });
    }
    graph.remove_unused();
    graph.verify()?;
    Ok(layers)
}
