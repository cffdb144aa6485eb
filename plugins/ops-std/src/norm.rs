//! Normalizations and reductions: Softmax, LayerNormalization, ReduceMean.

use fhe_ir::broadcast::normalize_axis;
use fhe_ir::{invalid, op_common, persistent_op, DType, Fact, IrError, Op, Tensor};
use ndarray::{ArrayD, Axis, Zip};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::util::{arity, konst, normalize_axes};

fn f32_only(fact: &Fact, op: &str) -> Result<(), IrError> {
    if fact.dtype != DType::F32 {
        return Err(invalid!("{op} is supported on f32 only, found {}", fact.dtype));
    }
    Ok(())
}

/// ONNX `Softmax` (opset 13+): normalizes along one axis.
#[derive(Debug, Serialize, Deserialize)]
pub struct Softmax {
    pub axis: i64,
}
persistent_op!(Softmax, "Softmax");

fn softmax_lane(mut lane: ndarray::ArrayViewMut1<f32>) {
    let max = lane.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    lane.mapv_inplace(|v| {
        let e = (v - max).exp();
        sum += e;
        e
    });
    lane.mapv_inplace(|v| v / sum);
}

impl Op for Softmax {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::softmax(self.axis, g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 1, 1)?;
        f32_only(inputs[0], "Softmax")?;
        normalize_axis(self.axis, inputs[0].rank())?;
        Ok(vec![Fact::new(DType::F32, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 1, 1)?;
        let x = inputs[0].as_f32()?;
        let axis = normalize_axis(self.axis, x.ndim())?;
        let mut out = x.as_standard_layout().into_owned();
        Zip::from(out.lanes_mut(Axis(axis))).par_for_each(softmax_lane);
        Ok(vec![Tensor::F32(out)])
    }
}

/// ONNX `LayerNormalization` (opset 17): normalizes over the axes from `axis` to the end.
#[derive(Debug, Serialize, Deserialize)]
pub struct LayerNorm {
    pub axis: i64,
    pub epsilon: f32,
}
persistent_op!(LayerNorm, "LayerNorm");

impl LayerNorm {
    /// Number of elements normalized together.
    fn inner(&self, shape: &[usize]) -> Result<usize, IrError> {
        let axis = normalize_axis(self.axis, shape.len())?;
        Ok(shape[axis..].iter().product())
    }
}

impl Op for LayerNorm {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::layer_norm(self, g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 3)?;
        for f in inputs {
            f32_only(f, "LayerNormalization")?;
        }
        let inner = self.inner(&inputs[0].shape)?;
        for (f, what) in inputs[1..].iter().zip(["scale", "bias"]) {
            let n: usize = f.shape.iter().product();
            if n != inner {
                return Err(invalid!("{what} has {n} elements but each normalized group has {inner}"));
            }
        }
        Ok(vec![Fact::new(DType::F32, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 3)?;
        let x = inputs[0].as_f32()?;
        let inner = self.inner(x.shape())?;
        let scale = inputs[1].to_f32_vec()?;
        let bias = match inputs.get(2) {
            Some(b) => b.to_f32_vec()?,
            None => vec![0.0; inner],
        };
        if scale.len() != inner || bias.len() != inner {
            return Err(invalid!("scale and bias must have {inner} elements"));
        }
        let mut out = x.as_standard_layout().into_owned();
        let eps = self.epsilon;
        if inner > 0 {
            let data = out.as_slice_mut().expect("standard layout");
            data.par_chunks_mut(inner).for_each(|row| {
                let n = row.len() as f32;
                let mean = row.iter().sum::<f32>() / n;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
                let inv = 1.0 / (var + eps).sqrt();
                for ((v, s), b) in row.iter_mut().zip(&scale).zip(&bias) {
                    *v = (*v - mean) * inv * s + b;
                }
            });
        }
        Ok(vec![Tensor::F32(out)])
    }
}

/// ONNX `ReduceMean`: axes from an attribute (before opset 18) or an operand (18+).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReduceMean {
    pub axes: Option<Vec<i64>>,
    pub keepdims: bool,
    pub noop_with_empty_axes: bool,
}
persistent_op!(ReduceMean, "ReduceMean");

impl ReduceMean {
    /// The normalized axes to reduce, ascending.
    pub(crate) fn reduced_axes(&self, rank: usize, operand: Option<Vec<i64>>) -> Result<Vec<usize>, IrError> {
        let axes = self.axes.clone().or(operand).unwrap_or_default();
        let mut axes = if axes.is_empty() {
            if self.noop_with_empty_axes { vec![] } else { (0..rank).collect() }
        } else {
            normalize_axes(&axes, rank)?
        };
        axes.sort_unstable();
        Ok(axes)
    }

    fn shape(&self, shape: &[usize], axes: &[usize]) -> Vec<usize> {
        shape
            .iter()
            .enumerate()
            .filter_map(|(i, &d)| match (axes.contains(&i), self.keepdims) {
                (false, _) => Some(d),
                (true, true) => Some(1),
                (true, false) => None,
            })
            .collect()
    }
}

impl Op for ReduceMean {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::reduce_mean(self, g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 1, 2)?;
        f32_only(inputs[0], "ReduceMean")?;
        let operand = inputs.get(1).map(|f| konst(f, "axes")?.to_i64_vec()).transpose()?;
        let axes = self.reduced_axes(inputs[0].rank(), operand)?;
        Ok(vec![Fact::new(DType::F32, self.shape(&inputs[0].shape, &axes))])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 1, 2)?;
        let x = inputs[0].as_f32()?;
        let operand = inputs.get(1).map(|t| t.to_i64_vec()).transpose()?;
        let axes = self.reduced_axes(x.ndim(), operand)?;
        let mut out: ArrayD<f32> = x.clone();
        for &axis in axes.iter().rev() {
            let n = out.shape()[axis] as f32;
            out = out.sum_axis(Axis(axis)).mapv(|v| v / n);
        }
        let shape = self.shape(x.shape(), &axes);
        Ok(vec![Tensor::F32(crate::util::reshape_array(&out, &shape)?)])
    }
}
