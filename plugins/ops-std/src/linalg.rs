//! Matrix products on the `gemm` crate (runtime-dispatched SIMD, rayon threads).

use fhe_ir::broadcast::broadcast_shapes;
use fhe_ir::{invalid, op_common, persistent_op, DType, Fact, IrError, Op, Tensor};
use gemm::Parallelism;
use ndarray::{ArrayD, ArrayViewD, IxDyn};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::util::{arity, SendPtr};

/// A strided matrix operand: base pointer, row stride, column stride (in elements).
#[derive(Clone, Copy)]
struct MatRef {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl MatRef {
    fn of(view: &ArrayViewD<f32>, batch_offset: isize) -> MatRef {
        let s = view.strides();
        let r = s.len();
        // SAFETY: the caller computes offsets within the view's extent.
        MatRef { ptr: unsafe { view.as_ptr().offset(batch_offset) }, rs: s[r - 2], cs: s[r - 1] }
    }

    fn transposed(self) -> MatRef {
        MatRef { rs: self.cs, cs: self.rs, ..self }
    }
}

/// `dst = dst_scale·dst + alpha·lhs·rhs` for an m×n row-major `dst`.
///
/// SAFETY: pointers and strides must describe valid m×k, k×n and m×n matrices.
unsafe fn gemm_into(dst: *mut f32, m: usize, n: usize, k: usize, lhs: MatRef, rhs: MatRef, accumulate: bool, alpha: f32, par: Parallelism) {
    gemm::gemm(
        m, n, k, dst, 1, n as isize, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, 1.0, alpha, false, false, false, par,
    );
}

fn threads(flops: usize) -> Parallelism {
    // Thread start-up costs more than small products gain.
    if flops < 1 << 20 {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// Offset in elements of the matrix at row-major batch index `b` of a broadcast view.
fn batch_offset(batch_shape: &[usize], strides: &[isize], mut b: usize) -> isize {
    let mut offset = 0;
    for (d, &size) in batch_shape.iter().enumerate().rev() {
        offset += (b % size) as isize * strides[d];
        b /= size;
    }
    offset
}

/// ONNX `MatMul` on f32 (numpy semantics, batch dimensions broadcast), optionally with
/// either operand's last two axes swapped — free, through strides. The flags let tied
/// weights be shared and let gradients avoid materialized transposes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct MatMul {
    #[serde(default)]
    pub transpose_a: bool,
    #[serde(default)]
    pub transpose_b: bool,
}
persistent_op!(MatMul, "MatMul");

/// Shapes as matrices: (batch shape, m, k, n, output shape).
fn matmul_shapes(a: &[usize], b: &[usize], ta: bool, tb: bool) -> Result<(Vec<usize>, usize, usize, usize, Vec<usize>), IrError> {
    if a.len() < 2 || b.len() < 2 {
        return Err(invalid!("MatMul operands must have rank 2 or more, found {a:?} and {b:?}"));
    }
    let (ar, ac) = (a[a.len() - 2], a[a.len() - 1]);
    let (br, bc) = (b[b.len() - 2], b[b.len() - 1]);
    let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
    let (k2, n) = if tb { (bc, br) } else { (br, bc) };
    if k != k2 {
        return Err(invalid!("MatMul inner dimensions differ: {a:?} × {b:?}"));
    }
    let batch = broadcast_shapes(&[&a[..a.len() - 2], &b[..b.len() - 2]])?;
    let out = [batch.as_slice(), &[m, n]].concat();
    Ok((batch, m, k, n, out))
}

/// `op(a)·op(b)` where `op` swaps the last two axes when its flag is set.
pub fn matmul(a: &ArrayD<f32>, b: &ArrayD<f32>, ta: bool, tb: bool) -> Result<ArrayD<f32>, IrError> {
    let (batch, m, k, n, out_shape) = matmul_shapes(a.shape(), b.shape(), ta, tb)?;
    let mut out = ArrayD::<f32>::zeros(IxDyn(&out_shape));
    let batches: usize = batch.iter().product();
    let dst = SendPtr(out.as_mut_ptr());
    if b.ndim() == 2 && a.is_standard_layout() && !ta {
        // A weight matrix: all batch rows of `a` form one tall matrix, one big product.
        let rows = batches * m;
        let lhs = MatRef { ptr: a.as_ptr(), rs: k as isize, cs: 1 };
        let rhs = MatRef::of(&b.view(), 0);
        let rhs = if tb { rhs.transposed() } else { rhs };
        unsafe { gemm_into(dst.get(), rows, n, k, lhs, rhs, false, 1.0, threads(rows * n * k)) };
        return Ok(out);
    }
    let a_last = &a.shape()[a.ndim() - 2..];
    let b_last = &b.shape()[b.ndim() - 2..];
    let a_full = a.broadcast(IxDyn(&[batch.as_slice(), a_last].concat())).unwrap();
    let b_full = b.broadcast(IxDyn(&[batch.as_slice(), b_last].concat())).unwrap();
    let (a_ptr, b_ptr) = (SendPtr(a_full.as_ptr() as *mut f32), SendPtr(b_full.as_ptr() as *mut f32));
    let (a_strides, b_strides) = (a_full.strides().to_vec(), b_full.strides().to_vec());
    let (mut ar, mut ac, mut br, mut bc) = (a_strides[batch.len()], a_strides[batch.len() + 1], b_strides[batch.len()], b_strides[batch.len() + 1]);
    if ta {
        std::mem::swap(&mut ar, &mut ac);
    }
    if tb {
        std::mem::swap(&mut br, &mut bc);
    }
    let per_batch = |i: usize, par: Parallelism| {
        let lhs = MatRef { ptr: unsafe { a_ptr.get().offset(batch_offset(&batch, &a_strides, i)) }, rs: ar, cs: ac };
        let rhs = MatRef { ptr: unsafe { b_ptr.get().offset(batch_offset(&batch, &b_strides, i)) }, rs: br, cs: bc };
        unsafe { gemm_into(dst.get().add(i * m * n), m, n, k, lhs, rhs, false, 1.0, par) };
    };
    if batches == 1 {
        per_batch(0, threads(m * n * k));
    } else {
        (0..batches).into_par_iter().for_each(|i| per_batch(i, Parallelism::None));
    }
    Ok(out)
}

impl Op for MatMul {
    op_common!();

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        crate::rules::matmul(*self, g)
    }

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 2)?;
        if inputs.iter().any(|f| f.dtype != DType::F32) {
            return Err(invalid!("MatMul is supported on f32 only"));
        }
        let (_, _, _, _, shape) = matmul_shapes(&inputs[0].shape, &inputs[1].shape, self.transpose_a, self.transpose_b)?;
        Ok(vec![Fact::new(DType::F32, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 2)?;
        Ok(vec![Tensor::F32(matmul(inputs[0].as_f32()?, inputs[1].as_f32()?, self.transpose_a, self.transpose_b)?)])
    }
}

/// ONNX `Gemm`: `alpha·op(A)·op(B) + beta·C` on 2-D operands, C broadcast to the output.
#[derive(Debug, Serialize, Deserialize)]
pub struct Gemm {
    pub alpha: f32,
    pub beta: f32,
    pub trans_a: bool,
    pub trans_b: bool,
}
persistent_op!(Gemm, "Gemm");

impl Gemm {
    fn dims(&self, a: &[usize], b: &[usize]) -> Result<(usize, usize, usize), IrError> {
        if a.len() != 2 || b.len() != 2 {
            return Err(invalid!("Gemm operands must be matrices, found {a:?} and {b:?}"));
        }
        let (m, k) = if self.trans_a { (a[1], a[0]) } else { (a[0], a[1]) };
        let (k2, n) = if self.trans_b { (b[1], b[0]) } else { (b[0], b[1]) };
        if k != k2 {
            return Err(invalid!("Gemm inner dimensions differ: {a:?} × {b:?} (transA={}, transB={})", self.trans_a, self.trans_b));
        }
        Ok((m, k, n))
    }
}

impl Op for Gemm {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 3)?;
        if inputs.iter().any(|f| f.dtype != DType::F32) {
            return Err(invalid!("Gemm is supported on f32 only"));
        }
        let (m, _, n) = self.dims(&inputs[0].shape, &inputs[1].shape)?;
        if let Some(c) = inputs.get(2) {
            if broadcast_shapes(&[&c.shape, &[m, n]])? != [m, n] {
                return Err(invalid!("C of shape {:?} does not broadcast to [{m}, {n}]", c.shape));
            }
        }
        Ok(vec![Fact::new(DType::F32, vec![m, n])])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 3)?;
        let (a, b) = (inputs[0].as_f32()?, inputs[1].as_f32()?);
        let (m, k, n) = self.dims(a.shape(), b.shape())?;
        let mut out = match inputs.get(2) {
            Some(c) => {
                let c = c.as_f32()?;
                let c = c.broadcast(IxDyn(&[m, n])).ok_or_else(|| invalid!("C of shape {:?} does not broadcast to [{m}, {n}]", c.shape()))?;
                let beta = self.beta;
                c.mapv(|v| beta * v).as_standard_layout().into_owned()
            }
            None => ArrayD::zeros(IxDyn(&[m, n])),
        };
        let (mut lhs, mut rhs) = (MatRef::of(&a.view(), 0), MatRef::of(&b.view(), 0));
        if self.trans_a {
            lhs = lhs.transposed();
        }
        if self.trans_b {
            rhs = rhs.transposed();
        }
        let accumulate = inputs.len() == 3;
        unsafe { gemm_into(out.as_mut_ptr(), m, n, k, lhs, rhs, accumulate, self.alpha, threads(m * n * k)) };
        Ok(vec![Tensor::F32(out)])
    }
}
