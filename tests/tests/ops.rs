//! Every clear kernel of the standard op set against tract-onnx, on small random inputs.
//! One table row per case: the op, its opset and attributes, its operands.

use fhe_ir::Tensor;
use fhe_tests::{constant, input, max_abs_diff, our_run, single_op_model, tract_run, Attr, Operand, Random};

struct Case {
    name: &'static str,
    op_type: &'static str,
    opset: i64,
    attrs: Vec<(&'static str, Attr)>,
    operands: Vec<Operand>,
    outputs: usize,
}

fn case(name: &'static str, op_type: &'static str, attrs: Vec<(&'static str, Attr)>, operands: Vec<Operand>) -> Case {
    Case { name, op_type, opset: 17, attrs, operands, outputs: 1 }
}

fn ints(shape: &[usize], v: &[i64]) -> Tensor {
    Tensor::from_i64(shape, v.to_vec()).unwrap()
}

fn vec1(v: &[i64]) -> Tensor {
    ints(&[v.len()], v)
}

fn cases() -> Vec<Case> {
    let mut r = Random::new(7);
    let mut cases = vec![
        case("add broadcast", "Add", vec![], vec![input(r.f32(&[2, 3, 4], -2.0, 2.0)), input(r.f32(&[4], -2.0, 2.0))]),
        case("sub broadcast both", "Sub", vec![], vec![input(r.f32(&[2, 1, 4], -2.0, 2.0)), input(r.f32(&[3, 1], -2.0, 2.0))]),
        case("mul", "Mul", vec![], vec![input(r.f32(&[3, 5], -2.0, 2.0)), input(r.f32(&[3, 5], -2.0, 2.0))]),
        case("div", "Div", vec![], vec![input(r.f32(&[3, 5], -2.0, 2.0)), input(r.f32(&[1], 0.5, 2.0))]),
        case("pow cube", "Pow", vec![], vec![input(r.f32(&[4, 6], -2.0, 2.0)), constant(Tensor::from_f32(&[], vec![3.0]).unwrap())]),
        case("pow fractional", "Pow", vec![], vec![input(r.f32(&[4, 6], 0.1, 2.0)), constant(Tensor::from_f32(&[], vec![0.5]).unwrap())]),
        case("add i64", "Add", vec![], vec![input(r.i64(&[4], -5, 5)), input(r.i64(&[1], -5, 5))]),
        case("mul i64", "Mul", vec![], vec![input(r.i64(&[2, 3], -5, 5)), input(r.i64(&[3], -5, 5))]),
        case("tanh", "Tanh", vec![], vec![input(r.f32(&[5, 7], -4.0, 4.0))]),
        case("sqrt", "Sqrt", vec![], vec![input(r.f32(&[5, 7], 0.0, 4.0))]),
        case("neg", "Neg", vec![], vec![input(r.f32(&[5], -4.0, 4.0))]),
        case("exp", "Exp", vec![], vec![input(r.f32(&[5], -4.0, 4.0))]),
        case("relu", "Relu", vec![], vec![input(r.f32(&[9], -4.0, 4.0))]),
        case("equal", "Equal", vec![], vec![input(r.i64(&[3, 4], 0, 3)), input(r.i64(&[4], 0, 3))]),
        case("less", "Less", vec![], vec![input(r.f32(&[3, 4], -1.0, 1.0)), input(r.f32(&[3, 1], -1.0, 1.0))]),
        case("not", "Not", vec![], vec![input(r.bool(&[6]))]),
        case(
            "where broadcast",
            "Where",
            vec![],
            vec![input(r.bool(&[1, 1, 4, 4])), input(r.f32(&[2, 3, 4, 4], -1.0, 1.0)), constant(Tensor::from_f32(&[], vec![-3.4e38]).unwrap())],
        ),
        case("cast f32 to i64", "Cast", vec![("to", Attr::Int(7))], vec![input(r.f32(&[6], -9.0, 9.0))]),
        case("cast i64 to f32", "Cast", vec![("to", Attr::Int(1))], vec![input(r.i64(&[6], -9, 9))]),
        case("cast bool to f32", "Cast", vec![("to", Attr::Int(1))], vec![input(r.bool(&[6]))]),
        case("shape", "Shape", vec![], vec![input(r.f32(&[2, 3, 4], 0.0, 1.0))]),
        case("shape from 1", "Shape", vec![("start", Attr::Int(1))], vec![input(r.f32(&[2, 3, 4], 0.0, 1.0))]),
        case("reshape 0 and -1", "Reshape", vec![], vec![input(r.f32(&[2, 3, 4], 0.0, 1.0)), constant(vec1(&[0, -1]))]),
        case("squeeze axes operand", "Squeeze", vec![], vec![input(r.f32(&[1, 3, 1, 2], 0.0, 1.0)), constant(vec1(&[0, -2]))]),
        case("unsqueeze axes operand", "Unsqueeze", vec![], vec![input(r.f32(&[3, 2], 0.0, 1.0)), constant(vec1(&[0, 3]))]),
        case("concat", "Concat", vec![("axis", Attr::Int(1))], vec![input(r.f32(&[2, 3], 0.0, 1.0)), input(r.f32(&[2, 1], 0.0, 1.0))]),
        case("concat i64", "Concat", vec![("axis", Attr::Int(0))], vec![input(r.i64(&[2], 0, 9)), constant(vec1(&[-1]))]),
        case(
            "slice axes and steps",
            "Slice",
            vec![],
            vec![input(r.f32(&[5, 6, 7], 0.0, 1.0)), constant(vec1(&[1, -1])), constant(vec1(&[4, 0])), constant(vec1(&[0, 2])), constant(vec1(&[2, -2]))],
        ),
        case(
            "slice clamped ends",
            "Slice",
            vec![],
            vec![input(r.f32(&[4, 6], 0.0, 1.0)), constant(vec1(&[-3])), constant(vec1(&[i64::MAX])), constant(vec1(&[1]))],
        ),
        case("gather rows", "Gather", vec![], vec![constant(r.f32(&[10, 4], -1.0, 1.0)), input(r.i64(&[2, 3], -10, 10))]),
        case("gather scalar axis 1", "Gather", vec![("axis", Attr::Int(1))], vec![input(r.f32(&[2, 5, 3], 0.0, 1.0)), constant(ints(&[], &[-2]))]),
        case("transpose perm", "Transpose", vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))], vec![input(r.f32(&[2, 3, 4, 5], 0.0, 1.0))]),
        case("transpose default", "Transpose", vec![], vec![input(r.f32(&[2, 3, 4], 0.0, 1.0))]),
        case("expand", "Expand", vec![], vec![input(r.f32(&[3, 1], 0.0, 1.0)), constant(vec1(&[2, 1, 4]))]),
        case(
            "constant of shape",
            "ConstantOfShape",
            vec![("value", Attr::Tensor(Tensor::from_i64(&[1], vec![5]).unwrap()))],
            vec![constant(vec1(&[2, 3]))],
        ),
        case("range", "Range", vec![], vec![constant(ints(&[], &[2])), constant(ints(&[], &[11])), constant(ints(&[], &[3]))]),
        case("matmul 2d", "MatMul", vec![], vec![input(r.f32(&[5, 7], -1.0, 1.0)), input(r.f32(&[7, 3], -1.0, 1.0))]),
        case("matmul batched weight", "MatMul", vec![], vec![input(r.f32(&[2, 3, 4, 5], -1.0, 1.0)), constant(r.f32(&[5, 6], -1.0, 1.0))]),
        case("matmul broadcast batch", "MatMul", vec![], vec![input(r.f32(&[2, 1, 4, 5], -1.0, 1.0)), input(r.f32(&[3, 5, 2], -1.0, 1.0))]),
        case("matmul large", "MatMul", vec![], vec![input(r.f32(&[64, 96], -1.0, 1.0)), input(r.f32(&[96, 200], -1.0, 1.0))]),
        case(
            "gemm bias",
            "Gemm",
            vec![],
            vec![input(r.f32(&[6, 8], -1.0, 1.0)), constant(r.f32(&[8, 5], -1.0, 1.0)), constant(r.f32(&[5], -1.0, 1.0))],
        ),
        case(
            "gemm transposed scaled",
            "Gemm",
            vec![("transA", Attr::Int(1)), ("transB", Attr::Int(1)), ("alpha", Attr::Float(0.5)), ("beta", Attr::Float(2.0))],
            vec![input(r.f32(&[8, 6], -1.0, 1.0)), input(r.f32(&[5, 8], -1.0, 1.0)), input(r.f32(&[6, 1], -1.0, 1.0))],
        ),
        case("gemm no bias", "Gemm", vec![], vec![input(r.f32(&[3, 4], -1.0, 1.0)), input(r.f32(&[4, 2], -1.0, 1.0))]),
        case("softmax last axis", "Softmax", vec![], vec![input(r.f32(&[2, 3, 8], -5.0, 5.0))]),
        case("softmax axis 1", "Softmax", vec![("axis", Attr::Int(1))], vec![input(r.f32(&[2, 3, 4], -5.0, 5.0))]),
        case(
            "layer norm",
            "LayerNormalization",
            vec![("epsilon", Attr::Float(1e-5))],
            vec![input(r.f32(&[2, 3, 16], -3.0, 3.0)), constant(r.f32(&[16], 0.5, 1.5)), constant(r.f32(&[16], -0.5, 0.5))],
        ),
        case(
            "layer norm two axes",
            "LayerNormalization",
            vec![("axis", Attr::Int(1))],
            vec![input(r.f32(&[2, 3, 4], -3.0, 3.0)), constant(r.f32(&[3, 4], 0.5, 1.5))],
        ),
    ];
    cases.push(Case {
        name: "reduce mean (opset 13 attribute)",
        opset: 13,
        ..case("", "ReduceMean", vec![("axes", Attr::Ints(vec![-1]))], vec![input(r.f32(&[2, 3, 5], -1.0, 1.0))])
    });
    cases.push(Case {
        name: "reduce mean no keepdims",
        opset: 13,
        ..case("", "ReduceMean", vec![("axes", Attr::Ints(vec![0, 2])), ("keepdims", Attr::Int(0))], vec![input(r.f32(&[2, 3, 5], -1.0, 1.0))])
    });
    cases.push(Case { outputs: 3, ..case("split sizes operand", "Split", vec![("axis", Attr::Int(1))], vec![input(r.f32(&[2, 9], 0.0, 1.0)), constant(vec1(&[2, 3, 4]))]) });
    cases.push(Case { outputs: 3, ..case("split equal", "Split", vec![("axis", Attr::Int(-1))], vec![input(r.f32(&[2, 3, 12], 0.0, 1.0))]) });
    cases.push(Case { opset: 14, ..case("softmax opset 14", "Softmax", vec![], vec![input(r.f32(&[4, 8], -5.0, 5.0))]) });
    cases
}

#[test]
fn every_kernel_matches_tract() {
    let mut failures = Vec::new();
    let cases = cases();
    for c in &cases {
        let model = single_op_model(c.op_type, c.opset, &c.attrs, &c.operands, c.outputs);
        let runtime: Vec<&Operand> = c.operands.iter().filter(|o| !o.constant).collect();
        let named: Vec<(String, Tensor)> = c
            .operands
            .iter()
            .enumerate()
            .filter(|(_, o)| !o.constant)
            .map(|(i, o)| (format!("x{i}"), o.value.clone()))
            .collect();
        let values: Vec<&Tensor> = runtime.iter().map(|o| &o.value).collect();
        let expected = tract_run(&model, &values).unwrap_or_else(|e| panic!("{}: tract failed: {e:#}", c.name));
        let got = match our_run(&model, &named) {
            Ok(got) => got,
            Err(e) => {
                failures.push(format!("{}: {e:#}", c.name));
                continue;
            }
        };
        assert_eq!(got.len(), expected.len(), "{}: output count", c.name);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            match max_abs_diff(g, e) {
                Ok(d) if d <= 1e-5 => {}
                Ok(d) => failures.push(format!("{} output {i}: max |Δ| = {d}", c.name)),
                Err(e) => failures.push(format!("{} output {i}: {e}", c.name)),
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn kernel_errors_name_the_node_and_do_not_panic() {
    let mut r = Random::new(1);
    // Index 10 is out of range for a table of 10 rows.
    let model = single_op_model("Gather", 17, &[], &[constant(r.f32(&[10, 4], -1.0, 1.0)), input(vec1(&[3, 10]))], 1);
    let err = our_run(&model, &[("x1".into(), vec1(&[3, 10]))]).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("test_Gather") && message.contains("index 10 is out of range"), "{message}");

    let model = single_op_model("MatMul", 17, &[], &[input(r.f32(&[2, 3], 0.0, 1.0)), input(r.f32(&[4, 2], 0.0, 1.0))], 1);
    let err = our_run(&model, &[("x0".into(), r.f32(&[2, 3], 0.0, 1.0)), ("x1".into(), r.f32(&[4, 2], 0.0, 1.0))]).unwrap_err();
    assert!(format!("{err:#}").contains("inner dimensions differ"), "{err:#}");
}
