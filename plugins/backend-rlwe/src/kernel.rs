//! The server's work: `out[o] = Σ_r w[o][r]·x[r]` over Z_{2^64}, where each `x[r]` is one
//! input ciphertext's mask or body (N coefficients) and `w` the int8 weights: a GEMM of small
//! integers with 64-bit wrapping data. Work is split into coefficient strips (one rayon task
//! each) so a strip of every input stays in cache while all output rows pass over it.
//!
//! Three builds, chosen at run time:
//! - **VNNI** (AVX-512 VNNI): each u64 coefficient is split into 8 byte-limbs; `vpdpbusd`
//!   multiplies 4 unsigned limbs by 4 signed weights and adds them into 32-bit lanes, so a
//!   limb's sum over n ≤ 3072 inputs (|·| < 2^27) is exact, and the 8 limb sums recombine
//!   with shifts modulo 2^64. Limbs that are zero in every input (values rounded to their
//!   top bits) are skipped: the compact setting's 40-bit values take 5 passes, not 8.
//! - **AVX-512**: the plain wrapping multiply-add, vectorized (`vpmullq`).
//! - **portable**: the same code for any x86_64 (or other) CPU.

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

/// Coefficients per VNNI strip: one 512-bit register of 32-bit lanes.
const VNNI_STRIP: usize = 16;

/// Weights for the VNNI kernel: per output row, each group of 4 consecutive inputs packed as
/// the 4 bytes of one i32 (inputs padded to a multiple of 4 with zero weights).
pub struct PackedWeights {
    rows: usize,
    n: usize,
    groups: usize,
    w: Vec<i8>,
    quads: Vec<i32>,
}

impl PackedWeights {
    /// `w` is `rows × n`, output-major, `rows` a multiple of [`ROW_BLOCK`].
    pub fn new(w: Vec<i8>, rows: usize, n: usize) -> PackedWeights {
        assert!(rows % ROW_BLOCK == 0 && w.len() == rows * n, "weight shape");
        let groups = n.div_ceil(4);
        let mut quads = vec![0i32; rows * groups];
        for o in 0..rows {
            for g in 0..groups {
                let mut bytes = [0u8; 4];
                for (q, b) in bytes.iter_mut().enumerate() {
                    if let Some(&v) = w.get(o * n + 4 * g + q).filter(|_| 4 * g + q < n) {
                        *b = v as u8;
                    }
                }
                quads[o * groups + g] = i32::from_le_bytes(bytes);
            }
        }
        PackedWeights { rows, n, groups, w, quads }
    }
}

/// Byte-limb layout of one strip: `limbs[k][g][c][q]` = byte `LO + k` of `x[4g + q][c0 + c]`.
/// Written one limb plane at a time so every pass reads the strip in order.
fn limb_strip<const LO: usize>(x: &[u64], n: usize, width: usize, c0: usize, groups: usize, limbs: &mut [u8]) {
    let plane = groups * VNNI_STRIP * 4;
    for (k, plane_bytes) in limbs.chunks_exact_mut(plane).enumerate().take(8 - LO) {
        let shift = 8 * (LO + k);
        for (g, group) in plane_bytes.chunks_exact_mut(VNNI_STRIP * 4).enumerate() {
            for q in 0..4 {
                let r = 4 * g + q;
                if r >= n {
                    for c in 0..VNNI_STRIP {
                        group[c * 4 + q] = 0;
                    }
                    continue;
                }
                let row = &x[r * width + c0..r * width + c0 + VNNI_STRIP];
                for c in 0..VNNI_STRIP {
                    group[c * 4 + q] = (row[c] >> shift) as u8;
                }
            }
        }
    }
}

/// Two output rows × one strip with VNNI over limbs `LO..8` (the lower ones are zero);
/// `out` receives 2 × `VNNI_STRIP` results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn vnni_row_pair<const LO: usize>(quads: &[i32], groups: usize, limbs: &[u8], out: &mut [u64]) {
    use std::arch::x86_64::*;
    let plane = groups * VNNI_STRIP * 4;
    let mut acc = [[_mm512_setzero_si512(); 8]; 2];
    for g in 0..groups {
        let w0 = _mm512_set1_epi32(quads[g]);
        let w1 = _mm512_set1_epi32(quads[groups + g]);
        for k in 0..8 - LO {
            let x = _mm512_loadu_si512(limbs.as_ptr().add(k * plane + g * VNNI_STRIP * 4) as *const _);
            acc[0][k] = _mm512_dpbusd_epi32(acc[0][k], x, w0);
            acc[1][k] = _mm512_dpbusd_epi32(acc[1][k], x, w1);
        }
    }
    for (row, acc) in acc.iter().enumerate() {
        let mut sums = [[0i32; VNNI_STRIP]; 8];
        for k in 0..8 - LO {
            _mm512_storeu_si512(sums[k].as_mut_ptr() as *mut _, acc[k]);
        }
        for c in 0..VNNI_STRIP {
            out[row * VNNI_STRIP + c] = (0..8 - LO).fold(0u64, |v, k| v.wrapping_add((sums[k][c] as i64 as u64) << (8 * (LO + k))));
        }
    }
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The VNNI build of [`linear_combination`]; `width` a multiple of 16; the low `LO` bytes
/// of every `x` are zero.
#[cfg(target_arch = "x86_64")]
fn linear_combination_vnni<const LO: usize>(weights: &PackedWeights, x: &[u64], width: usize) -> Vec<u64> {
    let (rows, n, groups) = (weights.rows, weights.n, weights.groups);
    let strips = width / VNNI_STRIP;
    let mut by_strip = vec![0u64; strips * rows * VNNI_STRIP];
    by_strip.par_chunks_mut(rows * VNNI_STRIP).enumerate().for_each_init(
        || vec![0u8; (8 - LO) * groups * VNNI_STRIP * 4],
        |limbs, (s, out)| {
            limb_strip::<LO>(x, n, width, s * VNNI_STRIP, groups, limbs);
            for (pair, out) in out.chunks_exact_mut(2 * VNNI_STRIP).enumerate() {
                // SAFETY: the CPU was checked for AVX-512 VNNI; slices have the sizes used.
                unsafe { vnni_row_pair::<LO>(&weights.quads[2 * pair * groups..(2 * pair + 2) * groups], groups, limbs, out) };
            }
        },
    );
    unstrip(&by_strip, rows, width, VNNI_STRIP)
}

/// Strip-major results (`strips × rows × strip`) to row-major `rows × width`.
fn unstrip(by_strip: &[u64], rows: usize, width: usize, strip: usize) -> Vec<u64> {
    let mut out = vec![0u64; rows * width];
    out.par_chunks_mut(width).enumerate().for_each(|(o, row)| {
        for (s, values) in row.chunks_exact_mut(strip).enumerate() {
            let at = (s * rows + o) * strip;
            values.copy_from_slice(&by_strip[at..at + strip]);
        }
    });
    out
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
    if has_vnni() {
        "avx512-vnni"
    } else if has_avx512() {
        "avx512"
    } else {
        "portable"
    }
}

/// `out[o][c] = Σ_r w[o][r]·x[r][c]` (wrapping); `x` is `n × width`, `width` a multiple of
/// 32. Returns `rows × width`, row-major. The caller promises that the low `zero_bits` bits
/// of every `x` are zero (they are rounded values); the VNNI build then skips those limbs.
pub fn linear_combination(weights: &PackedWeights, x: &[u64], width: usize, zero_bits: u32) -> Vec<u64> {
    assert!(width % COEF_BLOCK == 0 && x.len() == weights.n * width, "kernel shapes");
    debug_assert!(x.iter().all(|v| zero_bits == 0 || v.trailing_zeros() >= zero_bits), "low bits are zero");
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        return match zero_bits / 8 {
            0 => linear_combination_vnni::<0>(weights, x, width),
            1 => linear_combination_vnni::<1>(weights, x, width),
            2 => linear_combination_vnni::<2>(weights, x, width),
            _ => linear_combination_vnni::<3>(weights, x, width),
        };
    }
    linear_combination_wide(&weights.w, weights.rows, weights.n, x, width)
}

/// The u64-multiply builds (AVX-512 or portable).
fn linear_combination_wide(w: &[i8], rows: usize, n: usize, x: &[u64], width: usize) -> Vec<u64> {
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
    unstrip(&by_strip, rows, width, COEF_BLOCK)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn blocked_kernel_equals_the_plain_sum() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (rows, n, width) = (8, 37, 64);
        let mut w: Vec<i8> = (0..rows * n).map(|_| rng.random()).collect();
        w[0] = i8::MIN;
        w[1] = i8::MAX;
        let x: Vec<u64> = (0..n * width).map(|_| rng.random()).collect();
        let packed = PackedWeights::new(w.clone(), rows, n);
        let got = linear_combination(&packed, &x, width, 0);
        for o in 0..rows {
            for c in 0..width {
                let want = (0..n).fold(0u64, |acc, r| acc.wrapping_add(x[r * width + c].wrapping_mul(w[o * n + r] as i64 as u64)));
                assert_eq!(got[o * width + c], want, "row {o}, coefficient {c}");
            }
        }
        // The u64-multiply build agrees with the dispatched one (VNNI where present).
        assert_eq!(linear_combination_wide(&w, rows, n, &x, width), got);
        // Skipping limbs that are zero changes nothing.
        for zero_bits in [16, 24] {
            let rounded: Vec<u64> = x.iter().map(|v| v >> zero_bits << zero_bits).collect();
            assert_eq!(linear_combination(&packed, &rounded, width, zero_bits), linear_combination_wide(&w, rows, n, &rounded, width), "{zero_bits} zero bits");
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
