//! Exact negacyclic products `a·s mod (z^N + 1, 2^64)` of a 64-bit polynomial with the binary
//! secret, through tfhe-ntt's binary-operand plans (two 52-bit primes with AVX-512 IFMA,
//! three 32-bit primes elsewhere), chosen at run time. tfhe's generic polynomial product is
//! Karatsuba, 10–20 ms per product here; this is tens of microseconds.

use tfhe_ntt::native_binary64::{Plan32, Plan52};
use tfhe_ntt::prime64;

/// A 50-bit NTT prime (the first of tfhe-ntt's 52-bit set, ≡ 1 mod 2^16, so it has the roots
/// of unity any N ≤ 2^15 needs): products of the binary secret with values below 2^31 in
/// magnitude are integers below 2^42, exact modulo this one prime.
const NARROW_PRIME: u64 = 0x3_FFFF_FE77_0001;
/// Widest rounded values (top bits of a 64-bit word) the one-prime product takes.
const NARROW_MAX_BITS: u32 = 32;

enum Plan {
    Ifma(Plan52),
    Portable(Plan32),
}

/// Multiplies by one fixed binary secret.
pub struct SecretProduct {
    plan: Plan,
    secret: Vec<u64>,
    /// One-prime plan and the secret in its NTT domain, for narrow (rounded) operands.
    narrow: prime64::Plan,
    narrow_secret: Vec<u64>,
}

impl SecretProduct {
    /// `secret` holds N coefficients, each 0 or 1.
    pub fn new(secret: &[u64]) -> SecretProduct {
        let n = secret.len();
        let plan = match Plan52::try_new(n) {
            Some(p) => Plan::Ifma(p),
            None => Plan::Portable(Plan32::try_new(n).expect("N is a power of two")),
        };
        let narrow = prime64::Plan::try_new(n, NARROW_PRIME).expect("an NTT prime for every power-of-two N ≤ 2^15");
        let mut narrow_secret = secret.to_vec();
        narrow.fwd(&mut narrow_secret);
        SecretProduct { plan, secret: secret.to_vec(), narrow, narrow_secret }
    }

    /// Whether the AVX-512 IFMA path is in use (for benchmark reports).
    pub fn uses_ifma(&self) -> bool {
        matches!(self.plan, Plan::Ifma(_))
    }

    /// `out = a·s` in Z_{2^64}[z]/(z^N + 1).
    pub fn mul(&self, a: &[u64], out: &mut [u64]) {
        match &self.plan {
            Plan::Ifma(p) => p.negacyclic_polymul(out, a, &self.secret),
            Plan::Portable(p) => p.negacyclic_polymul(out, a, &self.secret),
        }
    }

    /// `out = a·s` for `a` given rounded to its top `bits` bits, right-aligned (as the
    /// compact setting sends masks): `a = r·2^(64−bits)`, so `a·s = (r·s)·2^(64−bits)` and
    /// `r·s` is needed modulo 2^bits only. With `r` read as a signed value that is a small
    /// integer product, exact with one prime: two NTTs instead of six.
    pub fn mul_rounded(&self, rounded: &[u64], bits: u32, out: &mut [u64]) {
        if bits > NARROW_MAX_BITS {
            let full: Vec<u64> = rounded.iter().map(|&r| crate::restore_bits(r, bits)).collect();
            return self.mul(&full, out);
        }
        let p = NARROW_PRIME;
        let shift = 64 - bits;
        // Signed r (sign-extended from `bits`) modulo p.
        let mut buf: Vec<u64> = rounded.iter().map(|&r| (((r << shift) as i64 >> shift) as i128).rem_euclid(p as i128) as u64).collect();
        self.narrow.fwd(&mut buf);
        self.narrow.mul_assign_normalize(&mut buf, &self.narrow_secret);
        self.narrow.inv(&mut buf);
        for (o, &v) in out.iter_mut().zip(&buf) {
            let signed = if v > p / 2 { v as i64 - p as i64 } else { v as i64 };
            *o = (signed as u64) << shift;
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

/// Schoolbook negacyclic product, the reference for tests.
fn naive_negacyclic(a: &[u64], s: &[u64]) -> Vec<u64> {
    let n = a.len();
    let mut out = vec![0u64; n];
    for (i, &ai) in a.iter().enumerate() {
        for (j, &sj) in s.iter().enumerate() {
            let p = ai.wrapping_mul(sj);
            let k = i + j;
            if k < n {
                out[k] = out[k].wrapping_add(p);
            } else {
                out[k - n] = out[k - n].wrapping_sub(p);
            }
        }
    }
    out
}

    #[test]
    fn rounded_products_equal_full_products() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let n = 2048;
        let s: Vec<u64> = (0..n).map(|_| rng.random_range(0..2)).collect();
        let product = SecretProduct::new(&s);
        for bits in [28, 32, 40] {
            let mut rounded: Vec<u64> = (0..n).map(|_| rng.random::<u64>() >> (64 - bits)).collect();
            rounded[0] = (1 << (bits - 1)) - 1; // the largest positive
            rounded[1] = 1 << (bits - 1); // the most negative
            let full: Vec<u64> = rounded.iter().map(|&r| crate::restore_bits(r, bits)).collect();
            let (mut want, mut got) = (vec![0; n], vec![0; n]);
            product.mul(&full, &mut want);
            product.mul_rounded(&rounded, bits, &mut got);
            assert_eq!(got, want, "{bits} bits");
        }
        // All ones: the largest sums the one-prime product must hold.
        let ones = SecretProduct::new(&vec![1u64; n]);
        let rounded = vec![(1u64 << 31) - 1; n];
        let full: Vec<u64> = rounded.iter().map(|&r| crate::restore_bits(r, 32)).collect();
        let (mut want, mut got) = (vec![0; n], vec![0; n]);
        ones.mul(&full, &mut want);
        ones.mul_rounded(&rounded, 32, &mut got);
        assert_eq!(got, want, "all-ones secret");
    }

    #[test]
    fn products_are_exact_modulo_2_to_the_64() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for n in [16, 2048] {
            let a: Vec<u64> = (0..n).map(|_| rng.random()).collect();
            let s: Vec<u64> = (0..n).map(|_| rng.random_range(0..2)).collect();
            let mut out = vec![0; n];
            SecretProduct::new(&s).mul(&a, &mut out);
            assert_eq!(out, naive_negacyclic(&a, &s), "N = {n}");
        }
        // Extremes: all-ones secret, all-max polynomial.
        let (a, s) = (vec![u64::MAX; 64], vec![1u64; 64]);
        let mut out = vec![0; 64];
        SecretProduct::new(&s).mul(&a, &mut out);
        assert_eq!(out, naive_negacyclic(&a, &s));
    }
}
