//! The parameter set: ring, modulus, noise, plaintext scaling and wire rounding.
//!
//! Ring: Z_q[z]/(z^N + 1), N = 2048, q = 2^64, binary secret, fresh noise TUniform(2^17):
//! the GLWE part (k = 1) of tfhe-rs's `PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128`,
//! estimated by its authors at 128-bit security. Messages are integers scaled by Δ = 2^37.
//! docs/CRYPTO.md derives the noise budget and the failure bounds.

use std::fmt;

/// Ring degree N: token slots per ciphertext.
pub const POLY_SIZE: usize = 2048;
/// Bits of the fresh noise bound: e ∈ [−2^17, 2^17].
pub const NOISE_BOUND_LOG2: u32 = 17;
/// Δ = 2^37: messages |y| < 2^26 fit, which covers n ≤ 3072 inputs of int8 × int8.
pub const DELTA_LOG2: u32 = 37;
/// Largest input width the exactness bound of [`Setting::Exact`] covers.
pub const MAX_INPUTS: usize = 3072;
/// Name of this parameter set, as artifacts and wire messages state it.
pub const PARAMETER_SET: &str = fhe_exec::artifact::PARAMETER_SET;
/// Wire id of this parameter set.
pub const PARAMETER_SET_ID: u16 = 1;

/// How many bits of each value travel and are computed with, and so how exact results are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Setting {
    /// Results equal the integer product, always (bounded noise; docs/CRYPTO.md §3).
    Exact,
    /// 1 byte less per input value and 9 bytes less per output value, and a server product
    /// on 5 byte-limbs instead of 8 and 6; results carry a small zero-mean error (standard
    /// deviation ≈ 5 for GPT-2 widths), far below the int8 quantization error of the same
    /// product (docs/CRYPTO.md §4).
    Compact,
}

impl Setting {
    pub const ALL: [Setting; 2] = [Setting::Exact, Setting::Compact];

    /// Bits kept of each ciphertext body on the way up (masks travel as a seed).
    pub fn input_bits(self) -> u32 {
        match self {
            Setting::Exact => 48,
            Setting::Compact => 40,
        }
    }

    /// Bits of each mask coefficient the server computes with (rounded to nearest).
    pub fn mask_bits(self) -> u32 {
        match self {
            Setting::Exact => 64,
            Setting::Compact => 40,
        }
    }

    /// Bits kept of each output coefficient (mask and body) on the way down.
    pub fn output_bits(self) -> u32 {
        match self {
            Setting::Exact => 64,
            Setting::Compact => 28,
        }
    }

    pub fn wire_id(self) -> u8 {
        match self {
            Setting::Exact => 0,
            Setting::Compact => 1,
        }
    }

    pub fn from_wire_id(id: u8) -> Option<Setting> {
        Setting::ALL.into_iter().find(|s| s.wire_id() == id)
    }

    pub fn parse(name: &str) -> Option<Setting> {
        match name {
            "exact" => Some(Setting::Exact),
            "compact" => Some(Setting::Compact),
            _ => None,
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Setting::Exact => "exact",
            Setting::Compact => "compact",
        })
    }
}

/// Rounds `v` to its top `bits` bits (to nearest), returned right-aligned.
#[inline]
pub fn round_to_bits(v: u64, bits: u32) -> u64 {
    if bits >= 64 {
        return v;
    }
    let shift = 64 - bits;
    (v.wrapping_add(1 << (shift - 1)) >> shift) & ((1u64 << bits) - 1)
}

/// Puts a value rounded by [`round_to_bits`] back at the top of a 64-bit word.
#[inline]
pub fn restore_bits(v: u64, bits: u32) -> u64 {
    if bits >= 64 {
        v
    } else {
        v << (64 - bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_keeps_the_top_bits_to_nearest() {
        assert_eq!(restore_bits(round_to_bits(0x1234_5678_9abc_8000, 48), 48), 0x1234_5678_9abd_0000);
        assert_eq!(restore_bits(round_to_bits(0x1234_5678_9abc_7fff, 48), 48), 0x1234_5678_9abc_0000);
        // Wraps modulo 2^64 like the ring does.
        assert_eq!(restore_bits(round_to_bits(u64::MAX, 32), 32), 0);
        assert_eq!(round_to_bits(42, 64), 42);
    }
}
