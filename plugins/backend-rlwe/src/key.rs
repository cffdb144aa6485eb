//! The client's secret key: a binary GLWE secret from tfhe-rs, kept in a file only the user
//! can read and never sent anywhere.

use std::io::Write;
use std::path::Path;

use tfhe::core_crypto::commons::generators::SecretRandomGenerator;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, Seed};
use tfhe::core_crypto::prelude::{allocate_and_generate_new_binary_glwe_secret_key, GlweDimension, GlweSecretKeyOwned, PolynomialSize};
use tfhe::core_crypto::seeders::new_seeder;
use tfhe::safe_serialization::{safe_deserialize, safe_serialize};

use crate::ntt::SecretProduct;
use crate::{RlweError, PARAMETER_SET, POLY_SIZE};

const MAGIC: &[u8] = b"FHE-LORA-CLIENT-KEY\n";
const SIZE_LIMIT: u64 = 1 << 20;

pub struct ClientKey {
    secret: GlweSecretKeyOwned<u64>,
    product: SecretProduct,
}

impl ClientKey {
    /// A fresh key from the operating system's entropy (through tfhe's seeder).
    pub fn generate() -> ClientKey {
        ClientKey::from_seed(new_seeder().seed().0)
    }

    /// A reproducible key, for tests and benchmarks only.
    pub fn from_seed(seed: u128) -> ClientKey {
        let mut generator = SecretRandomGenerator::<DefaultRandomGenerator>::new(Seed(seed));
        let secret = allocate_and_generate_new_binary_glwe_secret_key(GlweDimension(1), PolynomialSize(POLY_SIZE), &mut generator);
        ClientKey::from_secret(secret)
    }

    fn from_secret(secret: GlweSecretKeyOwned<u64>) -> ClientKey {
        let product = SecretProduct::new(secret.as_ref());
        ClientKey { secret, product }
    }

    #[cfg(test)]
    pub(crate) fn secret(&self) -> &GlweSecretKeyOwned<u64> {
        &self.secret
    }

    pub(crate) fn product(&self) -> &SecretProduct {
        &self.product
    }

    /// Writes the key with owner-only permissions, atomically.
    pub fn save(&self, path: &Path) -> Result<(), RlweError> {
        let bad = |what: String| RlweError::Key { path: path.display().to_string(), what };
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(PARAMETER_SET.as_bytes());
        bytes.push(b'\n');
        safe_serialize(&self.secret, &mut bytes, SIZE_LIMIT).map_err(|e| bad(format!("cannot serialize ({e})")))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
        }
        let tmp = path.with_extension("tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(|e| bad(e.to_string()))?;
        file.write_all(&bytes).and_then(|_| file.sync_all()).map_err(|e| bad(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| bad(e.to_string()))
    }

    pub fn load(path: &Path) -> Result<ClientKey, RlweError> {
        let bad = |what: String| RlweError::Key { path: path.display().to_string(), what };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let rest = bytes.strip_prefix(MAGIC).ok_or_else(|| bad("not an fhe-lora client key file".into()))?;
        let newline = rest.iter().position(|&b| b == b'\n').ok_or_else(|| bad("truncated header".into()))?;
        let set = String::from_utf8_lossy(&rest[..newline]);
        if set != PARAMETER_SET {
            return Err(bad(format!("made for parameter set `{set}`, this build uses `{PARAMETER_SET}`; generate a new key")));
        }
        let secret: GlweSecretKeyOwned<u64> = safe_deserialize(&rest[newline + 1..], SIZE_LIMIT).map_err(|e| bad(format!("corrupt key ({e})")))?;
        if secret.polynomial_size().0 != POLY_SIZE || secret.glwe_dimension().0 != 1 || secret.as_ref().iter().any(|&b| b > 1) {
            return Err(bad("the key does not have this parameter set's shape".into()));
        }
        Ok(ClientKey::from_secret(secret))
    }

    /// Loads the key at `path`, or makes and saves a new one if there is none.
    pub fn load_or_generate(path: &Path) -> Result<ClientKey, RlweError> {
        if path.exists() {
            return ClientKey::load(path);
        }
        let key = ClientKey::generate();
        key.save(path)?;
        Ok(key)
    }
}
