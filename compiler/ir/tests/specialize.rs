//! Specialization on hand-built graphs with a local test op.

use std::collections::HashMap;
use std::sync::Arc;

use fhe_ir::{op_common, persistent_op, specialize, Dim, DType, Fact, Graph, InputSpec, IrError, NodeBody, Op, OutletId, Tensor};
use serde::{Deserialize, Serialize};

/// Adds a constant to every element; counts nothing, folds when its input is constant.
#[derive(Debug, Serialize, Deserialize)]
struct AddScalar(f32);
persistent_op!(AddScalar, "AddScalar");

impl Op for AddScalar {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        Ok(vec![Fact::new(inputs[0].dtype, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        Ok(vec![Tensor::F32(inputs[0].as_f32()?.mapv(|v| v + self.0))])
    }
}

fn spec() -> InputSpec {
    InputSpec { dtype: DType::F32, dims: vec![Dim::Dynamic("batch".into()), Dim::Fixed(2)] }
}

#[test]
fn constant_subgraphs_fold_and_dead_nodes_go() {
    let mut g = Graph::new();
    let x = g.add_input("x", spec());
    let c = g.add_const("c", Arc::new(Tensor::from_f32(&[2], vec![1.0, 2.0]).unwrap()));
    let folded = g.add_op("c_plus_one", Arc::new(AddScalar(1.0)), &[c], 1).unwrap();
    let dead = g.add_op("dead", Arc::new(AddScalar(5.0)), &[x], 1).unwrap();
    let y = g.add_op("y", Arc::new(AddScalar(2.0)), &[x], 1).unwrap();
    g.add_output("y", OutletId::new(y, 0)).unwrap();
    g.add_output("k", OutletId::new(folded, 0)).unwrap();
    g.verify().unwrap();

    let s = specialize(&g, &HashMap::from([("x".to_string(), vec![3, 2])])).unwrap();
    s.graph.verify().unwrap();
    let names: Vec<&str> = s.graph.node_ids().map(|id| s.graph.node(id).name.as_str()).collect();
    assert!(!names.contains(&"dead"), "{names:?}");
    let k = s.graph.outputs()[1].outlet;
    match &s.graph.node(k.node).body {
        NodeBody::Const(t) => assert_eq!(t.to_f32_vec().unwrap(), [2.0, 3.0]),
        other => panic!("c_plus_one should fold to a constant, found {other:?}"),
    }
    assert_eq!(s.fact(s.graph.outputs()[0].outlet).shape, [3, 2]);
    assert!(g.contains(dead), "specialization leaves the source graph alone");
}

#[test]
fn input_shapes_are_checked_against_the_declaration() {
    let mut g = Graph::new();
    let x = g.add_input("x", spec());
    g.add_output("x", x).unwrap();
    let cases = [
        (HashMap::from([("x".to_string(), vec![3, 5])]), "does not match the declared f32[batch, 2]"),
        (HashMap::from([("x".to_string(), vec![3])]), "does not match the declared"),
        (HashMap::new(), "no shape given"),
        (HashMap::from([("x".to_string(), vec![1, 2]), ("z".to_string(), vec![1])]), "no such input"),
    ];
    for (shapes, expected) in cases {
        let message = specialize(&g, &shapes).unwrap_err().to_string();
        assert!(message.contains(expected), "`{expected}` not in `{message}`");
    }
}

#[test]
fn graphs_refuse_dangling_operands() {
    let mut g = Graph::new();
    let x = g.add_input("x", spec());
    let err = g.add_op("bad", Arc::new(AddScalar(1.0)), &[OutletId::new(x.node, 3)], 1).unwrap_err();
    assert!(err.to_string().contains("bad"), "{err}");
    let err = g.add_output("x", OutletId::new(x.node, 1)).unwrap_err();
    assert!(err.to_string().contains("has 1 outputs"), "{err}");
}
