//! Exact negacyclic products `a·s mod (z^N + 1, 2^64)` of a 64-bit polynomial with the binary
//! secret, through tfhe-ntt's binary-operand plans (two 52-bit primes with AVX-512 IFMA,
//! three 32-bit primes elsewhere), chosen at run time. tfhe's generic polynomial product is
//! Karatsuba, 10–20 ms per product here; this is tens of microseconds.

use tfhe_ntt::native_binary64::{Plan32, Plan52};

enum Plan {
    Ifma(Plan52),
    Portable(Plan32),
}

/// Multiplies by one fixed binary secret.
pub struct SecretProduct {
    plan: Plan,
    secret: Vec<u64>,
}

impl SecretProduct {
    /// `secret` holds N coefficients, each 0 or 1.
    pub fn new(secret: &[u64]) -> SecretProduct {
        let n = secret.len();
        let plan = match Plan52::try_new(n) {
            Some(p) => Plan::Ifma(p),
            None => Plan::Portable(Plan32::try_new(n).expect("N is a power of two")),
        };
        SecretProduct { plan, secret: secret.to_vec() }
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
