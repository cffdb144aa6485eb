//! fhe-onnx: reads an ONNX model (protobuf) into an fhe-ir [`Graph`].
//!
//! This is the boundary where op types are strings: each ONNX node is turned into a typed op
//! by the builder a plugin registered for its `op_type`. `Constant` and `Identity` are
//! structural and handled here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fhe_ir::{AttrValue, DType, Dim, Graph, InputSpec, IrError, OnnxNode, OutletId, Registry, Tensor};
use onnx_protobuf::{attribute_proto::AttributeType, tensor_shape_proto::dimension, type_proto, AttributeProto, ModelProto, TensorProto};
use protobuf::Message;

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read `{path}`: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("not a valid ONNX model: protobuf decoding failed ({0}); pass an .onnx file as written by torch.onnx.export, complete and uncorrupted")]
    Decode(protobuf::Error),
    #[error("not an ONNX model: {0}; pass an .onnx file as written by torch.onnx.export")]
    NotAModel(String),
    #[error("node `{node}` uses op `{op_type}`{domain}, which fhe-lora does not support; supported ops: {supported}")]
    UnsupportedOp { node: String, op_type: String, domain: String, supported: String },
    #[error("node `{node}` reads value `{value}`, which no earlier node, initializer or input produces (is the file truncated?)")]
    UnknownValue { node: String, value: String },
    #[error("tensor `{name}`: {what}")]
    Tensor { name: String, what: String },
    #[error(transparent)]
    Ir(#[from] IrError),
}

/// An imported model: the graph and what the file said about itself.
#[derive(Debug)]
pub struct Imported {
    pub graph: Graph,
    pub opset: i64,
    pub producer: String,
}

pub fn import_file(path: &Path, registry: &Registry) -> Result<Imported, OnnxError> {
    let bytes = std::fs::read(path).map_err(|error| OnnxError::Io { path: path.display().to_string(), error })?;
    import_bytes(&bytes, registry)
}

pub fn import_bytes(bytes: &[u8], registry: &Registry) -> Result<Imported, OnnxError> {
    let model = ModelProto::parse_from_bytes(bytes).map_err(OnnxError::Decode)?;
    import_model(&model, registry)
}

pub fn import_model(model: &ModelProto, registry: &Registry) -> Result<Imported, OnnxError> {
    if model.ir_version <= 0 {
        return Err(OnnxError::NotAModel("the file has no ONNX IR version".into()));
    }
    let proto = model.graph.as_ref().ok_or_else(|| OnnxError::NotAModel("the file has no graph".into()))?;
    if proto.node.is_empty() {
        return Err(OnnxError::NotAModel("the graph has no nodes".into()));
    }
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .ok_or_else(|| OnnxError::NotAModel("the model imports no default ONNX opset".into()))?;

    let mut graph = Graph::new();
    let mut values: HashMap<String, OutletId> = HashMap::new();
    for init in &proto.initializer {
        let tensor = tensor_from_proto(init)?;
        values.insert(init.name.clone(), graph.add_const(init.name.clone(), Arc::new(tensor)));
    }
    for input in &proto.input {
        if values.contains_key(&input.name) {
            continue; // Old exporters list initializers among the inputs too.
        }
        let spec = input_spec(input).map_err(|what| OnnxError::Tensor { name: input.name.clone(), what })?;
        values.insert(input.name.clone(), graph.add_input(input.name.clone(), spec));
    }

    for (index, node) in proto.node.iter().enumerate() {
        let name = if node.name.is_empty() { format!("{}_{index}", node.op_type) } else { node.name.clone() };
        let mut inputs = Vec::with_capacity(node.input.len());
        let present = node.input.iter().rposition(|i| !i.is_empty()).map_or(0, |p| p + 1);
        for value in &node.input[..present] {
            if value.is_empty() {
                return Err(IrError::Attribute {
                    node: name.clone(),
                    op_type: node.op_type.clone(),
                    what: "an optional operand is omitted before a present one; this is not supported".into(),
                }
                .into());
            }
            let outlet = *values
                .get(value)
                .ok_or_else(|| OnnxError::UnknownValue { node: name.clone(), value: value.clone() })?;
            inputs.push(outlet);
        }
        let attributes = node
            .attribute
            .iter()
            .filter_map(|a| attr_value(a).transpose().map(|v| v.map(|v| (a.name.clone(), v))))
            .collect::<Result<HashMap<_, _>, OnnxError>>()?;
        let onnx_node = OnnxNode {
            name: name.clone(),
            op_type: node.op_type.clone(),
            opset,
            attributes,
            n_inputs: inputs.len(),
            n_outputs: node.output.len(),
        };
        let is_default_domain = node.domain.is_empty() || node.domain == "ai.onnx";
        let outlets: Vec<OutletId> = match node.op_type.as_str() {
            "Constant" if is_default_domain => vec![graph.add_const(name.clone(), Arc::new(constant_value(&onnx_node)?))],
            "Identity" if is_default_domain => {
                inputs.first().copied().into_iter().collect()
            }
            op_type => {
                let builder = registry.onnx_builder(op_type).filter(|_| is_default_domain).ok_or_else(|| {
                    OnnxError::UnsupportedOp {
                        node: name.clone(),
                        op_type: op_type.to_string(),
                        domain: if is_default_domain { String::new() } else { format!(" of domain `{}`", node.domain) },
                        supported: registry.onnx_op_types().join(", "),
                    }
                })?;
                let op = builder(&onnx_node)?;
                let id = graph.add_op(name.clone(), op, &inputs, node.output.len())?;
                (0..node.output.len()).map(|slot| OutletId::new(id, slot)).collect()
            }
        };
        if outlets.len() != node.output.len() {
            return Err(IrError::Attribute { node: name, op_type: node.op_type.clone(), what: "wrong number of outputs".into() }.into());
        }
        for (value, outlet) in node.output.iter().zip(outlets) {
            if !value.is_empty() {
                values.insert(value.clone(), outlet);
            }
        }
    }
    for output in &proto.output {
        let outlet = *values
            .get(&output.name)
            .ok_or_else(|| OnnxError::UnknownValue { node: "graph output".into(), value: output.name.clone() })?;
        graph.add_output(output.name.clone(), outlet)?;
    }
    graph.remove_unused();
    graph.verify()?;
    Ok(Imported { graph, opset, producer: format!("{} {}", model.producer_name, model.producer_version) })
}

fn onnx_dtype(code: i32) -> Option<DType> {
    match code {
        1 => Some(DType::F32),
        6 | 7 => Some(DType::I64),
        9 => Some(DType::Bool),
        _ => None,
    }
}

fn input_spec(input: &onnx_protobuf::ValueInfoProto) -> Result<InputSpec, String> {
    let Some(type_proto::Value::TensorType(t)) = input.type_.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err("graph input is not a tensor".into());
    };
    let dtype = onnx_dtype(t.elem_type).ok_or_else(|| format!("unsupported input element type {}", t.elem_type))?;
    let dims = t
        .shape
        .dim
        .iter()
        .enumerate()
        .map(|(i, d)| match &d.value {
            Some(dimension::Value::DimValue(v)) if *v >= 0 => Dim::Fixed(*v as usize),
            Some(dimension::Value::DimParam(p)) if !p.is_empty() => Dim::Dynamic(p.clone()),
            _ => Dim::Dynamic(format!("dim{i}")),
        })
        .collect();
    Ok(InputSpec { dtype, dims })
}

/// Converts a `TensorProto` (raw little-endian bytes or typed fields) into a tensor.
pub fn tensor_from_proto(t: &TensorProto) -> Result<Tensor, OnnxError> {
    let bad = |what: String| OnnxError::Tensor { name: t.name.clone(), what };
    if !t.external_data.is_empty() {
        return Err(bad("its data is stored in an external file, which is not supported; export with all weights inside the .onnx file".into()));
    }
    let shape: Vec<usize> = t.dims.iter().map(|&d| usize::try_from(d).map_err(|_| bad(format!("negative dimension {d}")))).collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let raw = &t.raw_data;
    let from_raw = |width: usize| -> Result<Vec<&[u8]>, OnnxError> {
        if raw.len() != n * width {
            return Err(bad(format!("holds {} bytes of data, {} expected for shape {shape:?}", raw.len(), n * width)));
        }
        Ok(raw.chunks_exact(width).collect())
    };
    let tensor = match t.data_type {
        1 => {
            let data = if raw.is_empty() { t.float_data.clone() } else { from_raw(4)?.iter().map(|c| f32::from_le_bytes((*c).try_into().unwrap())).collect() };
            Tensor::from_f32(&shape, data)
        }
        7 => {
            let data = if raw.is_empty() { t.int64_data.clone() } else { from_raw(8)?.iter().map(|c| i64::from_le_bytes((*c).try_into().unwrap())).collect() };
            Tensor::from_i64(&shape, data)
        }
        6 => {
            let data = if raw.is_empty() {
                t.int32_data.iter().map(|&v| v as i64).collect()
            } else {
                from_raw(4)?.iter().map(|c| i32::from_le_bytes((*c).try_into().unwrap()) as i64).collect()
            };
            Tensor::from_i64(&shape, data)
        }
        9 => {
            let data = if raw.is_empty() { t.int32_data.iter().map(|&v| v != 0).collect() } else { from_raw(1)?.iter().map(|c| c[0] != 0).collect() };
            Tensor::from_bool(&shape, data)
        }
        other => return Err(bad(format!("element type {other} is not supported (float32, int32, int64 and bool are)"))),
    };
    tensor.map_err(|e| bad(e.to_string()))
}

fn attr_value(a: &AttributeProto) -> Result<Option<AttrValue>, OnnxError> {
    Ok(Some(match a.type_.enum_value() {
        Ok(AttributeType::INT) => AttrValue::Int(a.i),
        Ok(AttributeType::FLOAT) => AttrValue::Float(a.f),
        Ok(AttributeType::INTS) => AttrValue::Ints(a.ints.clone()),
        Ok(AttributeType::FLOATS) => AttrValue::Floats(a.floats.clone()),
        Ok(AttributeType::STRING) => AttrValue::String(String::from_utf8_lossy(&a.s).into_owned()),
        Ok(AttributeType::TENSOR) => AttrValue::Tensor(tensor_from_proto(&a.t)?),
        // Graphs and other kinds are never read by the supported ops.
        _ => return Ok(None),
    }))
}

/// The value of an ONNX `Constant` node, from whichever attribute holds it.
fn constant_value(node: &OnnxNode) -> Result<Tensor, IrError> {
    let (name, value) = node.attributes.iter().next().ok_or_else(|| node.error("Constant without a value"))?;
    let made = match value {
        AttrValue::Tensor(t) => Ok(t.clone()),
        AttrValue::Float(v) => Tensor::from_f32(&[], vec![*v]),
        AttrValue::Int(v) => Tensor::from_i64(&[], vec![*v]),
        AttrValue::Floats(v) => Tensor::from_f32(&[v.len()], v.clone()),
        AttrValue::Ints(v) => Tensor::from_i64(&[v.len()], v.clone()),
        AttrValue::String(_) => Err(node.error(format!("string constant `{name}` is not supported"))),
    };
    made
}
