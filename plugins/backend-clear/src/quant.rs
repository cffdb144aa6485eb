//! Dynamic per-token quantization of activations and gradients (client side), shared by
//! the clear-integer backend and the FHE backend so both see the same integers.

/// Largest quantized magnitude: symmetric signed 8-bit, [−127, 127].
pub const QMAX: f32 = 127.0;

/// A `[rows × cols]` block quantized per row: `x[t,i] ≈ values[t,i]·scales[t]`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedRows {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
}

/// Quantizes each row with its own scale `max|row|/127`. An all-zero row gets scale 0: its
/// products are exactly zero, and scale 0 keeps them zero even when the encrypted result
/// carries the compact setting's small decoding error (padding and ignored positions give
/// all-zero gradient rows).
pub fn quantize_rows(data: &[f32], rows: usize, cols: usize) -> QuantizedRows {
    assert_eq!(data.len(), rows * cols, "block size");
    let mut values = vec![0i8; rows * cols];
    let mut scales = vec![0f32; rows];
    for ((row, out), scale) in data.chunks_exact(cols.max(1)).zip(values.chunks_exact_mut(cols.max(1))).zip(&mut scales) {
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max == 0.0 {
            continue;
        }
        *scale = max / QMAX;
        for (q, v) in out.iter_mut().zip(row) {
            *q = (v / *scale).round().clamp(-QMAX, QMAX) as i8;
        }
    }
    QuantizedRows { rows, cols, values, scales }
}

/// Backward pass preparation: `g[t,j]·s_w[j]`. The weight's per-output-channel scales run
/// along the axis the backward product sums over, so they must be applied before the
/// gradient is quantized: `Σ_j g[t,j]·W[i,j] ≈ Σ_j (g[t,j]·s_w[j])·q_w[i,j]`.
pub fn scale_columns(data: &[f32], cols: usize, scales: &[f32]) -> Vec<f32> {
    data.chunks_exact(cols.max(1)).flat_map(|row| row.iter().zip(scales).map(|(v, s)| v * s)).collect()
}

/// Dequantizes integer products: forward `acc[t,j]·s_x[t]·s_w[j]`, backward `acc[t,i]·s_g[t]`.
pub fn dequantize(acc: &[i64], row_scales: &[f32], col_scales: Option<&[f32]>, cols: usize) -> Vec<f32> {
    acc.chunks_exact(cols.max(1))
        .zip(row_scales)
        .flat_map(|(row, &rs)| {
            row.iter().enumerate().map(move |(j, &a)| {
                let cs = col_scales.map_or(1.0, |c| c[j]);
                a as f32 * rs * cs
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_use_their_own_scale_and_zero_rows_stay_zero() {
        let q = quantize_rows(&[1.0, -0.5, 0.0, 0.0, 254.0, -127.0], 3, 2);
        assert_eq!(q.values, vec![127, -64, 0, 0, 127, -64]);
        assert_eq!(q.scales, vec![1.0 / 127.0, 0.0, 2.0]);
        // Whatever a noisy product says for the zero row, it dequantizes to exactly zero.
        assert_eq!(dequantize(&[5, -3, 2, 1, 0, 0], &q.scales, None, 2)[2..4], [0.0, 0.0]);
    }

    #[test]
    fn backward_scaling_commutes_with_the_weight_scales() {
        // g = [2, 3], W = q_w·diag(s_w) with q_w = [[1, 2]], s_w = [0.5, 0.25]: g·Wᵀ = 2·0.5 + 3·0.5 = 2.5
        let scaled = scale_columns(&[2.0, 3.0], 2, &[0.5, 0.25]);
        let acc: f32 = scaled.iter().zip([1.0, 2.0]).map(|(g, q)| g * q).sum();
        assert_eq!(acc, 2.5);
    }
}
