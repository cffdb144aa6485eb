//! Client side: a quantized block of T tokens × n features becomes n RLWE ciphertexts, one
//! per feature, token t in coefficient t; results come back as m ciphertexts, one per output
//! feature, and decrypt to a T × m block of integers.

use rayon::prelude::*;
use tfhe::core_crypto::seeders::new_seeder;

use crate::keystream::{Keystream, BLOCK_BYTES};
use crate::wire::{pack_serial, packed_len, request_prefix, CallHeader};
use crate::{restore_bits, round_to_bits, ClientKey, RlweError, Setting, DELTA_LOG2, NOISE_BOUND_LOG2, POLY_SIZE};

/// n ciphertexts on their way to the server: masks as one seed, bodies rounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedBlock {
    pub setting: Setting,
    pub tokens: usize,
    pub inputs: usize,
    pub seed: u128,
    /// `inputs × N` bodies, each rounded to `setting.input_bits()` and right-aligned.
    pub bodies: Vec<u64>,
}

/// m ciphertexts on their way back, masks and bodies rounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedOutput {
    pub setting: Setting,
    pub tokens: usize,
    pub outputs: usize,
    /// `outputs × N` each, rounded to `setting.output_bits()` and right-aligned.
    pub masks: Vec<u64>,
    pub bodies: Vec<u64>,
}

/// AES blocks of stream per mask: N words of 8 bytes.
const MASK_BLOCKS: u128 = (POLY_SIZE * 8 / BLOCK_BYTES) as u128;
/// AES blocks of noise stream per ciphertext: N words of 4 bytes, 19 bits of each used.
const NOISE_BLOCKS: u128 = (POLY_SIZE * 4 / BLOCK_BYTES) as u128;

/// The `count × N` masks that `seed` stands for; client and server expand them alike. Mask i
/// is words `i·N ..` of the seed's stream: what tfhe's `RandomGenerator` fills, forked into
/// one child of `8·N` bytes per mask.
pub fn expand_masks(seed: u128, count: usize) -> Vec<u64> {
    let stream = Keystream::new(seed);
    let mut masks = vec![0u64; count * POLY_SIZE];
    masks.par_chunks_mut(POLY_SIZE).enumerate().for_each_with(stream, |stream, (i, mask)| fill_mask(stream, i, mask));
    masks
}

/// Mask `i` of a seed's stream.
fn fill_mask(stream: &mut Keystream, i: usize, mask: &mut [u64]) {
    stream.fill_u64(i as u128 * MASK_BLOCKS, mask);
}

/// A TUniform(2^b) sample (every integer in [−2^b, 2^b], the two ends at half weight) from
/// the low b + 2 bits of a uniform word, mapped as tfhe's sampler maps them.
#[inline]
fn tuniform(word: u32) -> u64 {
    let r = (word & ((1u32 << (NOISE_BOUND_LOG2 + 2)) - 1)) as u64;
    (r >> 1).wrapping_add(r & 1).wrapping_sub(1 << NOISE_BOUND_LOG2)
}

/// Adds one TUniform(2^17) sample per coefficient, from the stream's words at `first_block`.
fn add_noise(stream: &mut Keystream, first_block: u128, body: &mut [u64]) {
    let mut words = vec![0u32; body.len()];
    stream.fill_u32(first_block, &mut words);
    for (b, w) in body.iter_mut().zip(words) {
        *b = b.wrapping_add(tuniform(w));
    }
}

/// One block's encryption, feature by feature: `b = e + a·s + Δ·m`, each mask made where it
/// is used, never all of them at once.
struct Encryptor<'a> {
    key: &'a ClientKey,
    values: &'a [i8],
    tokens: usize,
    inputs: usize,
    bits: u32,
    seed: u128,
    /// Mask stream (its seed travels) and noise stream (its seed never does).
    streams: (Keystream, Keystream),
}

/// What each thread reuses: its copies of the streams and a mask buffer.
type Scratch = ((Keystream, Keystream), Vec<u64>);

impl<'a> Encryptor<'a> {
    fn new(key: &'a ClientKey, setting: Setting, values: &'a [i8], tokens: usize, inputs: usize) -> Result<Encryptor<'a>, RlweError> {
        if tokens == 0 || tokens > POLY_SIZE || values.len() != tokens * inputs {
            return Err(RlweError::Shape(format!("a block holds 1 to {POLY_SIZE} tokens; got {tokens} × {inputs} for {} values", values.len())));
        }
        let mut seeder = new_seeder();
        let seed = seeder.seed().0;
        let streams = (Keystream::new(seed), Keystream::new(seeder.seed().0));
        Ok(Encryptor { key, values, tokens, inputs, bits: setting.input_bits(), seed, streams })
    }

    fn scratch(&self) -> Scratch {
        (self.streams.clone(), vec![0u64; POLY_SIZE])
    }

    /// The rounded body of input feature `i`.
    fn feature(&self, ((masks, noise), mask): &mut Scratch, i: usize, body: &mut [u64]) {
        fill_mask(masks, i, mask);
        self.key.product().mul(mask, body);
        add_noise(noise, i as u128 * NOISE_BLOCKS, body);
        for (t, b) in body.iter_mut().enumerate() {
            let message = if t < self.tokens { (self.values[t * self.inputs + i] as i64 as u64) << DELTA_LOG2 } else { 0 };
            *b = round_to_bits(b.wrapping_add(message), self.bits);
        }
    }
}

/// Encrypts a row-major `tokens × inputs` block of int8 values.
pub fn encrypt(key: &ClientKey, setting: Setting, values: &[i8], tokens: usize, inputs: usize) -> Result<EncryptedBlock, RlweError> {
    let e = Encryptor::new(key, setting, values, tokens, inputs)?;
    let mut bodies = vec![0u64; inputs * POLY_SIZE];
    bodies.par_chunks_mut(POLY_SIZE).enumerate().for_each_init(|| e.scratch(), |scratch, (i, body)| e.feature(scratch, i, body));
    Ok(EncryptedBlock { setting, tokens, inputs, seed: e.seed, bodies })
}

/// Encrypts straight into the bytes of a request (what `encode_request(call, &encrypt(…))`
/// gives), packing each feature's body where it goes: no `inputs × N` array of 64-bit bodies.
pub fn encrypt_request(key: &ClientKey, setting: Setting, call: CallHeader, values: &[i8], tokens: usize, inputs: usize) -> Result<Vec<u8>, RlweError> {
    let e = Encryptor::new(key, setting, values, tokens, inputs)?;
    let mut out = request_prefix(call, setting, tokens, inputs, e.seed);
    let prefix = out.len();
    let per_feature = packed_len(POLY_SIZE, e.bits);
    out.resize(prefix + inputs * per_feature, 0);
    out[prefix..].par_chunks_mut(per_feature).enumerate().for_each_init(
        || (e.scratch(), vec![0u64; POLY_SIZE]),
        |(scratch, body), (i, bytes)| {
            e.feature(scratch, i, body);
            pack_serial(body, e.bits, bytes);
        },
    );
    Ok(out)
}

/// Decrypts one output ciphertext (mask and body rounded to `bits`, right-aligned) into the
/// integer products of its first `column.len()` coefficients (tokens).
pub fn decrypt_ciphertext(key: &ClientKey, mask: &[u64], body: &[u64], bits: u32, column: &mut [i64]) {
    let mut product = vec![0u64; POLY_SIZE];
    key.product().mul_rounded(mask, bits, &mut product);
    for ((y, &b), &p) in column.iter_mut().zip(body).zip(&product) {
        let phase = restore_bits(b, bits).wrapping_sub(p);
        // Round to the nearest multiple of Δ, read as a signed integer.
        *y = (phase.wrapping_add(1 << (DELTA_LOG2 - 1)) as i64) >> DELTA_LOG2;
    }
}

/// Decrypts to a row-major `tokens × outputs` block of integer products.
pub fn decrypt(key: &ClientKey, output: &EncryptedOutput) -> Vec<i64> {
    let (tokens, outputs, bits) = (output.tokens, output.outputs, output.setting.output_bits());
    let mut columns = vec![0i64; outputs * tokens];
    columns.par_chunks_mut(tokens).enumerate().for_each(|(j, column)| {
        let at = j * POLY_SIZE..(j + 1) * POLY_SIZE;
        decrypt_ciphertext(key, &output.masks[at.clone()], &output.bodies[at], bits, column);
    });
    // Column-major (one ciphertext per output) to row-major tokens × outputs.
    let mut rows = vec![0i64; tokens * outputs];
    rows.par_chunks_mut(outputs).enumerate().for_each(|(t, row)| {
        for (j, y) in row.iter_mut().enumerate() {
            *y = columns[j * tokens + t];
        }
    });
    rows
}

#[cfg(test)]
mod tests {
    use tfhe::core_crypto::commons::generators::EncryptionRandomGenerator;
    use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, RandomGenerator, Seed, TUniform};
    use tfhe::core_crypto::prelude::{
        decrypt_glwe_ciphertext, encrypt_glwe_ciphertext, CiphertextModulus, GlweCiphertext, GlweSize, PlaintextCount, PlaintextList, PolynomialSize,
    };

    use super::*;

    #[test]
    fn masks_are_tfhe_generator_output() {
        for (seed, count) in [(0u128, 3), (0x0123_4567_89ab_cdef_fedc_ba98_7654_3210, 5)] {
            let mut tfhe = vec![0u64; count * POLY_SIZE];
            let children = RandomGenerator::<DefaultRandomGenerator>::new(Seed(seed)).try_fork(count, POLY_SIZE * 8).unwrap();
            for (mask, mut child) in tfhe.chunks_mut(POLY_SIZE).zip(children) {
                child.fill_slice_with_random_uniform(mask);
            }
            assert_eq!(expand_masks(seed, count), tfhe, "seed {seed:#x}");
        }
    }

    #[test]
    fn noise_is_tuniform() {
        // Over all b + 2 low bits: every integer of [−2^b, 2^b] twice, the two ends once.
        let bound = 1i64 << NOISE_BOUND_LOG2;
        let mut counts = vec![0u32; 2 * bound as usize + 1];
        for r in 0..1u32 << (NOISE_BOUND_LOG2 + 2) {
            let e = tuniform(r) as i64;
            assert!(e.abs() <= bound, "{r} gives {e}");
            counts[(e + bound) as usize] += 1;
        }
        let last = counts.len() - 1;
        assert!(counts[0] == 1 && counts[last] == 1 && counts[1..last].iter().all(|&c| c == 2));
        // High bits of the word do not matter.
        assert_eq!(tuniform(5), tuniform(5 | 1 << 30));
        // The stream's words, not zeros, drive it.
        let mut body = vec![0u64; POLY_SIZE];
        add_noise(&mut Keystream::new(9), 0, &mut body);
        assert!(body.iter().filter(|&&e| e == 0).count() < 8);
    }

    fn decode(v: u64) -> i64 {
        (v.wrapping_add(1 << (DELTA_LOG2 - 1)) as i64) >> DELTA_LOG2
    }

    #[test]
    fn our_ciphertexts_are_tfhe_glwe_ciphertexts_and_back() {
        let key = ClientKey::from_seed(1);
        let (tokens, inputs) = (5, 2);
        let x: Vec<i8> = vec![1, -2, 3, -4, 127, -128, 0, 9, -77, 55];
        let block = encrypt(&key, Setting::Exact, &x, tokens, inputs).unwrap();
        let masks = expand_masks(block.seed, inputs);
        for i in 0..inputs {
            let mut data = masks[i * POLY_SIZE..(i + 1) * POLY_SIZE].to_vec();
            data.extend(block.bodies[i * POLY_SIZE..(i + 1) * POLY_SIZE].iter().map(|&b| restore_bits(b, Setting::Exact.input_bits())));
            let ct = GlweCiphertext::from_container(data, PolynomialSize(POLY_SIZE), CiphertextModulus::new_native());
            let mut plain = PlaintextList::new(0u64, PlaintextCount(POLY_SIZE));
            decrypt_glwe_ciphertext(key.secret(), &ct, &mut plain);
            let decoded: Vec<i64> = plain.as_ref().iter().map(|&v| decode(v)).collect();
            for t in 0..POLY_SIZE {
                let want = if t < tokens { x[t * inputs + i] as i64 } else { 0 };
                assert_eq!(decoded[t], want, "tfhe decrypts ours: input {i}, coefficient {t}");
            }
        }

        // A ciphertext made by tfhe's own encryption decrypts with ours.
        let messages: Vec<u64> = (0..POLY_SIZE as u64).map(|t| ((t % 7) as i64 - 3) as u64).collect();
        let plain = PlaintextList::from_container(messages.iter().map(|&m| m << DELTA_LOG2).collect::<Vec<u64>>());
        let mut ct = GlweCiphertext::new(0u64, GlweSize(2), PolynomialSize(POLY_SIZE), CiphertextModulus::new_native());
        let mut seeder = new_seeder();
        let mut generator = EncryptionRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed(), seeder.as_mut());
        encrypt_glwe_ciphertext(key.secret(), &mut ct, &plain, TUniform::<u64>::new(NOISE_BOUND_LOG2), &mut generator);
        let data = ct.into_container();
        let output = EncryptedOutput {
            setting: Setting::Exact,
            tokens: POLY_SIZE,
            outputs: 1,
            masks: data[..POLY_SIZE].to_vec(),
            bodies: data[POLY_SIZE..].to_vec(),
        };
        let ours: Vec<i64> = decrypt(&key, &output);
        assert_eq!(ours, messages.iter().map(|&m| m as i64).collect::<Vec<_>>());
    }
}
