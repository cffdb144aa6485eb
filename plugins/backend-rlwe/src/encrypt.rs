//! Client side: a quantized block of T tokens × n features becomes n RLWE ciphertexts, one
//! per feature, token t in coefficient t; results come back as m ciphertexts, one per output
//! feature, and decrypt to a T × m block of integers.

use rayon::prelude::*;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, RandomGenerator, Seed, TUniform};
use tfhe::core_crypto::seeders::new_seeder;

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

/// Bytes of CSPRNG output one TUniform(2^17) sample takes (its 19 bits, rounded up).
const NOISE_BYTES: usize = (NOISE_BOUND_LOG2 as usize + 2).div_ceil(8);

/// One child generator per ciphertext, each owning a disjoint range of the stream, so the
/// ciphertexts fill in parallel and the result does not depend on the thread count.
fn children(seed: Seed, count: usize, bytes_each: usize) -> impl IndexedParallelIterator<Item = RandomGenerator<DefaultRandomGenerator>> {
    RandomGenerator::<DefaultRandomGenerator>::new(seed).par_try_fork(count, bytes_each).expect("the stream covers every child")
}

/// The `count × N` masks that `seed` stands for; client and server expand them alike.
pub fn expand_masks(seed: u128, count: usize) -> Vec<u64> {
    let mut masks = vec![0u64; count * POLY_SIZE];
    masks.par_chunks_mut(POLY_SIZE).zip(children(Seed(seed), count, POLY_SIZE * 8)).for_each(|(mask, mut generator)| {
        generator.fill_slice_with_random_uniform(mask);
    });
    masks
}

/// Encrypts a row-major `tokens × inputs` block of int8 values.
pub fn encrypt(key: &ClientKey, setting: Setting, values: &[i8], tokens: usize, inputs: usize) -> Result<EncryptedBlock, RlweError> {
    if tokens == 0 || tokens > POLY_SIZE || values.len() != tokens * inputs {
        return Err(RlweError::Shape(format!("a block holds 1 to {POLY_SIZE} tokens; got {tokens} × {inputs} for {} values", values.len())));
    }
    let mut seeder = new_seeder();
    let seed = seeder.seed().0;
    let noise = children(seeder.seed(), inputs, POLY_SIZE * NOISE_BYTES);
    let masks = expand_masks(seed, inputs);
    let bits = setting.input_bits();
    let mut bodies = vec![0u64; inputs * POLY_SIZE];
    // b = e + a·s + Δ·m, one ciphertext per input feature.
    bodies.par_chunks_mut(POLY_SIZE).zip(masks.par_chunks(POLY_SIZE)).zip(noise).enumerate().for_each(|(i, ((body, mask), mut noise))| {
        noise.unsigned_integer_slice_wrapping_add_random_from_distribution_assign(body, TUniform::<u64>::new(NOISE_BOUND_LOG2));
        let mut product = vec![0u64; POLY_SIZE];
        key.product().mul(mask, &mut product);
        for (t, (b, p)) in body.iter_mut().zip(&product).enumerate() {
            let message = if t < tokens { (values[t * inputs + i] as i64 as u64) << DELTA_LOG2 } else { 0 };
            *b = round_to_bits(b.wrapping_add(*p).wrapping_add(message), bits);
        }
    });
    Ok(EncryptedBlock { setting, tokens, inputs, seed, bodies })
}

/// Decrypts to a row-major `tokens × outputs` block of integer products.
pub fn decrypt(key: &ClientKey, output: &EncryptedOutput) -> Vec<i64> {
    let (tokens, outputs, bits) = (output.tokens, output.outputs, output.setting.output_bits());
    let mut columns = vec![0i64; outputs * tokens];
    columns.par_chunks_mut(tokens).enumerate().for_each(|(j, column)| {
        let mask: Vec<u64> = output.masks[j * POLY_SIZE..(j + 1) * POLY_SIZE].iter().map(|&v| restore_bits(v, bits)).collect();
        let mut product = vec![0u64; POLY_SIZE];
        key.product().mul(&mask, &mut product);
        for (t, y) in column.iter_mut().enumerate() {
            let phase = restore_bits(output.bodies[j * POLY_SIZE + t], bits).wrapping_sub(product[t]);
            // Round to the nearest multiple of Δ, read as a signed integer.
            *y = (phase.wrapping_add(1 << (DELTA_LOG2 - 1)) as i64) >> DELTA_LOG2;
        }
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
    use tfhe::core_crypto::prelude::{
        decrypt_glwe_ciphertext, encrypt_glwe_ciphertext, CiphertextModulus, GlweCiphertext, GlweSize, PlaintextCount, PlaintextList, PolynomialSize,
    };

    use super::*;

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
