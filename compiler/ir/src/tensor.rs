//! Dense tensors: the values that flow through the IR in clear.

use std::fmt;

use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

use crate::IrError;

/// Element type of a tensor. GPT-2 exports only need these three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    I64,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size_of(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::I64 => 8,
            DType::Bool => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        })
    }
}

/// A dense n-dimensional value. Arrays may have any strides (a transpose can stay a view
/// of the same buffer); kernels that need row-major data call `as_standard_layout`.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
    Bool(ArrayD<bool>),
}

/// Applies the same generic expression to whichever array a tensor holds.
#[macro_export]
macro_rules! dispatch_tensor {
    ($tensor:expr, $array:ident => $body:expr) => {
        match $tensor {
            $crate::Tensor::F32($array) => $crate::Tensor::F32($body),
            $crate::Tensor::I64($array) => $crate::Tensor::I64($body),
            $crate::Tensor::Bool($array) => $crate::Tensor::Bool($body),
        }
    };
}

impl Tensor {
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::I64(_) => DType::I64,
            Tensor::Bool(_) => DType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
            Tensor::Bool(a) => a.shape(),
        }
    }

    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Tensor, IrError> {
        Ok(Tensor::F32(array_from_vec(shape, data)?))
    }

    pub fn from_i64(shape: &[usize], data: Vec<i64>) -> Result<Tensor, IrError> {
        Ok(Tensor::I64(array_from_vec(shape, data)?))
    }

    pub fn from_bool(shape: &[usize], data: Vec<bool>) -> Result<Tensor, IrError> {
        Ok(Tensor::Bool(array_from_vec(shape, data)?))
    }

    pub fn as_f32(&self) -> Result<&ArrayD<f32>, IrError> {
        match self {
            Tensor::F32(a) => Ok(a),
            other => Err(IrError::DType { expected: DType::F32, found: other.dtype() }),
        }
    }

    pub fn as_i64(&self) -> Result<&ArrayD<i64>, IrError> {
        match self {
            Tensor::I64(a) => Ok(a),
            other => Err(IrError::DType { expected: DType::I64, found: other.dtype() }),
        }
    }

    pub fn as_bool(&self) -> Result<&ArrayD<bool>, IrError> {
        match self {
            Tensor::Bool(a) => Ok(a),
            other => Err(IrError::DType { expected: DType::Bool, found: other.dtype() }),
        }
    }

    /// Integer contents in row-major order: for shape, axes and index operands.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, IrError> {
        Ok(self.as_i64()?.iter().copied().collect())
    }

    /// The single value of a one-element integer tensor (scalar or `[1]`).
    pub fn to_i64_scalar(&self) -> Result<i64, IrError> {
        let values = self.to_i64_vec()?;
        match values.as_slice() {
            [v] => Ok(*v),
            _ => Err(IrError::Invalid(format!(
                "expected a single integer, found a tensor of shape {:?}",
                self.shape()
            ))),
        }
    }

    /// Row-major f32 contents, copying only when the layout is not already row-major.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, IrError> {
        Ok(self.as_f32()?.as_standard_layout().iter().copied().collect())
    }

    /// Converts element type as ONNX `Cast` does (float to int truncates toward zero).
    pub fn cast(&self, to: DType) -> Tensor {
        match (self, to) {
            (Tensor::F32(a), DType::F32) => Tensor::F32(a.clone()),
            (Tensor::F32(a), DType::I64) => Tensor::I64(a.mapv(|v| v as i64)),
            (Tensor::F32(a), DType::Bool) => Tensor::Bool(a.mapv(|v| v != 0.0)),
            (Tensor::I64(a), DType::F32) => Tensor::F32(a.mapv(|v| v as f32)),
            (Tensor::I64(a), DType::I64) => Tensor::I64(a.clone()),
            (Tensor::I64(a), DType::Bool) => Tensor::Bool(a.mapv(|v| v != 0)),
            (Tensor::Bool(a), DType::F32) => Tensor::F32(a.mapv(|v| v as u8 as f32)),
            (Tensor::Bool(a), DType::I64) => Tensor::I64(a.mapv(|v| v as i64)),
            (Tensor::Bool(a), DType::Bool) => Tensor::Bool(a.clone()),
        }
    }
}

fn array_from_vec<T>(shape: &[usize], data: Vec<T>) -> Result<ArrayD<T>, IrError> {
    let expected: usize = shape.iter().product();
    if expected != data.len() {
        return Err(IrError::Invalid(format!(
            "shape {shape:?} needs {expected} elements but {} were given",
            data.len()
        )));
    }
    ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| IrError::Invalid(e.to_string()))
}
