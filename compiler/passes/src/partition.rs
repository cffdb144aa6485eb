//! Partition: every frozen server layer becomes a server call. The weight leaves the client
//! graph; `Seal → Apply → Open` takes the layer's place, in either direction.

use std::collections::HashMap;
use std::sync::Arc;

use fhe_ir::{verify_placement, Direction, Graph, LayerId, OutletId, Stage};
use fhe_ops_linear::{FrozenLinear, ServerCall};

use crate::linear::LayerInfo;
use crate::PassError;

pub fn partition(graph: &mut Graph, layers: &[LayerInfo]) -> Result<(), PassError> {
    let by_id: HashMap<LayerId, &LayerInfo> = layers.iter().map(|l| (l.id, l)).collect();
    for id in graph.topo_order()? {
        let node = graph.node(id);
        let Some(frozen) = node.op_as::<FrozenLinear>().copied() else { continue };
        let layer = by_id.get(&frozen.layer).ok_or_else(|| PassError::Config(format!("{} is not in the layer table", frozen.layer)))?;
        if !layer.on_server {
            continue;
        }
        let (in_features, out_features) = match frozen.direction {
            Direction::Forward => (layer.in_features, layer.out_features),
            Direction::Backward => (layer.out_features, layer.in_features),
        };
        let name = node.name.clone();
        let mut value = node.inputs[0];
        for stage in [Stage::Seal, Stage::Apply, Stage::Open] {
            let call = ServerCall { layer: frozen.layer, direction: frozen.direction, stage, in_features, out_features };
            let stage_node = graph.add_op(format!("{name}/{stage:?}").to_lowercase(), Arc::new(call), &[value], 1)?;
            value = OutletId::new(stage_node, 0);
        }
        graph.replace_uses(OutletId::new(id, 0), value, None)?;
    }
    graph.remove_unused();
    graph.verify()?;
    verify_placement(graph)?;
    Ok(())
}
