//! Element-wise ops with numpy broadcasting: arithmetic, comparisons, unary math, Where, Cast.

use fhe_ir::broadcast::broadcast_shapes;
use fhe_ir::{invalid, op_common, persistent_op, DType, Fact, IrError, Op, Tensor};
use ndarray::{ArrayD, IxDyn, Zip};
use serde::{Deserialize, Serialize};

use crate::util::arity;

fn zip2<A: Copy, B: Copy, C>(a: &ArrayD<A>, b: &ArrayD<B>, f: impl Fn(A, B) -> C) -> Result<ArrayD<C>, IrError> {
    let shape = IxDyn(&broadcast_shapes(&[a.shape(), b.shape()])?);
    let (a, b) = (a.broadcast(shape.clone()).unwrap(), b.broadcast(shape).unwrap());
    Ok(Zip::from(&a).and(&b).map_collect(|&x, &y| f(x, y)))
}

fn same_dtype(facts: &[&Fact]) -> Result<DType, IrError> {
    let dtype = facts[0].dtype;
    if let Some(other) = facts.iter().find(|f| f.dtype != dtype) {
        return Err(invalid!("operands have different element types ({dtype} and {})", other.dtype));
    }
    Ok(dtype)
}

fn broadcast_facts(facts: &[&Fact]) -> Result<Vec<usize>, IrError> {
    let shapes: Vec<&[usize]> = facts.iter().map(|f| f.shape.as_slice()).collect();
    broadcast_shapes(&shapes)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BinaryFn {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
}

/// Broadcasting arithmetic. `Pow` allows an exponent of another numeric type.
#[derive(Debug, Serialize, Deserialize)]
pub struct Binary {
    pub f: BinaryFn,
}
persistent_op!(Binary, "Binary");

fn pow(x: f32, y: f32) -> f32 {
    // GELU and decomposed LayerNorm use small integer exponents; keep those exact and fast.
    if y == 2.0 {
        x * x
    } else if y == 3.0 {
        x * x * x
    } else {
        x.powf(y)
    }
}

impl Op for Binary {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::binary(self.f, g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 2)?;
        let dtype = if self.f == BinaryFn::Pow { inputs[0].dtype } else { same_dtype(inputs)? };
        if dtype == DType::Bool {
            return Err(invalid!("arithmetic on bool tensors is not supported"));
        }
        Ok(vec![Fact::new(dtype, broadcast_facts(inputs)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 2)?;
        let out = match (inputs[0], inputs[1], self.f) {
            (Tensor::F32(a), Tensor::F32(b), f) => Tensor::F32(match f {
                BinaryFn::Add => zip2(a, b, |x, y| x + y)?,
                BinaryFn::Sub => zip2(a, b, |x, y| x - y)?,
                BinaryFn::Mul => zip2(a, b, |x, y| x * y)?,
                BinaryFn::Div => zip2(a, b, |x, y| x / y)?,
                BinaryFn::Pow => zip2(a, b, pow)?,
            }),
            (Tensor::F32(a), Tensor::I64(b), BinaryFn::Pow) => Tensor::F32(zip2(a, b, |x, y| pow(x, y as f32))?),
            (Tensor::I64(a), Tensor::I64(b), f) => Tensor::I64(match f {
                BinaryFn::Add => zip2(a, b, i64::wrapping_add)?,
                BinaryFn::Sub => zip2(a, b, i64::wrapping_sub)?,
                BinaryFn::Mul => zip2(a, b, i64::wrapping_mul)?,
                BinaryFn::Div => {
                    if b.iter().any(|&v| v == 0) {
                        return Err(invalid!("integer division by zero"));
                    }
                    zip2(a, b, i64::wrapping_div)?
                }
                BinaryFn::Pow => zip2(a, b, |x, y| x.wrapping_pow(y.clamp(0, u32::MAX as i64) as u32))?,
            }),
            (a, b, f) => return Err(invalid!("{f:?} of {} and {} is not supported", a.dtype(), b.dtype())),
        };
        Ok(vec![out])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareFn {
    Equal,
    Less,
    Greater,
}

/// Broadcasting comparison, giving a bool tensor.
#[derive(Debug, Serialize, Deserialize)]
pub struct Compare {
    pub f: CompareFn,
}
persistent_op!(Compare, "Compare");

fn compare<T: Copy + PartialOrd>(f: CompareFn, a: &ArrayD<T>, b: &ArrayD<T>) -> Result<ArrayD<bool>, IrError> {
    match f {
        CompareFn::Equal => zip2(a, b, |x, y| x == y),
        CompareFn::Less => zip2(a, b, |x, y| x < y),
        CompareFn::Greater => zip2(a, b, |x, y| x > y),
    }
}

impl Op for Compare {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::none_needed(g, &[], "a comparison")
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 2)?;
        same_dtype(inputs)?;
        Ok(vec![Fact::new(DType::Bool, broadcast_facts(inputs)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 2)?;
        let out = match (inputs[0], inputs[1]) {
            (Tensor::F32(a), Tensor::F32(b)) => compare(self.f, a, b)?,
            (Tensor::I64(a), Tensor::I64(b)) => compare(self.f, a, b)?,
            (Tensor::Bool(a), Tensor::Bool(b)) => compare(self.f, a, b)?,
            (a, b) => return Err(invalid!("cannot compare {} with {}", a.dtype(), b.dtype())),
        };
        Ok(vec![Tensor::Bool(out)])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnaryFn {
    Tanh,
    Sqrt,
    Exp,
    Neg,
    Reciprocal,
    Relu,
    Not,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Unary {
    pub f: UnaryFn,
}
persistent_op!(Unary, "Unary");

impl Op for Unary {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::unary(self.f, g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 1, 1)?;
        let ok = match self.f {
            UnaryFn::Not => inputs[0].dtype == DType::Bool,
            UnaryFn::Neg => inputs[0].dtype != DType::Bool,
            _ => inputs[0].dtype == DType::F32,
        };
        if !ok {
            return Err(invalid!("{:?} of a {} tensor is not supported", self.f, inputs[0].dtype));
        }
        Ok(vec![Fact::new(inputs[0].dtype, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 1, 1)?;
        let out = match (self.f, inputs[0]) {
            (UnaryFn::Tanh, Tensor::F32(a)) => Tensor::F32(a.mapv(f32::tanh)),
            (UnaryFn::Sqrt, Tensor::F32(a)) => Tensor::F32(a.mapv(f32::sqrt)),
            (UnaryFn::Exp, Tensor::F32(a)) => Tensor::F32(a.mapv(f32::exp)),
            (UnaryFn::Neg, Tensor::F32(a)) => Tensor::F32(a.mapv(|v| -v)),
            (UnaryFn::Neg, Tensor::I64(a)) => Tensor::I64(a.mapv(i64::wrapping_neg)),
            (UnaryFn::Reciprocal, Tensor::F32(a)) => Tensor::F32(a.mapv(f32::recip)),
            (UnaryFn::Relu, Tensor::F32(a)) => Tensor::F32(a.mapv(|v| v.max(0.0))),
            (UnaryFn::Not, Tensor::Bool(a)) => Tensor::Bool(a.mapv(|v| !v)),
            (f, t) => return Err(invalid!("{f:?} of a {} tensor is not supported", t.dtype())),
        };
        Ok(vec![out])
    }
}

/// `Where(cond, x, y)`: x where cond holds, else y, all three broadcast.
#[derive(Debug, Serialize, Deserialize)]
pub struct Where;
persistent_op!(Where, "Where");

fn select<T: Copy>(c: &ArrayD<bool>, x: &ArrayD<T>, y: &ArrayD<T>) -> Result<ArrayD<T>, IrError> {
    let shape = IxDyn(&broadcast_shapes(&[c.shape(), x.shape(), y.shape()])?);
    let (c, x, y) = (c.broadcast(shape.clone()).unwrap(), x.broadcast(shape.clone()).unwrap(), y.broadcast(shape).unwrap());
    Ok(Zip::from(&c).and(&x).and(&y).map_collect(|&c, &x, &y| if c { x } else { y }))
}

impl Op for Where {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::where_(g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 3, 3)?;
        if inputs[0].dtype != DType::Bool {
            return Err(invalid!("the condition must be bool, found {}", inputs[0].dtype));
        }
        let dtype = same_dtype(&inputs[1..])?;
        Ok(vec![Fact::new(dtype, broadcast_facts(inputs)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 3, 3)?;
        let c = inputs[0].as_bool()?;
        let out = match (inputs[1], inputs[2]) {
            (Tensor::F32(x), Tensor::F32(y)) => Tensor::F32(select(c, x, y)?),
            (Tensor::I64(x), Tensor::I64(y)) => Tensor::I64(select(c, x, y)?),
            (Tensor::Bool(x), Tensor::Bool(y)) => Tensor::Bool(select(c, x, y)?),
            (x, y) => return Err(invalid!("operands have different element types ({} and {})", x.dtype(), y.dtype())),
        };
        Ok(vec![out])
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Cast {
    pub to: DType,
}
persistent_op!(Cast, "Cast");

impl Op for Cast {
    op_common!();

    /// A cast to the type a value already has (GPT-2 casts attention weights to the value's
    /// type) is dropped when shapes are fixed, rather than copying the tensor and keeping a
    /// second copy alive for the backward pass.
    fn is_identity(&self, inputs: &[&Fact]) -> bool {
        inputs.len() == 1 && inputs[0].dtype == self.to
    }

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::cast(self.to, g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 1, 1)?;
        Ok(vec![Fact::new(self.to, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 1, 1)?;
        Ok(vec![inputs[0].cast(self.to)])
    }
}
