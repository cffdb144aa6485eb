//! fhe-ops-linear: frozen linear layers and the server-call boundary.
//!
//! Before partitioning, a frozen layer is `FrozenLinear(x, W)`: `x·W` forward, `g·Wᵀ` as
//! its own gradient, computed in clear with the weight attached. Partitioning rewrites each
//! one into `Seal → Apply → Open`: the weight leaves the client graph, the apply stage runs
//! on the server, and the executor hands all three stages to a linear backend.

use fhe_ir::{
    invalid, op_common, persistent_op, DType, Direction, Fact, GradBuilder, IrError, LayerId, LinearCall, Op, OutletId, Placement,
    Registry, Stage, Tensor,
};
use serde::{Deserialize, Serialize};

/// `x·W` (forward) or `g·Wᵀ` (backward) for layer `layer`, operands `(x, W)`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct FrozenLinear {
    pub layer: LayerId,
    pub direction: Direction,
}
persistent_op!(FrozenLinear, "FrozenLinear");

/// Output width of `x·W` or `g·Wᵀ` for a weight of shape `[in, out]`.
fn output_width(direction: Direction, weight: &[usize], input: &[usize]) -> Result<usize, IrError> {
    let (rows, cols) = match weight {
        [r, c] => (*r, *c),
        _ => return Err(invalid!("a frozen weight must be a matrix, found {weight:?}")),
    };
    let (expect, width) = match direction {
        Direction::Forward => (rows, cols),
        Direction::Backward => (cols, rows),
    };
    if input.last() != Some(&expect) {
        return Err(invalid!("{direction} input {input:?} does not fit weight {weight:?}"));
    }
    Ok(width)
}

impl Op for FrozenLinear {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        if inputs.len() != 2 {
            return Err(invalid!("FrozenLinear takes (x, W)"));
        }
        let width = output_width(self.direction, &inputs[1].shape, &inputs[0].shape)?;
        let mut shape = inputs[0].shape.clone();
        *shape.last_mut().expect("checked") = width;
        Ok(vec![Fact::new(DType::F32, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        if inputs.len() != 2 {
            return Err(invalid!("FrozenLinear takes (x, W)"));
        }
        let transpose = self.direction == Direction::Backward;
        Ok(vec![Tensor::F32(fhe_ops_std::matmul(inputs[0].as_f32()?, inputs[1].as_f32()?, false, transpose)?)])
    }

    fn gradient(&self, g: &mut GradBuilder) -> Result<Vec<Option<OutletId>>, IrError> {
        if self.direction == Direction::Backward || g.needs_grad(1) {
            return Err(invalid!("frozen layers have no weight gradient and no second derivative"));
        }
        if !g.needs_grad(0) {
            return Ok(vec![None, None]);
        }
        let up = g.required_grad(0)?;
        let weight = g.input(1);
        let grad = g.add(FrozenLinear { layer: self.layer, direction: Direction::Backward }, &[up, weight])?;
        Ok(vec![Some(grad), None])
    }
}

/// One stage of a server call for a layer whose matrix maps `in_features` to
/// `out_features` in this call's direction.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ServerCall {
    pub layer: LayerId,
    pub direction: Direction,
    pub stage: Stage,
    pub in_features: usize,
    pub out_features: usize,
}
persistent_op!(ServerCall, "ServerCall");

impl ServerCall {
    pub fn call(&self) -> LinearCall {
        LinearCall { layer: self.layer, direction: self.direction, stage: self.stage }
    }
}

impl Op for ServerCall {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        let [x] = inputs else { return Err(invalid!("a server call stage takes one operand")) };
        let expected = if self.stage == Stage::Open { self.out_features } else { self.in_features };
        if x.rank() != 2 || x.shape[1] != expected {
            return Err(invalid!("{} {:?} stage expects [tokens, {expected}], found {:?}", self.direction, self.stage, x.shape));
        }
        let width = if self.stage == Stage::Apply { self.out_features } else { expected };
        Ok(vec![Fact::new(DType::F32, vec![x.shape[0], width])])
    }

    fn eval(&self, _inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        Err(invalid!("a server call stage runs through a linear backend, not in clear"))
    }

    fn placement(&self) -> Placement {
        if self.stage == Stage::Apply {
            Placement::Server
        } else {
            Placement::Client
        }
    }

    fn linear_call(&self) -> Option<LinearCall> {
        Some(self.call())
    }
}

pub fn register_all(registry: &mut Registry) {
    registry.register_op::<FrozenLinear>();
    registry.register_op::<ServerCall>();
}
