//! Specialization: fix the graph inputs' shapes, infer every fact, and fold everything that
//! no longer depends on input values (the shape subgraphs of an ONNX export) into constants.

use std::collections::HashMap;
use std::sync::Arc;

use crate::{Fact, Graph, IrError, NodeBody, OutletId, Tensor};

/// A graph whose every value has a concrete [`Fact`].
#[derive(Debug)]
pub struct Specialized {
    pub graph: Graph,
    pub facts: HashMap<OutletId, Fact>,
    /// The fact of every outlet of the graph that was specialized, by its outlet there,
    /// including values folded into constants or dropped as identities.
    pub source_facts: HashMap<OutletId, Fact>,
}

impl Specialized {
    pub fn fact(&self, outlet: OutletId) -> &Fact {
        &self.facts[&outlet]
    }
}

/// Specializes `graph` for concrete input shapes, given by input name.
pub fn specialize(graph: &Graph, shapes: &HashMap<String, Vec<usize>>) -> Result<Specialized, IrError> {
    for name in shapes.keys() {
        if !graph.inputs().iter().any(|id| &graph.node(*id).name == name) {
            let known: Vec<&str> = graph.inputs().iter().map(|id| graph.node(*id).name.as_str()).collect();
            return Err(IrError::Input {
                name: name.clone(),
                what: format!("the graph has no such input (its inputs are {known:?})"),
            });
        }
    }
    let mut out = Graph::new();
    let mut facts: HashMap<OutletId, Fact> = HashMap::new();
    // Old outlet → new outlet.
    let mut map: HashMap<OutletId, OutletId> = HashMap::new();

    for id in graph.topo_order()? {
        let node = graph.node(id);
        let new_outlets: Vec<(OutletId, Fact)> = match &node.body {
            NodeBody::Input(spec) => {
                let shape = shapes.get(&node.name).ok_or_else(|| IrError::Input {
                    name: node.name.clone(),
                    what: format!("no shape given for this input (declared {spec})"),
                })?;
                if !spec.accepts(shape) {
                    return Err(IrError::Input {
                        name: node.name.clone(),
                        what: format!("shape {shape:?} does not match the declared {spec}"),
                    });
                }
                let outlet = out.add_input(node.name.clone(), spec.clone());
                vec![(outlet, Fact::new(spec.dtype, shape.clone()))]
            }
            NodeBody::Const(value) => {
                let outlet = out.add_const(node.name.clone(), value.clone());
                vec![(outlet, Fact::constant(value.clone()))]
            }
            NodeBody::Op(op) => {
                let inputs: Vec<OutletId> = node.inputs.iter().map(|i| map[i]).collect();
                let input_facts: Vec<&Fact> = inputs.iter().map(|i| &facts[i]).collect();
                let in_node = |e: IrError| e.in_node(&node.name, op.kind());
                if node.n_outputs == 1 && op.is_identity(&input_facts) {
                    map.insert(OutletId::new(id, 0), inputs[0]);
                    continue;
                }
                let folded = if input_facts.iter().all(|f| f.konst.is_some()) {
                    let values: Vec<&Tensor> = input_facts.iter().map(|f| f.konst.as_deref().unwrap()).collect();
                    Some(op.eval(&values).map_err(in_node)?)
                } else {
                    op.fold(&input_facts)
                };
                match folded {
                    Some(values) => values
                        .into_iter()
                        .enumerate()
                        .map(|(slot, value)| {
                            let value = Arc::new(value);
                            let name = if slot == 0 { node.name.clone() } else { format!("{}:{slot}", node.name) };
                            (out.add_const(name, value.clone()), Fact::constant(value))
                        })
                        .collect(),
                    None => {
                        let output_facts = op.output_facts(&input_facts).map_err(in_node)?;
                        if output_facts.len() != node.n_outputs {
                            return Err(in_node(crate::invalid!(
                                "the op gives {} outputs but the node has {}",
                                output_facts.len(),
                                node.n_outputs
                            )));
                        }
                        let new_id = out.add_op(node.name.clone(), op.clone(), &inputs, node.n_outputs)?;
                        output_facts
                            .into_iter()
                            .enumerate()
                            .map(|(slot, fact)| (OutletId::new(new_id, slot), fact))
                            .collect()
                    }
                }
            }
        };
        for (slot, (outlet, fact)) in new_outlets.into_iter().enumerate() {
            map.insert(OutletId::new(id, slot), outlet);
            facts.insert(outlet, fact);
        }
    }
    for output in graph.outputs() {
        out.add_output(output.name.clone(), map[&output.outlet])?;
    }
    let source_facts = map.iter().map(|(old, new)| (*old, facts[new].clone())).collect();
    out.remove_unused();
    facts.retain(|outlet, _| out.contains(outlet.node));
    Ok(Specialized { graph: out, facts, source_facts })
}

