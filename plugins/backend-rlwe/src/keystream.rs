//! tfhe-rs's CSPRNG stream (AES-128-CTR, as `RandomGenerator<DefaultRandomGenerator>` makes
//! it from a seed) read in bulk: eight AES blocks per call instead of one byte per call
//! through tfhe's byte iterator, which was 30% of the client's time. Same cipher, same key
//! from the seed, same counters, so the same bytes (a test checks it against tfhe's
//! generator, forks included).

use tfhe_csprng::generators::aes_ctr::{Aes128Key, AesBlockCipher, AES_CALLS_PER_BATCH, BYTES_PER_BATCH};
use tfhe_csprng::generators::default::DefaultAes128BlockCipher;

/// Bytes of one AES block.
pub const BLOCK_BYTES: usize = 16;

/// The keystream of one seed; cheap to clone, one clone per thread.
#[derive(Clone)]
pub struct Keystream {
    cipher: DefaultAes128BlockCipher,
}

impl Keystream {
    pub fn new(seed: u128) -> Keystream {
        // tfhe-csprng takes the seed's little-endian bytes as the key.
        Keystream { cipher: DefaultAes128BlockCipher::new(Aes128Key::new(u128::from_le(seed))) }
    }

    /// The words at stream bytes `first_block·16 ..`, each from 8 bytes, little-endian (as
    /// tfhe's uniform u64 sampling reads them). `out.len()` must be a multiple of 16.
    pub fn fill_u64(&mut self, first_block: u128, out: &mut [u64]) {
        self.fill_words(first_block, out, u64::from_le_bytes);
    }

    /// The same with 4-byte words.
    pub fn fill_u32(&mut self, first_block: u128, out: &mut [u32]) {
        self.fill_words(first_block, out, u32::from_le_bytes);
    }

    fn fill_words<T, const W: usize>(&mut self, first_block: u128, out: &mut [T], from_le: fn([u8; W]) -> T) {
        let per_batch = BYTES_PER_BATCH / W;
        assert!(out.len().is_multiple_of(per_batch), "whole batches of {per_batch} words");
        for (b, words) in out.chunks_exact_mut(per_batch).enumerate() {
            let base = first_block + (b * AES_CALLS_PER_BATCH) as u128;
            let bytes = self.cipher.generate_batch(std::array::from_fn(|i| (base + i as u128).to_le()));
            for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(W)) {
                *w = from_le(chunk.try_into().expect("W bytes"));
            }
        }
    }
}
