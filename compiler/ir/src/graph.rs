//! The graph: nodes with typed ops, connected output slot → input slot. petgraph stays
//! inside this module; the rest of the project speaks in [`NodeId`] and [`OutletId`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::{IrError, InputSpec, Op, Tensor};

/// Identifies a node of one [`Graph`]. Stable across removals of other nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(NodeIndex);

impl NodeId {
    pub fn index(self) -> usize {
        self.0.index()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0.index())
    }
}

/// One output of a node: the value edges carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutletId {
    pub node: NodeId,
    pub slot: usize,
}

impl OutletId {
    pub fn new(node: NodeId, slot: usize) -> OutletId {
        OutletId { node, slot }
    }
}

/// What a node is: a graph input, a constant, or an op from a plugin.
#[derive(Clone, Debug)]
pub enum NodeBody {
    Input(InputSpec),
    Const(Arc<Tensor>),
    /// Ops are immutable, so graphs derived from one another share them.
    Op(Arc<dyn Op>),
}

impl NodeBody {
    pub fn kind(&self) -> &'static str {
        match self {
            NodeBody::Input(_) => "Input",
            NodeBody::Const(_) => "Const",
            NodeBody::Op(op) => op.kind(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub body: NodeBody,
    pub inputs: Vec<OutletId>,
    pub n_outputs: usize,
}

impl Node {
    pub fn op(&self) -> Option<&dyn Op> {
        match &self.body {
            NodeBody::Op(op) => Some(op.as_ref()),
            _ => None,
        }
    }

    /// The op downcast to a concrete type, if it is one.
    pub fn op_as<T: Op>(&self) -> Option<&T> {
        self.op().and_then(|op| op.as_any().downcast_ref::<T>())
    }
}

/// A named graph output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphOutput {
    pub name: String,
    pub outlet: OutletId,
}

/// Edge weight: which input of the consumer the value feeds.
#[derive(Clone, Copy, Debug)]
struct InputSlot(usize);

/// A dataflow graph. `Node::inputs` is the source of truth; the petgraph edges mirror it so
/// graph algorithms (topological order, reachability) come from petgraph.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    g: StableDiGraph<Node, InputSlot>,
    inputs: Vec<NodeId>,
    outputs: Vec<GraphOutput>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    pub fn add_input(&mut self, name: impl Into<String>, spec: InputSpec) -> OutletId {
        let id = NodeId(self.g.add_node(Node {
            name: name.into(),
            body: NodeBody::Input(spec),
            inputs: vec![],
            n_outputs: 1,
        }));
        self.inputs.push(id);
        OutletId::new(id, 0)
    }

    pub fn add_const(&mut self, name: impl Into<String>, value: Arc<Tensor>) -> OutletId {
        let id = NodeId(self.g.add_node(Node {
            name: name.into(),
            body: NodeBody::Const(value),
            inputs: vec![],
            n_outputs: 1,
        }));
        OutletId::new(id, 0)
    }

    /// Adds an op node fed by `inputs`, which must be outlets of this graph.
    pub fn add_op(
        &mut self,
        name: impl Into<String>,
        op: Arc<dyn Op>,
        inputs: &[OutletId],
        n_outputs: usize,
    ) -> Result<NodeId, IrError> {
        let name = name.into();
        for input in inputs {
            self.check_outlet(*input).map_err(|e| e.in_node(&name, op.kind()))?;
        }
        let id = NodeId(self.g.add_node(Node {
            name,
            body: NodeBody::Op(op),
            inputs: inputs.to_vec(),
            n_outputs,
        }));
        for (slot, input) in inputs.iter().enumerate() {
            self.g.add_edge(input.node.0, id.0, InputSlot(slot));
        }
        Ok(id)
    }

    pub fn add_output(&mut self, name: impl Into<String>, outlet: OutletId) -> Result<(), IrError> {
        self.check_outlet(outlet)?;
        self.outputs.push(GraphOutput { name: name.into(), outlet });
        Ok(())
    }

    fn check_outlet(&self, outlet: OutletId) -> Result<(), IrError> {
        let node = self.g.node_weight(outlet.node.0).ok_or_else(|| {
            IrError::Malformed(format!("input refers to missing node {}", outlet.node))
        })?;
        if outlet.slot >= node.n_outputs {
            return Err(IrError::Malformed(format!(
                "node `{}` has {} outputs, output {} was asked for",
                node.name, node.n_outputs, outlet.slot
            )));
        }
        Ok(())
    }

    /// Makes input `index` of `node` read `outlet` instead.
    pub fn set_input(&mut self, node: NodeId, index: usize, outlet: OutletId) -> Result<(), IrError> {
        self.check_outlet(outlet)?;
        let edge = self
            .g
            .edges_directed(node.0, Direction::Incoming)
            .find(|e| e.weight().0 == index)
            .map(|e| e.id())
            .ok_or_else(|| IrError::Malformed(format!("node `{}` has no input {index}", self.g[node.0].name)))?;
        self.g.remove_edge(edge);
        self.g.add_edge(outlet.node.0, node.0, InputSlot(index));
        self.g[node.0].inputs[index] = outlet;
        Ok(())
    }

    /// Makes every reader of `old` (nodes and graph outputs) read `new` instead, except
    /// `keep` (typically the node that computes `new` from `old`).
    pub fn replace_uses(&mut self, old: OutletId, new: OutletId, keep: Option<NodeId>) -> Result<(), IrError> {
        for consumer in self.consumers(old.node) {
            if Some(consumer) == keep {
                continue;
            }
            let slots: Vec<usize> =
                self.node(consumer).inputs.iter().enumerate().filter(|(_, i)| **i == old).map(|(s, _)| s).collect();
            for slot in slots {
                self.set_input(consumer, slot, new)?;
            }
        }
        for output in &mut self.outputs {
            if output.outlet == old {
                output.outlet = new;
            }
        }
        Ok(())
    }

    /// Removes graph outputs not named in `keep`.
    pub fn retain_outputs(&mut self, keep: impl Fn(&str) -> bool) {
        self.outputs.retain(|o| keep(&o.name));
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id.0)
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices().map(NodeId)
    }

    /// Graph input nodes in declaration order.
    pub fn inputs(&self) -> &[NodeId] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[GraphOutput] {
        &self.outputs
    }

    pub fn input_spec(&self, id: NodeId) -> Option<&InputSpec> {
        match &self.node(id).body {
            NodeBody::Input(spec) => Some(spec),
            _ => None,
        }
    }

    /// Nodes that consume some output of `id`.
    pub fn consumers(&self, id: NodeId) -> Vec<NodeId> {
        let mut out: Vec<NodeId> =
            self.g.edges_directed(id.0, Direction::Outgoing).map(|e| NodeId(e.target())).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Nodes in an order where every node comes after its inputs.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, IrError> {
        petgraph::algo::toposort(&self.g, None)
            .map(|order| order.into_iter().map(NodeId).collect())
            .map_err(|cycle| IrError::Cycle(self.g[cycle.node_id()].name.clone()))
    }

    /// A topological order that computes each node as late as it can: a depth-first walk
    /// from the outputs, in output order, each node right after its inputs. In a training
    /// graph, gradient terms that need only forward values are then computed during the
    /// backward pass, when they are consumed, rather than alive through all of it. Nodes no
    /// output needs come last.
    pub fn demand_order(&self) -> Result<Vec<NodeId>, IrError> {
        let topo = self.topo_order()?;
        let mut order = Vec::with_capacity(topo.len());
        let mut placed: HashSet<NodeIndex> = HashSet::new();
        for output in &self.outputs {
            // (node, how many of its inputs were walked)
            let mut stack = vec![(output.outlet.node.0, 0usize)];
            while let Some((n, next)) = stack.pop() {
                if placed.contains(&n) {
                    continue;
                }
                match self.g[n].inputs.get(next) {
                    Some(input) => {
                        stack.push((n, next + 1));
                        if !placed.contains(&input.node.0) {
                            stack.push((input.node.0, 0));
                        }
                    }
                    None => {
                        placed.insert(n);
                        order.push(NodeId(n));
                    }
                }
            }
        }
        order.extend(topo.into_iter().filter(|id| !placed.contains(&id.0)));
        Ok(order)
    }

    /// Removes every node that no graph output depends on (graph inputs stay).
    pub fn remove_unused(&mut self) {
        let mut live: HashSet<NodeIndex> = HashSet::new();
        let mut stack: Vec<NodeIndex> = self.inputs.iter().map(|n| n.0).collect();
        stack.extend(self.outputs.iter().map(|o| o.outlet.node.0));
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.g[n].inputs.iter().map(|i| i.node.0));
            }
        }
        let dead: Vec<NodeIndex> = self.g.node_indices().filter(|n| !live.contains(n)).collect();
        for n in dead {
            self.g.remove_node(n);
        }
    }

    /// Checks structural invariants: inputs point at existing outlets, edges mirror
    /// `Node::inputs`, the graph is acyclic, input and output names are unique.
    pub fn verify(&self) -> Result<(), IrError> {
        for idx in self.g.node_indices() {
            let node = &self.g[idx];
            for input in &node.inputs {
                self.check_outlet(*input).map_err(|e| e.in_node(&node.name, node.body.kind()))?;
            }
            let mut edges: Vec<(usize, NodeIndex)> = self
                .g
                .edges_directed(idx, Direction::Incoming)
                .map(|e| (e.weight().0, e.source()))
                .collect();
            edges.sort_unstable();
            let expected: Vec<(usize, NodeIndex)> =
                node.inputs.iter().enumerate().map(|(slot, o)| (slot, o.node.0)).collect();
            if edges != expected {
                return Err(IrError::Malformed(format!("edges of node `{}` do not match its inputs", node.name)));
            }
        }
        self.topo_order()?;
        let mut names = HashMap::new();
        for id in &self.inputs {
            let name = &self.node(*id).name;
            if names.insert(name.clone(), ()).is_some() {
                return Err(IrError::Malformed(format!("two graph inputs are named `{name}`")));
            }
        }
        let mut names = HashSet::new();
        for output in &self.outputs {
            self.check_outlet(output.outlet)?;
            if !names.insert(&output.name) {
                return Err(IrError::Malformed(format!("two graph outputs are named `{}`", output.name)));
            }
        }
        Ok(())
    }
}
