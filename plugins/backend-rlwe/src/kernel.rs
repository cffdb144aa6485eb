//! The server's work: `out[o] = Σ_r w[o][r]·x[r]` over Z_{2^64}, where each `x[r]` is one
//! input ciphertext (mask and body, 2N coefficients) and `w` the int8 weights. A GEMM of small
//! integers with 64-bit wrapping data, blocked so each loaded coefficient strip serves
//! several outputs from registers, spread over rayon threads, with an AVX-512 build of the
//! block picked at run time and a portable build elsewhere.

use rayon::prelude::*;

/// Output rows per block: their accumulators stay in registers together.
pub const ROW_BLOCK: usize = 4;
/// Coefficients per block: four 512-bit registers per output row.
const COEF_BLOCK: usize = 32;

/// One tile: `ROW_BLOCK` output rows × `COEF_BLOCK` coefficients, summed over all n inputs.
/// `w` holds the tile's rows (`ROW_BLOCK × n`), `strip` the inputs' coefficients of this
/// block (`n × COEF_BLOCK`, contiguous), `out` the tile (`ROW_BLOCK × COEF_BLOCK`).
#[inline(always)]
fn tile(w: &[i8], n: usize, strip: &[u64], out: &mut [u64]) {
    let mut acc = [[0u64; COEF_BLOCK]; ROW_BLOCK];
    for r in 0..n {
        let xr: &[u64; COEF_BLOCK] = strip[r * COEF_BLOCK..(r + 1) * COEF_BLOCK].try_into().expect("strip width");
        for (o, acc) in acc.iter_mut().enumerate() {
            // Sign-extended: a negative weight multiplies as its two's complement mod 2^64.
            let wv = w[o * n + r] as i64 as u64;
            for c in 0..COEF_BLOCK {
                acc[c] = acc[c].wrapping_add(xr[c].wrapping_mul(wv));
            }
        }
    }
    for (o, acc) in acc.iter().enumerate() {
        out[o * COEF_BLOCK..(o + 1) * COEF_BLOCK].copy_from_slice(acc);
    }
}

/// All row tiles of one coefficient strip: the strip (n × 32 coefficients, ≤ 768 KiB) stays
/// in L2 while every output row passes over it.
#[inline(always)]
fn strip_all_rows(w: &[i8], rows: usize, n: usize, strip: &[u64], out: &mut [u64]) {
    for (w, out) in w.chunks_exact(ROW_BLOCK * n).zip(out.chunks_exact_mut(ROW_BLOCK * COEF_BLOCK)).take(rows / ROW_BLOCK) {
        tile(w, n, strip, out);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn strip_all_rows_avx512(w: &[i8], rows: usize, n: usize, strip: &[u64], out: &mut [u64]) {
    strip_all_rows(w, rows, n, strip, out);
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which build of the kernel this CPU runs (for benchmark reports).
pub fn kernel_name() -> &'static str {
    if has_avx512() {
        "avx512"
    } else {
        "portable"
    }
}

/// `out[o][c] = Σ_r w[o][r]·x[r][c]` (wrapping). `w` is `rows × n`, output-major, with `rows` a
/// multiple of [`ROW_BLOCK`] (pad with zero rows); `x` is `n × width`, `width` a multiple of
/// 32. Returns `rows × width`, row-major.
pub fn linear_combination(w: &[i8], rows: usize, n: usize, x: &[u64], width: usize) -> Vec<u64> {
    assert!(rows % ROW_BLOCK == 0 && width % COEF_BLOCK == 0 && w.len() == rows * n && x.len() == n * width, "kernel shapes");
    let strips = width / COEF_BLOCK;
    let avx512 = has_avx512();
    // Strip-major results: each rayon task owns one coefficient strip of every row.
    let mut by_strip = vec![0u64; strips * rows * COEF_BLOCK];
    by_strip.par_chunks_mut(rows * COEF_BLOCK).enumerate().for_each(|(s, out)| {
        let c0 = s * COEF_BLOCK;
        let mut strip = vec![0u64; n * COEF_BLOCK];
        for (r, dst) in strip.chunks_exact_mut(COEF_BLOCK).enumerate() {
            dst.copy_from_slice(&x[r * width + c0..r * width + c0 + COEF_BLOCK]);
        }
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            // SAFETY: the CPU was checked for the features this build needs.
            unsafe { strip_all_rows_avx512(w, rows, n, &strip, out) };
            return;
        }
        let _ = avx512;
        strip_all_rows(w, rows, n, &strip, out);
    });
    let mut out = vec![0u64; rows * width];
    for (s, block) in by_strip.chunks_exact(rows * COEF_BLOCK).enumerate() {
        for (o, values) in block.chunks_exact(COEF_BLOCK).enumerate() {
            out[o * width + s * COEF_BLOCK..o * width + (s + 1) * COEF_BLOCK].copy_from_slice(values);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn blocked_kernel_equals_the_plain_sum() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (rows, n, width) = (8, 37, 64);
        let w: Vec<i8> = (0..rows * n).map(|_| rng.random()).collect();
        let x: Vec<u64> = (0..n * width).map(|_| rng.random()).collect();
        let got = linear_combination(&w, rows, n, &x, width);
        for o in 0..rows {
            for c in 0..width {
                let want = (0..n).fold(0u64, |acc, r| acc.wrapping_add(x[r * width + c].wrapping_mul(w[o * n + r] as i64 as u64)));
                assert_eq!(got[o * width + c], want, "row {o}, coefficient {c}");
            }
        }
        // The portable build gives the same result as the dispatched one.
        for s in 0..width / COEF_BLOCK {
            let strip: Vec<u64> = (0..n).flat_map(|r| x[r * width + s * COEF_BLOCK..][..COEF_BLOCK].to_vec()).collect();
            let mut portable = vec![0u64; rows * COEF_BLOCK];
            strip_all_rows(&w, rows, n, &strip, &mut portable);
            for o in 0..rows {
                assert_eq!(portable[o * COEF_BLOCK..][..COEF_BLOCK], got[o * width + s * COEF_BLOCK..][..COEF_BLOCK]);
            }
        }
    }
}
