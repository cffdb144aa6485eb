//! fhe-backend-rlwe: the FHE linear backend, token-major RLWE on tfhe-rs `core_crypto`, and
//! the only crate that touches ciphertexts.
//!
//! For a layer `Y = X·W` over T ≤ N tokens, the client encrypts each input feature i as one
//! RLWE ciphertext whose plaintext holds `x[t,i]` in coefficient t; the server returns
//! `C_j = Σ_i W[i,j]·c_i` for each output j (integer scalars times ciphertexts: no key
//! switching, no evaluation keys); the client decrypts coefficient t of `C_j` to `y[t,j]`.
//! docs/CRYPTO.md has the parameters, security and noise analysis.

mod client;
mod encrypt;
mod error;
mod kernel;
mod key;
mod keystream;
mod ntt;
mod params;
mod server;
pub mod wire;

pub use client::{FheBackend, LocalTransport, Reply, Traffic, Transport};
pub use encrypt::{decrypt, decrypt_ciphertext, encrypt, encrypt_request, expand_masks, EncryptedBlock, EncryptedOutput};
pub use error::RlweError;
pub use kernel::{kernel_name, linear_combination, PackedWeights};
pub use key::ClientKey;
pub use ntt::SecretProduct;
pub use params::*;
pub use server::LinearServer;
