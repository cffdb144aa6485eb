//! Tensors to and from safetensors files.

use std::path::Path;

use fhe_ir::Tensor;
use safetensors::{Dtype, SafeTensors};

use crate::ExecError;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ExecError + '_ {
    move |error| ExecError::Io { path: path.display().to_string(), error }
}

/// Little-endian bytes of a tensor in row-major order, with its safetensors dtype.
pub fn tensor_bytes(t: &Tensor) -> (Dtype, Vec<u8>) {
    match t {
        Tensor::F32(a) => (Dtype::F32, a.as_standard_layout().iter().flat_map(|v| v.to_le_bytes()).collect()),
        Tensor::I64(a) => (Dtype::I64, a.as_standard_layout().iter().flat_map(|v| v.to_le_bytes()).collect()),
        Tensor::Bool(a) => (Dtype::BOOL, a.as_standard_layout().iter().map(|&v| v as u8).collect()),
    }
}

/// Safetensors bytes of raw little-endian tensors: (name, dtype, shape, bytes).
pub fn encode_raw(raw: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> Result<Vec<u8>, String> {
    let views = raw
        .iter()
        .map(|(name, dtype, shape, bytes)| safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

/// Safetensors bytes of named tensors.
pub fn encode_tensors(tensors: &[(String, &Tensor)]) -> Result<Vec<u8>, String> {
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let (dtype, bytes) = tensor_bytes(t);
            (name.clone(), dtype, t.shape().to_vec(), bytes)
        })
        .collect();
    encode_raw(&raw)
}

pub fn write_safetensors(path: &Path, tensors: &[(String, &Tensor)]) -> Result<(), ExecError> {
    let bytes = encode_tensors(tensors).map_err(|what| ExecError::Safetensors { path: path.display().to_string(), what })?;
    std::fs::write(path, bytes).map_err(io_error(path))
}

/// Reads every tensor of a safetensors file, sorted by name.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, ExecError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    decode_safetensors(&bytes).map_err(|what| ExecError::Safetensors { path: path.display().to_string(), what })
}

pub fn decode_safetensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>, String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, view) in file.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let tensor = match view.dtype() {
            Dtype::F32 => Tensor::from_f32(&shape, data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
            Dtype::I64 => Tensor::from_i64(&shape, data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
            Dtype::I32 => Tensor::from_i64(&shape, data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()),
            Dtype::BOOL => Tensor::from_bool(&shape, data.iter().map(|&b| b != 0).collect()),
            other => return Err(format!("tensor `{name}` has element type {other:?}; f32, i64, i32 and bool are supported")),
        }
        .map_err(|e| format!("tensor `{name}`: {e}"))?;
        out.push((name, tensor));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
