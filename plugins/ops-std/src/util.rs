//! Small helpers shared by the op implementations.

use fhe_ir::{invalid, Fact, IrError, Tensor};
use ndarray::{ArrayD, IxDyn};

/// Checks the operand count against what the op accepts.
pub fn arity<T>(inputs: &[T], min: usize, max: usize) -> Result<(), IrError> {
    if inputs.len() < min || inputs.len() > max {
        let expected = if min == max { format!("{min}") } else { format!("{min} to {max}") };
        return Err(invalid!("expected {expected} operands, got {}", inputs.len()));
    }
    Ok(())
}

/// The value of an operand that describes a shape or axes; it must be known at compile time.
pub fn konst<'a>(fact: &'a Fact, what: &str) -> Result<&'a Tensor, IrError> {
    fact.konst.as_deref().ok_or_else(|| {
        invalid!("the {what} operand depends on the values of graph inputs; it must be known once input shapes are fixed")
    })
}

/// Row-major reshape (copies only when the layout is not already row-major).
pub fn reshape_array<T: Clone>(a: &ArrayD<T>, shape: &[usize]) -> Result<ArrayD<T>, IrError> {
    let expected: usize = shape.iter().product();
    if expected != a.len() {
        return Err(invalid!("cannot reshape {:?} ({} elements) to {shape:?}", a.shape(), a.len()));
    }
    a.as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(shape))
        .map_err(|e| invalid!("reshape to {shape:?}: {e}"))
}

pub fn reshape_tensor(t: &Tensor, shape: &[usize]) -> Result<Tensor, IrError> {
    Ok(fhe_ir::dispatch_tensor!(t, a => reshape_array(a, shape)?))
}

/// Resolves a list of possibly negative axes against a rank, rejecting duplicates.
pub fn normalize_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>, IrError> {
    let mut out = Vec::with_capacity(axes.len());
    for &axis in axes {
        let a = fhe_ir::broadcast::normalize_axis(axis, rank)?;
        if out.contains(&a) {
            return Err(invalid!("axis {axis} appears twice in {axes:?}"));
        }
        out.push(a);
    }
    Ok(out)
}

/// A raw pointer that may cross threads: kernels hand disjoint regions to rayon tasks.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// Through a method, so closures capture the whole wrapper rather than the bare pointer.
    pub fn get(self) -> *mut T {
        self.0
    }
}
