//! Test support shared by the cross-crate tests, the CLI tests and the benchmarks:
//! building small ONNX models, running them with tract-onnx (the reference executor), and
//! comparing tensors.

use std::collections::HashMap;

use anyhow::{anyhow, Context, Result};
use fhe_ir::Tensor;
use onnx_protobuf::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use protobuf::Message;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

use tract_onnx::prelude::{self as tract, Framework, InferenceModelExt, IntoRunnable, IntoTValue};

/// The registry every test and tool uses: the compiler's, with all plugins of the workspace.
pub use fhe_compile::registry;

/// Path of a file in the repository, from a test's crate directory.
pub fn repo_path(relative: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

/// An attribute of a test node.
#[derive(Clone, Debug)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
    Tensor(Tensor),
}

/// One operand of a single-node test model: fed at run time, or baked in as an initializer.
#[derive(Clone, Debug)]
pub struct Operand {
    pub value: Tensor,
    pub constant: bool,
}

pub fn input(value: Tensor) -> Operand {
    Operand { value, constant: false }
}

pub fn constant(value: Tensor) -> Operand {
    Operand { value, constant: true }
}

fn onnx_type(t: &Tensor) -> i32 {
    match t.dtype() {
        fhe_ir::DType::F32 => 1,
        fhe_ir::DType::I64 => 7,
        fhe_ir::DType::Bool => 9,
    }
}

pub fn tensor_proto(name: &str, t: &Tensor) -> TensorProto {
    let mut p = TensorProto::new();
    p.name = name.into();
    p.dims = t.shape().iter().map(|&d| d as i64).collect();
    p.data_type = onnx_type(t);
    p.raw_data = fhe_exec::tensor_io::tensor_bytes(t).1;
    p
}

fn value_info(name: &str, t: &Tensor) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    shape.dim = t
        .shape()
        .iter()
        .map(|&d| {
            let mut dim = tensor_shape_proto::Dimension::new();
            dim.value = Some(tensor_shape_proto::dimension::Value::DimValue(d as i64));
            dim
        })
        .collect();
    let mut tensor_type = type_proto::Tensor::new();
    tensor_type.elem_type = onnx_type(t);
    tensor_type.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.value = Some(type_proto::Value::TensorType(tensor_type));
    let mut info = ValueInfoProto::new();
    info.name = name.into();
    info.type_ = Some(ty).into();
    info
}

fn attribute(name: &str, value: &Attr) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    match value {
        Attr::Int(v) => {
            a.type_ = AttributeType::INT.into();
            a.i = *v;
        }
        Attr::Float(v) => {
            a.type_ = AttributeType::FLOAT.into();
            a.f = *v;
        }
        Attr::Ints(v) => {
            a.type_ = AttributeType::INTS.into();
            a.ints = v.clone();
        }
        Attr::Tensor(t) => {
            a.type_ = AttributeType::TENSOR.into();
            a.t = Some(tensor_proto("", t)).into();
        }
    }
    a
}

/// A model with one node of `op_type`; operands named `x0, x1, …`, outputs `y0, y1, …`.
pub fn single_op_model(op_type: &str, opset: i64, attrs: &[(&str, Attr)], operands: &[Operand], n_outputs: usize) -> Vec<u8> {
    let mut node = NodeProto::new();
    node.op_type = op_type.into();
    node.name = format!("test_{op_type}");
    node.input = (0..operands.len()).map(|i| format!("x{i}")).collect();
    node.output = (0..n_outputs).map(|i| format!("y{i}")).collect();
    node.attribute = attrs.iter().map(|(n, v)| attribute(n, v)).collect();
    let mut graph = GraphProto::new();
    graph.name = "test".into();
    graph.node = vec![node];
    for (i, op) in operands.iter().enumerate() {
        let name = format!("x{i}");
        if op.constant {
            graph.initializer.push(tensor_proto(&name, &op.value));
        } else {
            graph.input.push(value_info(&name, &op.value));
        }
    }
    for i in 0..n_outputs {
        let mut info = ValueInfoProto::new();
        info.name = format!("y{i}");
        graph.output.push(info);
    }
    let mut model = ModelProto::new();
    model.ir_version = 8;
    let mut opset_id = OperatorSetIdProto::new();
    opset_id.version = opset;
    model.opset_import = vec![opset_id];
    model.graph = Some(graph).into();
    model.write_to_bytes().expect("serializable")
}

fn to_tract(t: &Tensor) -> Result<tract::Tensor> {
    Ok(match t {
        Tensor::F32(a) => tract::Tensor::from_shape(a.shape(), &a.as_standard_layout().iter().copied().collect::<Vec<_>>())?,
        Tensor::I64(a) => tract::Tensor::from_shape(a.shape(), &a.as_standard_layout().iter().copied().collect::<Vec<_>>())?,
        Tensor::Bool(a) => tract::Tensor::from_shape(a.shape(), &a.as_standard_layout().iter().copied().collect::<Vec<_>>())?,
    })
}

fn from_tract(t: &tract::Tensor) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    Ok(match t.datum_type() {
        tract::DatumType::F32 => Tensor::from_f32(&shape, t.to_plain_array_view::<f32>()?.iter().copied().collect())?,
        // tract computes some integer results as symbolic dimensions.
        tract::DatumType::I64 | tract::DatumType::TDim => {
            Tensor::from_i64(&shape, t.cast_to::<i64>()?.to_plain_array_view::<i64>()?.iter().copied().collect())?
        }
        tract::DatumType::Bool => Tensor::from_bool(&shape, t.to_plain_array_view::<bool>()?.iter().copied().collect())?,
        other => return Err(anyhow!("tract returned an unexpected type {other:?}")),
    })
}

/// A model loaded into tract for given input values' shapes, ready to run repeatedly.
pub struct TractModel {
    plan: Arc<tract::TypedRunnableModel>,
}

impl TractModel {
    /// `inputs` in the order of the model's graph inputs.
    pub fn new(onnx: &[u8], inputs: &[&Tensor]) -> Result<TractModel> {
        let mut model = tract_onnx::onnx().model_for_read(&mut &*onnx).context("tract cannot load the model")?;
        for (i, t) in inputs.iter().enumerate() {
            let dt = match t.dtype() {
                fhe_ir::DType::F32 => tract::DatumType::F32,
                fhe_ir::DType::I64 => tract::DatumType::I64,
                fhe_ir::DType::Bool => tract::DatumType::Bool,
            };
            model = model.with_input_fact(i, tract::InferenceFact::dt_shape(dt, t.shape()))?;
        }
        let plan = model.into_optimized()?.into_runnable()?;
        Ok(TractModel { plan })
    }

    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let values: tract::TVec<tract::TValue> = inputs.iter().map(|t| to_tract(t).map(|t| t.into_tvalue())).collect::<Result<_>>()?;
        self.plan.run(values)?.iter().map(|t| from_tract(t)).collect()
    }
}

/// Runs `onnx` once with tract.
pub fn tract_run(onnx: &[u8], inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    TractModel::new(onnx, inputs)?.run(inputs)
}

/// Imports `onnx` with our importer and runs it on named inputs.
pub fn our_run(onnx: &[u8], inputs: &[(String, Tensor)]) -> Result<Vec<Tensor>> {
    let imported = fhe_onnx::import_bytes(onnx, &registry())?;
    let model = fhe_exec::Model::new(imported.graph);
    let outputs = model.run(inputs.iter().cloned().collect::<HashMap<_, _>>())?;
    Ok(outputs.into_iter().map(|(_, t)| t).collect())
}

/// Largest absolute difference; an error if types or shapes differ.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dtype() != b.dtype() || a.shape() != b.shape() {
        return Err(anyhow!("{}{:?} vs {}{:?}", a.dtype(), a.shape(), b.dtype(), b.shape()));
    }
    Ok(match a.dtype() {
        fhe_ir::DType::F32 => a.to_f32_vec()?.iter().zip(b.to_f32_vec()?).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max),
        _ => {
            if a.cast(fhe_ir::DType::I64) == b.cast(fhe_ir::DType::I64) {
                0.0
            } else {
                f32::INFINITY
            }
        }
    })
}

/// Seeded random tensors for tests.
pub struct Random(rand::rngs::StdRng);

impl Random {
    pub fn new(seed: u64) -> Random {
        Random(rand::rngs::StdRng::seed_from_u64(seed))
    }

    pub fn f32(&mut self, shape: &[usize], lo: f32, hi: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_f32(shape, (0..n).map(|_| self.0.random_range(lo..hi)).collect()).unwrap()
    }

    pub fn i64(&mut self, shape: &[usize], lo: i64, hi: i64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_i64(shape, (0..n).map(|_| self.0.random_range(lo..hi)).collect()).unwrap()
    }

    pub fn bool(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_bool(shape, (0..n).map(|_| self.0.random_bool(0.5)).collect()).unwrap()
    }
}
