//! Ops that only gradient rules create.

use fhe_ir::broadcast::normalize_axis;
use fhe_ir::{invalid, op_common, persistent_op, DType, Fact, IrError, Op, Tensor};
use ndarray::{ArrayD, Axis, IxDyn, Zip};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::util::{arity, reshape_array};
use crate::ReduceMean;

/// Sums a broadcast gradient back to the shape of the operand it was broadcast from:
/// `SumToShapeOf(g, x)` has `x`'s shape. The identity when the shapes already agree.
#[derive(Debug, Serialize, Deserialize)]
pub struct SumToShapeOf;
persistent_op!(SumToShapeOf, "SumToShapeOf");

pub fn sum_to_shape(g: &ArrayD<f32>, target: &[usize]) -> Result<ArrayD<f32>, IrError> {
    if g.shape() == target {
        return Ok(g.clone());
    }
    let extra = g.ndim().checked_sub(target.len()).ok_or_else(|| invalid!("cannot sum {:?} to the larger {target:?}", g.shape()))?;
    let mut out = g.clone();
    for _ in 0..extra {
        out = out.sum_axis(Axis(0));
    }
    for (axis, &d) in target.iter().enumerate() {
        if d == 1 && out.shape()[axis] != 1 {
            out = out.sum_axis(Axis(axis)).insert_axis(Axis(axis));
        } else if d != out.shape()[axis] {
            return Err(invalid!("cannot sum {:?} to {target:?}", g.shape()));
        }
    }
    Ok(out)
}

impl Op for SumToShapeOf {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 2)?;
        Ok(vec![Fact::new(inputs[0].dtype, inputs[1].shape.clone())])
    }

    fn is_identity(&self, inputs: &[&Fact]) -> bool {
        inputs.len() == 2 && inputs[0].shape == inputs[1].shape
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 2)?;
        Ok(vec![Tensor::F32(sum_to_shape(inputs[0].as_f32()?, inputs[1].shape())?)])
    }
}

/// `SoftmaxGrad(y, g) = y·(g − Σ g·y)` along the softmax axis.
#[derive(Debug, Serialize, Deserialize)]
pub struct SoftmaxGrad {
    pub axis: i64,
}
persistent_op!(SoftmaxGrad, "SoftmaxGrad");

impl Op for SoftmaxGrad {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 2)?;
        Ok(vec![Fact::new(DType::F32, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 2)?;
        let (y, g) = (inputs[0].as_f32()?, inputs[1].as_f32()?);
        let axis = Axis(normalize_axis(self.axis, y.ndim())?);
        let mut out = g.as_standard_layout().into_owned();
        Zip::from(out.lanes_mut(axis)).and(y.lanes(axis)).par_for_each(|mut g, y| {
            let dot: f32 = g.iter().zip(y.iter()).map(|(a, b)| a * b).sum();
            g.zip_mut_with(&y, |g, &y| *g = y * (*g - dot));
        });
        Ok(vec![Tensor::F32(out)])
    }
}

/// Input gradient of LayerNormalization: `LayerNormGrad(x, scale, g)`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LayerNormGrad {
    pub axis: i64,
    pub epsilon: f32,
}
persistent_op!(LayerNormGrad, "LayerNormGrad");

impl Op for LayerNormGrad {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 3, 3)?;
        Ok(vec![Fact::new(DType::F32, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 3, 3)?;
        let x = inputs[0].as_f32()?.as_standard_layout().into_owned();
        let scale = inputs[1].to_f32_vec()?;
        let g = inputs[2].as_f32()?.as_standard_layout().into_owned();
        let axis = normalize_axis(self.axis, x.ndim())?;
        let inner: usize = x.shape()[axis..].iter().product();
        if scale.len() != inner || g.shape() != x.shape() {
            return Err(invalid!("LayerNormGrad operands do not match"));
        }
        let mut out = ArrayD::<f32>::zeros(x.raw_dim());
        let eps = self.epsilon;
        if inner > 0 {
            let (xs, gs) = (x.as_slice().unwrap(), g.as_slice().unwrap());
            out.as_slice_mut().unwrap().par_chunks_mut(inner).enumerate().for_each(|(r, dx)| {
                let x = &xs[r * inner..(r + 1) * inner];
                let g = &gs[r * inner..(r + 1) * inner];
                let n = inner as f32;
                let mean = x.iter().sum::<f32>() / n;
                let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
                let inv = 1.0 / (var + eps).sqrt();
                let (mut sum_d, mut sum_dx) = (0.0f32, 0.0f32);
                for i in 0..inner {
                    let d = g[i] * scale[i];
                    sum_d += d;
                    sum_dx += d * (x[i] - mean) * inv;
                }
                for i in 0..inner {
                    let xhat = (x[i] - mean) * inv;
                    dx[i] = inv / n * (n * g[i] * scale[i] - sum_d - xhat * sum_dx);
                }
            });
        }
        Ok(vec![Tensor::F32(out)])
    }
}

/// Input gradient of ReduceMean: `ReduceMeanGrad(g, x, [axes])` spreads `g` evenly back over
/// the reduced axes of `x`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReduceMeanGrad {
    pub of: ReduceMean,
}
persistent_op!(ReduceMeanGrad, "ReduceMeanGrad");

impl Op for ReduceMeanGrad {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 3)?;
        Ok(vec![Fact::new(DType::F32, inputs[1].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 3)?;
        let (g, x_shape) = (inputs[0].as_f32()?, inputs[1].shape());
        let operand = inputs.get(2).map(|t| t.to_i64_vec()).transpose()?;
        let axes = self.of.reduced_axes(x_shape.len(), operand)?;
        let kept: Vec<usize> = x_shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
        let count: usize = axes.iter().map(|&a| x_shape[a]).product();
        let g = reshape_array(g, &kept)?;
        let spread = g.broadcast(IxDyn(x_shape)).ok_or_else(|| invalid!("cannot spread {kept:?} over {x_shape:?}"))?;
        Ok(vec![Tensor::F32(spread.mapv(|v| v / count.max(1) as f32))])
    }
}
