//! ONNX builders: read a node's attributes once, at the import boundary, into typed ops.

use std::sync::Arc;

use fhe_ir::{DType, IrError, OnnxNode, Op, Registry};

use crate::*;

type Built = Result<Arc<dyn Op>, IrError>;

fn ok(op: impl Op) -> Built {
    Ok(Arc::new(op))
}

/// ONNX `TensorProto.DataType` codes this op set computes with.
fn onnx_dtype(node: &OnnxNode, code: i64) -> Result<DType, IrError> {
    match code {
        1 => Ok(DType::F32),
        7 => Ok(DType::I64),
        9 => Ok(DType::Bool),
        other => Err(node.error(format!(
            "casting to ONNX data type {other} is not supported (only float32 = 1, int64 = 7, bool = 9)"
        ))),
    }
}

fn cast(node: &OnnxNode) -> Built {
    let to = node.int("to")?.ok_or_else(|| node.error("missing attribute `to`"))?;
    ok(Cast { to: onnx_dtype(node, to)? })
}

fn shape(node: &OnnxNode) -> Built {
    ok(ShapeOf { start: node.int("start")?.unwrap_or(0), end: node.int("end")? })
}

fn reshape(node: &OnnxNode) -> Built {
    ok(Reshape { allowzero: node.int("allowzero")?.unwrap_or(0) != 0 })
}

fn squeeze(node: &OnnxNode) -> Built {
    ok(Squeeze { axes: node.ints("axes")? })
}

fn unsqueeze(node: &OnnxNode) -> Built {
    ok(Unsqueeze { axes: node.ints("axes")? })
}

fn concat(node: &OnnxNode) -> Built {
    ok(Concat { axis: node.int("axis")?.ok_or_else(|| node.error("missing attribute `axis`"))? })
}

fn slice(node: &OnnxNode) -> Built {
    if node.opset < 10 {
        return Err(node.error("Slice before opset 10 (bounds as attributes) is not supported; re-export with opset 14 to 17"));
    }
    ok(SliceOp)
}

fn gather(node: &OnnxNode) -> Built {
    ok(Gather { axis: node.int("axis")?.unwrap_or(0) })
}

fn transpose(node: &OnnxNode) -> Built {
    let perm = node
        .ints("perm")?
        .map(|p| p.iter().map(|&a| usize::try_from(a).map_err(|_| node.error(format!("bad perm {p:?}")))).collect())
        .transpose()?;
    ok(Transpose { perm })
}

fn split(node: &OnnxNode) -> Built {
    ok(Split { axis: node.int("axis")?.unwrap_or(0), split: node.ints("split")?, outputs: node.n_outputs })
}

fn constant_of_shape(node: &OnnxNode) -> Built {
    let value = match node.tensor("value")? {
        Some(t) => Scalar::from_tensor(t).map_err(|e| node.error(e.to_string()))?,
        None => Scalar::F32(0.0),
    };
    ok(ConstantOfShape { value })
}

fn gemm(node: &OnnxNode) -> Built {
    ok(Gemm {
        alpha: node.float("alpha")?.unwrap_or(1.0),
        beta: node.float("beta")?.unwrap_or(1.0),
        trans_a: node.int("transA")?.unwrap_or(0) != 0,
        trans_b: node.int("transB")?.unwrap_or(0) != 0,
    })
}

fn softmax(node: &OnnxNode) -> Built {
    if node.opset < 13 {
        return Err(node.error("Softmax before opset 13 (2-D coercion) is not supported; re-export with opset 14 to 17"));
    }
    ok(Softmax { axis: node.int("axis")?.unwrap_or(-1) })
}

fn layer_norm(node: &OnnxNode) -> Built {
    if node.n_outputs > 1 {
        return Err(node.error("LayerNormalization with Mean/InvStdDev outputs is not supported"));
    }
    ok(LayerNorm { axis: node.int("axis")?.unwrap_or(-1), epsilon: node.float("epsilon")?.unwrap_or(1e-5) })
}

fn reduce_mean(node: &OnnxNode) -> Built {
    ok(ReduceMean {
        axes: node.ints("axes")?,
        keepdims: node.int("keepdims")?.unwrap_or(1) != 0,
        noop_with_empty_axes: node.int("noop_with_empty_axes")?.unwrap_or(0) != 0,
    })
}

pub fn register_builders(r: &mut Registry) {
    r.register_onnx("Add", |_| ok(Binary { f: BinaryFn::Add }));
    r.register_onnx("Sub", |_| ok(Binary { f: BinaryFn::Sub }));
    r.register_onnx("Mul", |_| ok(Binary { f: BinaryFn::Mul }));
    r.register_onnx("Div", |_| ok(Binary { f: BinaryFn::Div }));
    r.register_onnx("Pow", |_| ok(Binary { f: BinaryFn::Pow }));
    r.register_onnx("Equal", |_| ok(Compare { f: CompareFn::Equal }));
    r.register_onnx("Less", |_| ok(Compare { f: CompareFn::Less }));
    r.register_onnx("Greater", |_| ok(Compare { f: CompareFn::Greater }));
    r.register_onnx("Tanh", |_| ok(Unary { f: UnaryFn::Tanh }));
    r.register_onnx("Sqrt", |_| ok(Unary { f: UnaryFn::Sqrt }));
    r.register_onnx("Exp", |_| ok(Unary { f: UnaryFn::Exp }));
    r.register_onnx("Neg", |_| ok(Unary { f: UnaryFn::Neg }));
    r.register_onnx("Reciprocal", |_| ok(Unary { f: UnaryFn::Reciprocal }));
    r.register_onnx("Relu", |_| ok(Unary { f: UnaryFn::Relu }));
    r.register_onnx("Not", |_| ok(Unary { f: UnaryFn::Not }));
    r.register_onnx("Where", |_| ok(Where));
    r.register_onnx("Cast", cast);
    r.register_onnx("Shape", shape);
    r.register_onnx("Reshape", reshape);
    r.register_onnx("Squeeze", squeeze);
    r.register_onnx("Unsqueeze", unsqueeze);
    r.register_onnx("Concat", concat);
    r.register_onnx("Slice", slice);
    r.register_onnx("Gather", gather);
    r.register_onnx("Transpose", transpose);
    r.register_onnx("Split", split);
    r.register_onnx("Expand", |_| ok(Expand));
    r.register_onnx("ConstantOfShape", constant_of_shape);
    r.register_onnx("Range", |_| ok(Range));
    r.register_onnx("MatMul", |_| ok(MatMul::default()));
    r.register_onnx("Gemm", gemm);
    r.register_onnx("Softmax", softmax);
    r.register_onnx("LayerNormalization", layer_norm);
    r.register_onnx("ReduceMean", reduce_mean);
}
