//! Where nodes run, and the client↔server boundary around frozen linear layers.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Graph, IrError, NodeId};

/// Index of a frozen linear layer in the artifact's layer table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LayerId(pub u32);

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {}", self.0)
    }
}

/// Forward computes `x·W`; backward computes `g·Wᵀ` (the input gradient).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    Forward,
    Backward,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Forward => "forward",
            Direction::Backward => "backward",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Placement {
    Client,
    Server,
}

/// The three stages of one server call. The client seals (quantizes and encrypts) a value,
/// the server applies its frozen weights to the sealed value, the client opens (decrypts and
/// dequantizes) the result. What "sealed" means is the backend's business.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stage {
    Seal,
    Apply,
    Open,
}

/// A node's part in a server call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LinearCall {
    pub layer: LayerId,
    pub direction: Direction,
    pub stage: Stage,
}

fn call_of(graph: &Graph, id: NodeId) -> Option<LinearCall> {
    graph.node(id).op().and_then(|op| op.linear_call())
}

/// Checks the partition invariants: server nodes are exactly the `Apply` stages; every edge
/// into the server comes from a `Seal` of the same call, every edge out of it goes to an
/// `Open` of the same call, and sealed values go nowhere else.
pub fn verify_placement(graph: &Graph) -> Result<(), IrError> {
    let bad = |id: NodeId, what: String| IrError::Malformed(format!("node `{}`: {what}", graph.node(id).name));
    for id in graph.node_ids() {
        let node = graph.node(id);
        let call = call_of(graph, id);
        let placement = node.op().map_or(Placement::Client, |op| op.placement());
        let is_apply = matches!(call, Some(LinearCall { stage: Stage::Apply, .. }));
        if (placement == Placement::Server) != is_apply {
            return Err(bad(id, "only the apply stage of a server call may run on the server".into()));
        }
        let Some(call) = call else { continue };
        let expect = |stage: Stage| LinearCall { stage, ..call };
        let (input_stage, output_stage) = match call.stage {
            Stage::Seal => (None, Some(expect(Stage::Apply))),
            Stage::Apply => (Some(expect(Stage::Seal)), Some(expect(Stage::Open))),
            Stage::Open => (Some(expect(Stage::Apply)), None),
        };
        if let Some(want) = input_stage {
            if node.inputs.len() != 1 || call_of(graph, node.inputs[0].node) != Some(want) {
                return Err(bad(id, format!("its input must be the {:?} stage of the same call", want.stage)));
            }
        }
        if let Some(want) = output_stage {
            for consumer in graph.consumers(id) {
                if call_of(graph, consumer) != Some(want) {
                    return Err(bad(id, format!("its output may only feed the {:?} stage of the same call", want.stage)));
                }
            }
            if graph.outputs().iter().any(|o| o.outlet.node == id) {
                return Err(bad(id, "a sealed value cannot be a graph output".into()));
            }
        }
    }
    Ok(())
}
