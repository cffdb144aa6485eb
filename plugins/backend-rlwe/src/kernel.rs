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

/// One block: `ROW_BLOCK` output rows × `COEF_BLOCK` coefficients starting at `c0`.
#[inline(always)]
fn block(w: &[i8], n: usize, x: &[u64], width: usize, c0: usize, out: &mut [u64]) {
    let mut acc = [[0u64; COEF_BLOCK]; ROW_BLOCK];
    for r in 0..n {
        let xr: &[u64; COEF_BLOCK] = x[r * width + c0..r * width + c0 + COEF_BLOCK].try_into().expect("block width");
        for (o, acc) in acc.iter_mut().enumerate() {
            // Sign-extended: a negative weight multiplies as its two's complement mod 2^64.
            let wv = w[o * n + r] as i64 as u64;
            for c in 0..COEF_BLOCK {
                acc[c] = acc[c].wrapping_add(xr[c].wrapping_mul(wv));
            }
        }
    }
    for (o, acc) in acc.iter().enumerate() {
        out[o * width + c0..o * width + c0 + COEF_BLOCK].copy_from_slice(acc);
    }
}

#[inline(always)]
fn row_block(w: &[i8], n: usize, x: &[u64], width: usize, out: &mut [u64]) {
    for c0 in (0..width).step_by(COEF_BLOCK) {
        block(w, n, x, width, c0, out);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn row_block_avx512(w: &[i8], n: usize, x: &[u64], width: usize, out: &mut [u64]) {
    row_block(w, n, x, width, out);
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
/// 32. Returns `rows × width`.
pub fn linear_combination(w: &[i8], rows: usize, n: usize, x: &[u64], width: usize) -> Vec<u64> {
    assert!(rows % ROW_BLOCK == 0 && width % COEF_BLOCK == 0 && w.len() == rows * n && x.len() == n * width, "kernel shapes");
    let mut out = vec![0u64; rows * width];
    let avx512 = has_avx512();
    out.par_chunks_mut(ROW_BLOCK * width).zip(w.par_chunks(ROW_BLOCK * n)).for_each(|(out, w)| {
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            // SAFETY: the CPU was checked for the features this build needs.
            unsafe { row_block_avx512(w, n, x, width, out) };
            return;
        }
        let _ = avx512;
        row_block(w, n, x, width, out);
    });
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
        let mut portable = vec![0u64; rows * width];
        for (out, w) in portable.chunks_mut(ROW_BLOCK * width).zip(w.chunks(ROW_BLOCK * n)) {
            row_block(w, n, &x, width, out);
        }
        assert_eq!(portable, got);
    }
}
