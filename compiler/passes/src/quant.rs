//! Static weight quantization: symmetric, signed 8-bit, one scale per output channel.

use fhe_ir::Tensor;

use crate::PassError;

pub const WEIGHT_BITS: u32 = 8;
/// Largest quantized magnitude: the range is symmetric, [−127, 127].
pub const QMAX: f32 = 127.0;

/// A weight `[in, out]` as int8 values (row-major) and per-output-channel scales, with
/// `W[i,j] ≈ q[i,j]·scale[j]`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedWeight {
    pub shape: [usize; 2],
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
}

pub fn quantize_weight(weight: &Tensor) -> Result<QuantizedWeight, PassError> {
    let w = weight.as_f32()?.as_standard_layout().into_owned();
    let [rows, cols] = w.shape() else {
        return Err(PassError::Config(format!("a weight must be a matrix, found {:?}", w.shape())));
    };
    let (rows, cols) = (*rows, *cols);
    let data = w.as_slice().expect("standard layout");
    let mut scales = vec![0f32; cols];
    for row in data.chunks_exact(cols) {
        for (s, v) in scales.iter_mut().zip(row) {
            *s = s.max(v.abs());
        }
    }
    // An all-zero column gets scale 0: its outputs are exactly zero, whatever the encrypted
    // product's decoding error.
    for s in &mut scales {
        *s /= QMAX;
    }
    let values = data
        .chunks_exact(cols)
        .flat_map(|row| row.iter().zip(&scales).map(|(v, s)| if *s > 0.0 { (v / s).round().clamp(-QMAX, QMAX) as i8 } else { 0 }))
        .collect();
    Ok(QuantizedWeight { shape: [rows, cols], values, scales })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_column_uses_its_own_range() {
        let w = Tensor::from_f32(&[2, 3], vec![1.0, -0.5, 0.0, -2.0, 0.25, 0.0]).unwrap();
        let q = quantize_weight(&w).unwrap();
        assert_eq!(q.scales, vec![2.0 / 127.0, 0.5 / 127.0, 0.0]);
        assert_eq!(q.values, vec![64, -127, 0, -127, 64, 0]);
    }
}
