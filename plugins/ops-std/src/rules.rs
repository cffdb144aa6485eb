//! Gradient rules of the standard ops. Each returns one entry per forward input: the
//! outlet of its gradient, or `None` where none is needed or none exists.

use fhe_ir::{invalid, DType, GradBuilder, IrError, OutletId, Tensor};

use crate::grad_ops::{LayerNormGrad, ReduceMeanGrad, SoftmaxGrad, SumToShapeOf};
use crate::*;

type Grads = Result<Vec<Option<OutletId>>, IrError>;

fn scalar(g: &mut GradBuilder, v: f32) -> OutletId {
    g.constant(Tensor::from_f32(&[], vec![v]).expect("scalar"))
}

fn bin(g: &mut GradBuilder, f: BinaryFn, a: OutletId, b: OutletId) -> Result<OutletId, IrError> {
    g.add(Binary { f }, &[a, b])
}

/// Sums `grad` back to the shape of forward input `i` (undoing broadcasting).
fn to_input(g: &mut GradBuilder, grad: OutletId, i: usize) -> Result<Option<OutletId>, IrError> {
    let x = g.input(i);
    Ok(Some(g.add(SumToShapeOf, &[grad, x])?))
}

fn not_differentiable(g: &GradBuilder, what: &str) -> Grads {
    if (0..g.n_inputs()).any(|i| g.needs_grad(i)) {
        return Err(invalid!("{what} has no gradient rule"));
    }
    Ok(vec![None; g.n_inputs()])
}

pub fn binary(f: BinaryFn, g: &mut GradBuilder) -> Grads {
    let up = g.required_grad(0)?;
    let (a, b, y) = (g.input(0), g.input(1), g.output(0));
    let mut out = vec![None, None];
    if g.needs_grad(0) {
        let ga = match f {
            BinaryFn::Add | BinaryFn::Sub => up,
            BinaryFn::Mul => bin(g, BinaryFn::Mul, up, b)?,
            BinaryFn::Div => bin(g, BinaryFn::Div, up, b)?,
            BinaryFn::Pow => {
                // d(a^b)/da = b·a^(b−1)
                let one = scalar(g, 1.0);
                let b_minus_one = bin(g, BinaryFn::Sub, b, one)?;
                let a_pow = bin(g, BinaryFn::Pow, a, b_minus_one)?;
                let slope = bin(g, BinaryFn::Mul, b, a_pow)?;
                bin(g, BinaryFn::Mul, up, slope)?
            }
        };
        out[0] = to_input(g, ga, 0)?;
    }
    if g.needs_grad(1) {
        let gb = match f {
            BinaryFn::Add => up,
            BinaryFn::Sub => g.add(Unary { f: UnaryFn::Neg }, &[up])?,
            BinaryFn::Mul => bin(g, BinaryFn::Mul, up, a)?,
            BinaryFn::Div => {
                // d(a/b)/db = −y/b
                let y_over_b = bin(g, BinaryFn::Div, y, b)?;
                let t = bin(g, BinaryFn::Mul, up, y_over_b)?;
                g.add(Unary { f: UnaryFn::Neg }, &[t])?
            }
            BinaryFn::Pow => return Err(invalid!("the gradient of Pow with respect to its exponent is not supported")),
        };
        out[1] = to_input(g, gb, 1)?;
    }
    Ok(out)
}

pub fn unary(f: UnaryFn, g: &mut GradBuilder) -> Grads {
    if !g.needs_grad(0) {
        return Ok(vec![None]);
    }
    let up = g.required_grad(0)?;
    let (x, y) = (g.input(0), g.output(0));
    let grad = match f {
        UnaryFn::Tanh => {
            let y2 = bin(g, BinaryFn::Mul, y, y)?;
            let one = scalar(g, 1.0);
            let slope = bin(g, BinaryFn::Sub, one, y2)?;
            bin(g, BinaryFn::Mul, up, slope)?
        }
        UnaryFn::Neg => g.add(Unary { f: UnaryFn::Neg }, &[up])?,
        UnaryFn::Exp => bin(g, BinaryFn::Mul, up, y)?,
        UnaryFn::Sqrt => {
            let two = scalar(g, 2.0);
            let twice = bin(g, BinaryFn::Mul, two, y)?;
            bin(g, BinaryFn::Div, up, twice)?
        }
        UnaryFn::Reciprocal => {
            let y2 = bin(g, BinaryFn::Mul, y, y)?;
            let t = bin(g, BinaryFn::Mul, up, y2)?;
            g.add(Unary { f: UnaryFn::Neg }, &[t])?
        }
        UnaryFn::Relu => {
            let zero = scalar(g, 0.0);
            let positive = g.add(Compare { f: CompareFn::Greater }, &[x, zero])?;
            let mask = g.add(Cast { to: DType::F32 }, &[positive])?;
            bin(g, BinaryFn::Mul, up, mask)?
        }
        UnaryFn::Not => return not_differentiable(g, "Not"),
    };
    Ok(vec![Some(grad)])
}

pub fn where_(g: &mut GradBuilder) -> Grads {
    let up = g.required_grad(0)?;
    let cond = g.input(0);
    let mut out = vec![None, None, None];
    for (i, taken_when_true) in [(1, true), (2, false)] {
        if g.needs_grad(i) {
            let zero = scalar(g, 0.0);
            let (x, y) = if taken_when_true { (up, zero) } else { (zero, up) };
            let picked = g.add(Where, &[cond, x, y])?;
            out[i] = to_input(g, picked, i)?;
        }
    }
    Ok(out)
}

pub fn cast(to: DType, g: &mut GradBuilder) -> Grads {
    if !g.needs_grad(0) {
        return Ok(vec![None]);
    }
    if to != DType::F32 {
        return not_differentiable(g, "a cast to a non-float type");
    }
    Ok(vec![Some(g.required_grad(0)?)])
}

/// Reshape-like ops (Reshape, Squeeze, Unsqueeze): the gradient takes the input's shape back.
pub fn reshape_back(g: &mut GradBuilder) -> Grads {
    let mut out = vec![None; g.n_inputs()];
    if g.needs_grad(0) {
        let up = g.required_grad(0)?;
        let x = g.input(0);
        let shape = g.add(ShapeOf { start: 0, end: None }, &[x])?;
        out[0] = Some(g.add(Reshape { allowzero: true }, &[up, shape])?);
    }
    Ok(out)
}

pub fn transpose(perm: Option<Vec<usize>>, g: &mut GradBuilder) -> Grads {
    if !g.needs_grad(0) {
        return Ok(vec![None]);
    }
    let up = g.required_grad(0)?;
    // Without a perm the axes are reversed, which is its own inverse.
    let inverse = perm.map(|perm| {
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        inverse
    });
    Ok(vec![Some(g.add(Transpose { perm: inverse }, &[up])?)])
}

pub fn split(axis: i64, outputs: usize, g: &mut GradBuilder) -> Grads {
    let mut out = vec![None; g.n_inputs()];
    if g.needs_grad(0) {
        let mut parts = Vec::with_capacity(outputs);
        for k in 0..outputs {
            let part = match g.grad(k) {
                Some(grad) => grad,
                None => {
                    // No gradient reaches this part: it contributes zeros of its shape.
                    let y = g.output(k);
                    let shape = g.add(ShapeOf { start: 0, end: None }, &[y])?;
                    g.add(ConstantOfShape { value: Scalar::F32(0.0) }, &[shape])?
                }
            };
            parts.push(part);
        }
        out[0] = Some(g.add(Concat { axis }, &parts)?);
    }
    Ok(out)
}

pub fn matmul(m: MatMul, g: &mut GradBuilder) -> Grads {
    let up = g.required_grad(0)?;
    let (a, b) = (g.input(0), g.input(1));
    let (ta, tb) = (m.transpose_a, m.transpose_b);
    let mut out = vec![None, None];
    if g.needs_grad(0) {
        // y = op(a)·op(b): grad op(a) = g·op(b)ᵀ
        let ga = if ta {
            g.add(MatMul { transpose_a: tb, transpose_b: true }, &[b, up])?
        } else {
            g.add(MatMul { transpose_a: false, transpose_b: !tb }, &[up, b])?
        };
        out[0] = to_input(g, ga, 0)?;
    }
    if g.needs_grad(1) {
        // grad op(b) = op(a)ᵀ·g
        let gb = if tb {
            g.add(MatMul { transpose_a: true, transpose_b: ta }, &[up, a])?
        } else {
            g.add(MatMul { transpose_a: !ta, transpose_b: false }, &[a, up])?
        };
        out[1] = to_input(g, gb, 1)?;
    }
    Ok(out)
}

pub fn softmax(axis: i64, g: &mut GradBuilder) -> Grads {
    if !g.needs_grad(0) {
        return Ok(vec![None]);
    }
    let up = g.required_grad(0)?;
    let y = g.output(0);
    Ok(vec![Some(g.add(SoftmaxGrad { axis }, &[y, up])?)])
}

pub fn layer_norm(op: &LayerNorm, g: &mut GradBuilder) -> Grads {
    if (1..g.n_inputs()).any(|i| g.needs_grad(i)) {
        return Err(invalid!("gradients of LayerNormalization's scale and bias are not supported (they are frozen)"));
    }
    let mut out = vec![None; g.n_inputs()];
    if g.needs_grad(0) {
        let up = g.required_grad(0)?;
        let (x, scale) = (g.input(0), g.input(1));
        out[0] = Some(g.add(LayerNormGrad { axis: op.axis, epsilon: op.epsilon }, &[x, scale, up])?);
    }
    Ok(out)
}

pub fn reduce_mean(op: &ReduceMean, g: &mut GradBuilder) -> Grads {
    let mut out = vec![None; g.n_inputs()];
    if g.needs_grad(0) {
        let up = g.required_grad(0)?;
        let mut operands = vec![up, g.input(0)];
        if g.n_inputs() == 2 {
            operands.push(g.input(1));
        }
        out[0] = Some(g.add(ReduceMeanGrad { of: op.clone() }, &operands)?);
    }
    Ok(out)
}

/// Ops without a gradient rule. Refuses only when one of `data` (the operands that carry
/// float values) needs a gradient: integer operands (shapes, indices, bounds) never carry one,
/// even when they were computed from trainable values.
pub fn none_needed(g: &mut GradBuilder, data: &[usize], what: &str) -> Grads {
    if data.iter().any(|&i| g.needs_grad(i)) {
        return Err(invalid!("{what} has no gradient rule"));
    }
    Ok(vec![None; g.n_inputs()])
}
