//! GELU, tanh approximation (GPT-2's `gelu_new`), as one op. ONNX exports spell it as eight
//! elementwise ops; `fhe_passes::fuse_gelu` replaces them with this one. One op instead of
//! eight means one pass over the data instead of eight, and a backward pass that keeps only
//! the input (24 MB per GPT-2-small layer at 2048 tokens) instead of four intermediates.

use fhe_ir::{op_common, persistent_op, DType, Fact, GradBuilder, IrError, Op, OutletId, Tensor};
use ndarray::{ArrayD, Zip};
use serde::{Deserialize, Serialize};

use crate::util::arity;

/// √(2/π), the constant of the tanh approximation.
pub const GELU_SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh approximation.
pub const GELU_CUBIC: f32 = 0.044_715;

#[inline]
fn inner_tanh(x: f32) -> f32 {
    (GELU_SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)).tanh()
}

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Gelu;
persistent_op!(Gelu, "Gelu");

impl Op for Gelu {
    op_common!();

    fn gradient(&self, g: &mut GradBuilder) -> Result<Vec<Option<OutletId>>, IrError> {
        if !g.needs_grad(0) {
            return Ok(vec![None]);
        }
        let up = g.required_grad(0)?;
        let x = g.input(0);
        Ok(vec![Some(g.add(GeluGrad, &[x, up])?)])
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 1, 1)?;
        Ok(vec![Fact::new(DType::F32, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 1, 1)?;
        let x = inputs[0].as_f32()?;
        let mut y = ArrayD::<f32>::zeros(x.shape());
        Zip::from(&mut y).and(x).par_for_each(|y, &x| *y = 0.5 * x * (1.0 + inner_tanh(x)));
        Ok(vec![Tensor::F32(y)])
    }
}

/// `GeluGrad(x, g) = g·gelu'(x)`.
#[derive(Debug, Serialize, Deserialize)]
pub struct GeluGrad;
persistent_op!(GeluGrad, "GeluGrad");

impl Op for GeluGrad {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 2)?;
        Ok(vec![Fact::new(DType::F32, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 2)?;
        let (x, g) = (inputs[0].as_f32()?, inputs[1].as_f32()?);
        let mut dx = ArrayD::<f32>::zeros(x.shape());
        Zip::from(&mut dx).and(x).and(g).par_for_each(|dx, &x, &g| {
            let t = inner_tanh(x);
            let slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
            *dx = g * slope;
        });
        Ok(vec![Tensor::F32(dx)])
    }
}
