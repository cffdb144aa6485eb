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
    if let Some(bad) = labels.iter().find(|&&y| y != IGNORE_INDEX && !(0..vocab as i64).contains(&y)) {
        return Err(invalid!("label {bad} is outside the vocabulary of {vocab} tokens"));
    }
    Ok((l.as_standard_layout().iter().copied().collect(), vocab, labels))
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
            if y == IGNORE_INDEX {
                row.fill(0.0);
                return;
            }
            let lse = log_sum_exp(row);
            for v in row.iter_mut() {
                *v = ((*v as f64 - lse).exp() as f32) * scale;
            }
            row[y as usize] -= scale;
        });
        let shape = inputs[0].shape().to_vec();
        Ok(vec![Tensor::F32(ArrayD::from_shape_vec(shape, logits).map_err(|e| invalid!("{e}"))?)])
    }
}
