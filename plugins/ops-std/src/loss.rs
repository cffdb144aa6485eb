//! Causal language-model loss: mean cross-entropy over positions whose label is not −100.

use fhe_ir::{invalid, op_common, persistent_op, DType, Fact, IrError, Op, Tensor};
use ndarray::ArrayD;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::util::arity;

/// Label value of positions that do not count (questions, padding), as in PyTorch.
pub const IGNORE_INDEX: i64 = -100;

/// `CrossEntropy(logits [.., V], labels [..]) → loss []`. Labels are already aligned with
/// the positions that predict them (the data pipeline shifts them).
#[derive(Debug, Serialize, Deserialize)]
pub struct CrossEntropy;
persistent_op!(CrossEntropy, "CrossEntropy");

/// Gradient of [`CrossEntropy`] with respect to the logits: `(softmax − onehot)·g / count`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CrossEntropyGrad;
persistent_op!(CrossEntropyGrad, "CrossEntropyGrad");

/// Row-major logits as rows of the vocabulary, with labels checked.
fn rows<'a>(logits: &'a Tensor, labels: &Tensor) -> Result<(Vec<f32>, usize, Vec<i64>), IrError> {
    let l = logits.as_f32()?;
    let vocab = *l.shape().last().ok_or_else(|| invalid!("logits must have a vocabulary axis"))?;
    if &l.shape()[..l.ndim() - 1] != labels.shape() {
        return Err(invalid!("logits {:?} and labels {:?} do not match", l.shape(), labels.shape()));
    }
    let labels = labels.to_i64_vec()?;
    check_labels(&labels, vocab)?;
    Ok((l.as_standard_layout().iter().copied().collect(), vocab, labels))
}

fn check_labels(labels: &[i64], vocab: usize) -> Result<(), IrError> {
    match labels.iter().find(|&&y| y != IGNORE_INDEX && !(0..vocab as i64).contains(&y)) {
        Some(bad) => Err(invalid!("label {bad} is outside the vocabulary of {vocab} tokens")),
        None => Ok(()),
    }
}

/// Turns a row of logits into the loss gradient `(softmax − onehot(y))·scale`, in place, and
/// returns the row's loss term `log Σ exp − logit[y]`; an ignored row becomes zeros, term 0.
fn softmax_minus_onehot(row: &mut [f32], y: i64, scale: f32) -> f64 {
    if y == IGNORE_INDEX {
        row.fill(0.0);
        return 0.0;
    }
    let lse = log_sum_exp(row);
    let term = lse - row[y as usize] as f64;
    for v in row.iter_mut() {
        *v = ((*v as f64 - lse).exp() as f32) * scale;
    }
    row[y as usize] -= scale;
    term
}

fn counted(labels: &[i64]) -> usize {
    labels.iter().filter(|&&y| y != IGNORE_INDEX).count()
}

/// `log Σ exp(row)` computed stably.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
}

impl Op for CrossEntropy {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 2, 2)?;
        if inputs[0].dtype != DType::F32 || inputs[1].dtype != DType::I64 {
            return Err(invalid!("CrossEntropy takes f32 logits and i64 labels"));
        }
        Ok(vec![Fact::new(DType::F32, vec![])])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 2, 2)?;
        let (logits, vocab, labels) = rows(inputs[0], inputs[1])?;
        let total: f64 = logits
            .par_chunks(vocab.max(1))
            .zip(labels.par_iter())
            .filter(|(_, &y)| y != IGNORE_INDEX)
            .map(|(row, &y)| log_sum_exp(row) - row[y as usize] as f64)
            .sum();
        let loss = if counted(&labels) == 0 { 0.0 } else { total / counted(&labels) as f64 };
        Ok(vec![Tensor::from_f32(&[], vec![loss as f32])?])
    }

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        let upstream = g.required_grad(0)?;
        let (logits, labels) = (g.input(0), g.input(1));
        let grad = g.add(CrossEntropyGrad, &[logits, labels, upstream])?;
        Ok(vec![Some(grad), None])
    }
}

impl Op for CrossEntropyGrad {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 3, 3)?;
        Ok(vec![Fact::new(DType::F32, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 3, 3)?;
        let (mut logits, vocab, labels) = rows(inputs[0], inputs[1])?;
        let upstream = inputs[2].to_f32_vec()?.first().copied().unwrap_or(1.0);
        let scale = upstream / counted(&labels).max(1) as f32;
        logits.par_chunks_mut(vocab.max(1)).zip(labels.par_iter()).for_each(|(row, &y)| {
            softmax_minus_onehot(row, y, scale);
        });
        let shape = inputs[0].shape().to_vec();
        Ok(vec![Tensor::F32(ArrayD::from_shape_vec(shape, logits).map_err(|e| invalid!("{e}"))?)])
    }
}

/// Tokens per chunk of [`ProjectedCrossEntropy`]: a chunk's logits over GPT-2's vocabulary
/// take 128 × 50257 × 4 B = 26 MB, instead of 400 MB for a step of 2048 tokens.
const PROJECTION_CHUNK: usize = 128;

/// Cross-entropy of a linear projection, fused: `ProjectedCrossEntropy(h [.., E], w, labels
/// [..]) → (loss [], ∂loss/∂h [.., E])` with logits `h·wᵀ` (`w` of shape `[V, E]`, a tied
/// embedding table) or `h·w` (`transpose_b = false`, `w` of shape `[E, V]`). The logits are
/// made and dropped a chunk of tokens at a time, and the input gradient is computed in the
/// same pass, so no step ever holds logits for all tokens, and the backward pass only scales
/// the stored gradient. `w` is frozen: it gets no gradient.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProjectedCrossEntropy {
    pub transpose_b: bool,
}
persistent_op!(ProjectedCrossEntropy, "ProjectedCrossEntropy");

impl ProjectedCrossEntropy {
    /// (vocabulary, embedding width) of the projection weight.
    fn weight_dims(&self, w: &[usize]) -> Result<(usize, usize), IrError> {
        match (w, self.transpose_b) {
            ([v, e], true) | ([e, v], false) => Ok((*v, *e)),
            _ => Err(invalid!("the projection weight must be a matrix, found {w:?}")),
        }
    }
}

impl Op for ProjectedCrossEntropy {
    op_common!();

    fn output_facts(&self, inputs: &[&Fact]) -> Result<Vec<Fact>, IrError> {
        arity(inputs, 3, 3)?;
        let (h, w, labels) = (inputs[0], inputs[1], inputs[2]);
        if h.dtype != DType::F32 || w.dtype != DType::F32 || labels.dtype != DType::I64 {
            return Err(invalid!("ProjectedCrossEntropy takes f32 activations and weight and i64 labels"));
        }
        let (_, e) = self.weight_dims(&w.shape)?;
        if h.shape.last() != Some(&e) || h.shape[..h.shape.len() - 1] != labels.shape[..] {
            return Err(invalid!("activations {:?}, weight {:?} and labels {:?} do not match", h.shape, w.shape, labels.shape));
        }
        Ok(vec![Fact::new(DType::F32, vec![]), Fact::new(DType::F32, h.shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, IrError> {
        arity(inputs, 3, 3)?;
        let (h, w) = (inputs[0].as_f32()?, inputs[1].as_f32()?);
        let (vocab, e) = self.weight_dims(w.shape())?;
        let labels = inputs[2].to_i64_vec()?;
        if h.shape().last() != Some(&e) || h.len() != labels.len() * e {
            return Err(invalid!("activations {:?} and labels {:?} do not match the weight {:?}", h.shape(), inputs[2].shape(), w.shape()));
        }
        check_labels(&labels, vocab)?;
        let h = h.as_standard_layout();
        let h = h.as_slice().expect("standard layout");
        let scale = 1.0 / counted(&labels).max(1) as f32;
        let mut dh = vec![0f32; h.len()];
        let mut total = 0f64;
        for ((rows, labels), dh) in h.chunks(PROJECTION_CHUNK * e).zip(labels.chunks(PROJECTION_CHUNK)).zip(dh.chunks_mut(PROJECTION_CHUNK * e)) {
            let n = labels.len();
            let rows = ArrayD::from_shape_vec(vec![n, e], rows.to_vec()).map_err(|err| invalid!("{err}"))?;
            let mut logits = crate::matmul(&rows, w, false, self.transpose_b)?;
            // Logits → loss terms and (softmax − onehot)/count, in place.
            let slice = logits.as_slice_mut().expect("fresh array");
            total += slice.par_chunks_mut(vocab).zip(labels.par_iter()).map(|(row, &y)| softmax_minus_onehot(row, y, scale)).sum::<f64>();
            // ∂loss/∂h = G·w (tied: w is [V, E]) or G·wᵀ.
            let grad = crate::matmul(&logits, w, false, !self.transpose_b)?;
            dh.copy_from_slice(grad.as_slice().expect("fresh array"));
        }
        let loss = if counted(&labels) == 0 { 0.0 } else { total / counted(&labels) as f64 };
        Ok(vec![Tensor::from_f32(&[], vec![loss as f32])?, Tensor::F32(ArrayD::from_shape_vec(inputs[0].shape().to_vec(), dh).map_err(|err| invalid!("{err}"))?)])
    }

    fn gradient(&self, g: &mut fhe_ir::GradBuilder) -> Result<Vec<Option<fhe_ir::OutletId>>, IrError> {
        if g.needs_grad(1) {
            return Err(invalid!("the projection weight of a fused cross-entropy is frozen; it cannot be trained"));
        }
        let upstream = g.required_grad(0)?;
        let dh = g.output(1);
        let grad = g.add(crate::Binary { f: crate::BinaryFn::Mul }, &[dh, upstream])?;
        Ok(vec![Some(grad), None, None])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A fixed pseudo-random sequence in [−1, 1): enough to make the rows differ.
        (0..n as u32).map(|i| ((i.wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 8) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0).collect()
    }

    #[test]
    fn projected_cross_entropy_equals_the_unfused_loss_and_gradient() {
        // More tokens than one chunk, some ignored, both weight orientations.
        let (batch, seq, e, vocab) = (3, 100, 16, 37);
        let h = Tensor::from_f32(&[batch, seq, e], values(batch * seq * e, 1)).unwrap();
        let w_ve = Tensor::from_f32(&[vocab, e], values(vocab * e, 2)).unwrap();
        let labels: Vec<i64> = (0..batch * seq).map(|i| if i % 7 == 3 { IGNORE_INDEX } else { (i * 5 % vocab) as i64 }).collect();
        let labels = Tensor::from_i64(&[batch, seq], labels).unwrap();
        let logits = Tensor::F32(crate::matmul(h.as_f32().unwrap(), w_ve.as_f32().unwrap(), false, true).unwrap());
        let loss = CrossEntropy.eval(&[&logits, &labels]).unwrap().remove(0).to_f32_vec().unwrap()[0];
        let one = Tensor::from_f32(&[], vec![1.0]).unwrap();
        let dlogits = CrossEntropyGrad.eval(&[&logits, &labels, &one]).unwrap().remove(0);
        let dh = crate::matmul(dlogits.as_f32().unwrap(), w_ve.as_f32().unwrap(), false, false).unwrap();
        let w_ev = Tensor::F32(w_ve.as_f32().unwrap().t().as_standard_layout().into_owned().into_dyn());
        for (w, transpose_b) in [(&w_ve, true), (&w_ev, false)] {
            let out = ProjectedCrossEntropy { transpose_b }.eval(&[&h, w, &labels]).unwrap();
            let fused_loss = out[0].to_f32_vec().unwrap()[0];
            assert!((fused_loss - loss).abs() < 1e-5, "loss {fused_loss} vs {loss}");
            let diff = out[1].as_f32().unwrap().iter().zip(dh.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff < 1e-6, "∂loss/∂h differs by {diff} (transpose_b {transpose_b})");
            assert_eq!(out[1].shape(), h.shape());
        }
    }
}
