//! Wire encoding of server calls: a fixed little-endian header, then bit-packed values.
//! Decoding checks every field and the exact length before touching the payload.
//!
//! ```text
//! request:  "FLRQ" version:u16 parameter_set:u16 setting:u8 direction:u8 layer:u32
//!           tokens:u32 inputs:u32 seed:u128 | bodies: inputs·N values of input_bits
//! response: "FLRS" version:u16 parameter_set:u16 setting:u8 direction:u8 layer:u32
//!           tokens:u32 outputs:u32 | masks, bodies: outputs·N values of output_bits each
//! ```

use fhe_ir::{Direction, LayerId};
use rayon::prelude::*;

use crate::{EncryptedBlock, EncryptedOutput, RlweError, Setting, PARAMETER_SET_ID, POLY_SIZE};

pub const PROTOCOL_VERSION: u16 = 2;
const REQUEST_MAGIC: &[u8; 4] = b"FLRQ";
const RESPONSE_MAGIC: &[u8; 4] = b"FLRS";
const HEADER_LEN: usize = 22;
/// No GPT-2 layer is wider; bounds what a header can make the server allocate.
pub const MAX_FEATURES: usize = 16384;

/// Who the message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallHeader {
    pub layer: LayerId,
    pub direction: Direction,
}

/// Packs each value's low `bits` bits, little-endian, back to back.
pub fn pack(values: &[u64], bits: u32) -> Vec<u8> {
    let mut out = vec![0u8; packed_len(values.len(), bits)];
    // 8 values fill exactly `bits` bytes: groups pack independently, in parallel.
    let group = bits as usize;
    let whole = values.len() / 8;
    let (head, tail) = out.split_at_mut(whole * group);
    head.par_chunks_mut(group).zip(values.par_chunks_exact(8)).for_each(|(o, v)| pack_serial(v, bits, o));
    pack_serial(&values[whole * 8..], bits, tail);
    out
}

/// Packs `values` into `out` from its first byte (exactly `packed_len(values.len(), bits)` long).
pub fn pack_serial(values: &[u64], bits: u32, out: &mut [u8]) {
    let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let (mut acc, mut filled, mut at) = (0u128, 0u32, 0);
    for &v in values {
        acc |= ((v & mask) as u128) << filled;
        filled += bits;
        while filled >= 8 {
            out[at] = acc as u8;
            at += 1;
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out[at] = acc as u8;
    }
}

pub fn packed_len(count: usize, bits: u32) -> usize {
    (count * bits as usize).div_ceil(8)
}

/// Inverse of [`pack`]; `bytes` must be exactly `packed_len(count, bits)` long.
pub fn unpack(bytes: &[u8], count: usize, bits: u32) -> Vec<u64> {
    let mut out = vec![0u64; count];
    let group = bits as usize;
    let whole = count / 8;
    let (head, tail) = out.split_at_mut(whole * 8);
    head.par_chunks_mut(8).zip(bytes.par_chunks_exact(group)).for_each(|(o, b)| unpack_serial(b, bits, o));
    unpack_serial(&bytes[whole * group..], bits, tail);
    out
}

fn unpack_serial(bytes: &[u8], bits: u32, out: &mut [u64]) {
    let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let (mut acc, mut filled) = (0u128, 0u32);
    let mut bytes = bytes.iter();
    for v in out {
        while filled < bits {
            acc |= (*bytes.next().expect("length checked") as u128) << filled;
            filled += 8;
        }
        *v = acc as u64 & mask;
        acc >>= bits;
        filled -= bits;
    }
}

fn direction_id(d: Direction) -> u8 {
    match d {
        Direction::Forward => 0,
        Direction::Backward => 1,
    }
}

fn header(magic: &[u8; 4], setting: Setting, call: CallHeader, tokens: usize, features: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN + 16);
    h.extend_from_slice(magic);
    h.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h.extend_from_slice(&PARAMETER_SET_ID.to_le_bytes());
    h.push(setting.wire_id());
    h.push(direction_id(call.direction));
    h.extend_from_slice(&call.layer.0.to_le_bytes());
    h.extend_from_slice(&(tokens as u32).to_le_bytes());
    h.extend_from_slice(&(features as u32).to_le_bytes());
    h
}

pub fn encode_request(call: CallHeader, block: &EncryptedBlock) -> Vec<u8> {
    let mut out = request_prefix(call, block.setting, block.tokens, block.inputs, block.seed);
    out.extend_from_slice(&pack(&block.bodies, block.setting.input_bits()));
    out
}

/// A request's header and seed; the packed bodies follow, `packed_len(N, input_bits)` bytes
/// per input feature, in feature order.
pub fn request_prefix(call: CallHeader, setting: Setting, tokens: usize, inputs: usize, seed: u128) -> Vec<u8> {
    let mut out = header(REQUEST_MAGIC, setting, call, tokens, inputs);
    out.extend_from_slice(&seed.to_le_bytes());
    out
}

pub fn encode_response(call: CallHeader, output: &EncryptedOutput) -> Vec<u8> {
    let bits = output.setting.output_bits();
    let mut out = header(RESPONSE_MAGIC, output.setting, call, output.tokens, output.outputs);
    out.extend_from_slice(&pack(&output.masks, bits));
    out.extend_from_slice(&pack(&output.bodies, bits));
    out
}

struct Header {
    setting: Setting,
    call: CallHeader,
    tokens: usize,
    features: usize,
}

fn bad(what: impl Into<String>) -> RlweError {
    RlweError::Wire(what.into())
}

fn decode_header(bytes: &[u8], magic: &[u8; 4], what: &str) -> Result<Header, RlweError> {
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!("{what} is {} bytes, shorter than its {HEADER_LEN}-byte header (truncated?)", bytes.len())));
    }
    if &bytes[..4] != magic {
        return Err(bad(format!("not an fhe-lora {what} (wrong magic bytes)")));
    }
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let version = u16_at(4);
    if version != PROTOCOL_VERSION {
        return Err(bad(format!("protocol version {version} is not supported; this build speaks version {PROTOCOL_VERSION}")));
    }
    let set = u16_at(6);
    if set != PARAMETER_SET_ID {
        return Err(bad(format!("parameter set {set} is not this server's ({PARAMETER_SET_ID}, {})", crate::PARAMETER_SET)));
    }
    let setting = Setting::from_wire_id(bytes[8]).ok_or_else(|| bad(format!("unknown setting {}", bytes[8])))?;
    let direction = match bytes[9] {
        0 => Direction::Forward,
        1 => Direction::Backward,
        d => return Err(bad(format!("unknown direction {d}"))),
    };
    let (tokens, features) = (u32_at(14) as usize, u32_at(18) as usize);
    if tokens == 0 || tokens > POLY_SIZE {
        return Err(bad(format!("{tokens} tokens; a message carries 1 to {POLY_SIZE}")));
    }
    if features == 0 || features > MAX_FEATURES {
        return Err(bad(format!("{features} features; at most {MAX_FEATURES} are accepted")));
    }
    Ok(Header { setting, call: CallHeader { layer: LayerId(u32_at(10)), direction }, tokens, features })
}

fn check_len(bytes: &[u8], expected: usize, what: &str) -> Result<(), RlweError> {
    if bytes.len() != expected {
        let kind = if bytes.len() < expected { "truncated" } else { "oversized" };
        return Err(bad(format!("{what} is {kind}: {} bytes where its header implies {expected}", bytes.len())));
    }
    Ok(())
}

pub fn decode_request(bytes: &[u8]) -> Result<(CallHeader, EncryptedBlock), RlweError> {
    let h = decode_header(bytes, REQUEST_MAGIC, "request")?;
    let bits = h.setting.input_bits();
    let payload = packed_len(h.features * POLY_SIZE, bits);
    check_len(bytes, HEADER_LEN + 16 + payload, "request")?;
    let seed = u128::from_le_bytes(bytes[HEADER_LEN..HEADER_LEN + 16].try_into().unwrap());
    let bodies = unpack(&bytes[HEADER_LEN + 16..], h.features * POLY_SIZE, bits);
    Ok((h.call, EncryptedBlock { setting: h.setting, tokens: h.tokens, inputs: h.features, seed, bodies }))
}

/// A response's output ciphertexts, still packed: each unpacks on its own, so a client can
/// decrypt them one at a time (in parallel) without unpacking the whole response first.
pub struct PackedOutput<'a> {
    pub setting: Setting,
    pub tokens: usize,
    pub outputs: usize,
    masks: &'a [u8],
    bodies: &'a [u8],
}

impl PackedOutput<'_> {
    /// Mask and body of output ciphertext `j`: N values each, rounded to the setting's output
    /// bits and right-aligned. (N values of any width are whole bytes: N is a multiple of 8.)
    pub fn ciphertext(&self, j: usize) -> (Vec<u64>, Vec<u64>) {
        let bits = self.setting.output_bits();
        let len = packed_len(POLY_SIZE, bits);
        let part = |bytes: &[u8]| unpack_serial_vec(&bytes[j * len..(j + 1) * len], POLY_SIZE, bits);
        (part(self.masks), part(self.bodies))
    }

    pub fn unpack(&self) -> EncryptedOutput {
        let (count, bits) = (self.outputs * POLY_SIZE, self.setting.output_bits());
        EncryptedOutput {
            setting: self.setting,
            tokens: self.tokens,
            outputs: self.outputs,
            masks: unpack(self.masks, count, bits),
            bodies: unpack(self.bodies, count, bits),
        }
    }
}

fn unpack_serial_vec(bytes: &[u8], count: usize, bits: u32) -> Vec<u64> {
    let mut out = vec![0u64; count];
    unpack_serial(bytes, bits, &mut out);
    out
}

/// Checks a response and returns its ciphertexts packed.
pub fn decode_response_packed(bytes: &[u8]) -> Result<(CallHeader, PackedOutput<'_>), RlweError> {
    let h = decode_header(bytes, RESPONSE_MAGIC, "response")?;
    let half = packed_len(h.features * POLY_SIZE, h.setting.output_bits());
    check_len(bytes, HEADER_LEN + 2 * half, "response")?;
    let (masks, bodies) = bytes[HEADER_LEN..].split_at(half);
    Ok((h.call, PackedOutput { setting: h.setting, tokens: h.tokens, outputs: h.features, masks, bodies }))
}

pub fn decode_response(bytes: &[u8]) -> Result<(CallHeader, EncryptedOutput), RlweError> {
    let (call, packed) = decode_response_packed(bytes)?;
    Ok((call, packed.unpack()))
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn packing_round_trips_every_width() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for bits in [1, 7, 13, 32, 40, 48, 63, 64] {
            let values: Vec<u64> = (0..101).map(|_| rng.random::<u64>() & if bits == 64 { u64::MAX } else { (1 << bits) - 1 }).collect();
            let packed = pack(&values, bits);
            assert_eq!(packed.len(), packed_len(values.len(), bits));
            assert_eq!(unpack(&packed, values.len(), bits), values, "{bits} bits");
        }
    }
}
