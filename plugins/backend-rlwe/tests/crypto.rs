//! decrypt(server(encrypt(X), W)) against X·W: exact in the exact setting, within the stated
//! bound in the compact one, for random and extreme shapes and values; the wrong key fails;
//! every decoder refuses bad bytes without panicking.

use fhe_backend_rlwe::wire::{decode_request, decode_response, encode_request, CallHeader, PROTOCOL_VERSION};
use fhe_backend_rlwe::{decrypt, encrypt, encrypt_request, ClientKey, LinearServer, RlweError, Setting, POLY_SIZE};
use fhe_ir::{Direction, LayerId};
use rand::{Rng, SeedableRng};

type Rng64 = rand::rngs::StdRng;

fn exact_product(x: &[i8], tokens: usize, w: &[i8], n_in: usize, n_out: usize, direction: Direction) -> Vec<i64> {
    let (k, m) = if direction == Direction::Forward { (n_in, n_out) } else { (n_out, n_in) };
    let mut y = vec![0i64; tokens * m];
    for t in 0..tokens {
        for j in 0..m {
            y[t * m + j] = (0..k)
                .map(|i| {
                    let wv = if direction == Direction::Forward { w[i * n_out + j] } else { w[j * n_out + i] };
                    x[t * k + i] as i64 * wv as i64
                })
                .sum();
        }
    }
    y
}

/// One round trip through encryption, the wire, the server and decryption.
fn round_trip(key: &ClientKey, setting: Setting, x: &[i8], tokens: usize, w: &[i8], n_in: usize, n_out: usize, direction: Direction) -> Vec<i64> {
    let server = LinearServer::from_weights(vec![(LayerId(0), n_in, n_out, w.to_vec())]);
    let k = if direction == Direction::Forward { n_in } else { n_out };
    let block = encrypt(key, setting, x, tokens, k).unwrap();
    let call = CallHeader { layer: LayerId(0), direction };
    let response = server.handle(LayerId(0), direction, &encode_request(call, &block)).unwrap();
    let (_, output) = decode_response(&response).unwrap();
    decrypt(key, &output)
}

fn random_i8(rng: &mut Rng64, len: usize) -> Vec<i8> {
    (0..len).map(|_| rng.random_range(-127..=127)).collect()
}

#[test]
fn exact_setting_equals_the_integer_product() {
    let key = ClientKey::from_seed(1);
    let mut rng = Rng64::seed_from_u64(2);
    for (tokens, n_in, n_out) in [(1, 3, 5), (7, 64, 192), (2048, 16, 8), (1000, 33, 17), (129, 256, 64)] {
        for direction in [Direction::Forward, Direction::Backward] {
            let k = if direction == Direction::Forward { n_in } else { n_out };
            let (x, w) = (random_i8(&mut rng, tokens * k), random_i8(&mut rng, n_in * n_out));
            let got = round_trip(&key, Setting::Exact, &x, tokens, &w, n_in, n_out, direction);
            assert_eq!(got, exact_product(&x, tokens, &w, n_in, n_out, direction), "T={tokens} {n_in}×{n_out} {direction}");
        }
    }
}

#[test]
fn exact_setting_holds_at_gpt2_widths_and_extreme_values() {
    let key = ClientKey::from_seed(3);
    // GPT-2's widest layer in both directions, all of a full block of tokens.
    let mut rng = Rng64::seed_from_u64(4);
    let (tokens, n_in, n_out) = (2048, 3072, 2304);
    let x = random_i8(&mut rng, tokens * n_in);
    let w = random_i8(&mut rng, n_in * n_out);
    let got = round_trip(&key, Setting::Exact, &x, tokens, &w, n_in, n_out, Direction::Forward);
    // Tokens are independent; check the first, the last and a random sample of rows.
    let mut rows: Vec<usize> = (0..16).chain(tokens - 16..tokens).collect();
    rows.extend((0..32).map(|_| rng.random_range(0..tokens)));
    for t in rows {
        let want = exact_product(&x[t * n_in..(t + 1) * n_in], 1, &w, n_in, n_out, Direction::Forward);
        assert_eq!(got[t * n_out..(t + 1) * n_out], want[..], "3072 × 2304, T = 2048, token {t}");
    }
    // Largest products the bound covers: 3072 inputs, every value at −128 or 127.
    for (xv, wv) in [(-128i8, -128i8), (127, 127), (-128, 127), (127, -128)] {
        let (tokens, n_in, n_out) = (5, 3072, 4);
        let x = vec![xv; tokens * n_in];
        let w = vec![wv; n_in * n_out];
        let got = round_trip(&key, Setting::Exact, &x, tokens, &w, n_in, n_out, Direction::Forward);
        assert_eq!(got, vec![3072 * xv as i64 * wv as i64; tokens * n_out], "x = {xv}, w = {wv}");
    }
}

/// docs/CRYPTO.md §4: the compact setting's error is zero-mean with a standard deviation of
/// about 5 (up to 6.5 at n = 3072 with weights as large as int8 allows); a mis-rounded limb
/// or a missing rounding offset would show as a spread or mean far off those. (The errors of
/// one ciphertext's coefficients are correlated through the negacyclic product, so the mean
/// over a few hundred ciphertexts still varies by a few tenths from run to run.)
#[test]
fn compact_setting_error_is_small_and_unbiased() {
    let key = ClientKey::from_seed(5);
    let mut rng = Rng64::seed_from_u64(6);
    let mut errors = Vec::new();
    for (tokens, n_in, n_out, direction) in [(2048, 768, 96, Direction::Forward), (300, 64, 768, Direction::Backward), (64, 3072, 8, Direction::Forward)] {
        let k = if direction == Direction::Forward { n_in } else { n_out };
        let (x, w) = (random_i8(&mut rng, tokens * k), random_i8(&mut rng, n_in * n_out));
        let got = round_trip(&key, Setting::Compact, &x, tokens, &w, n_in, n_out, direction);
        let want = exact_product(&x, tokens, &w, n_in, n_out, direction);
        errors.extend(got.iter().zip(&want).map(|(a, b)| (a - b) as f64));
    }
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    let std = (errors.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / errors.len() as f64).sqrt();
    let worst = errors.iter().fold(0f64, |m, e| m.max(e.abs()));
    assert!(mean.abs() < 1.5 && (3.0..8.0).contains(&std) && worst <= 60.0, "compact error: mean {mean}, std {std}, worst {worst}");
}

#[test]
fn requests_encrypted_in_place_are_the_same_requests() {
    // The client's streaming path (`encrypt_request`) against `encode_request(encrypt(…))`:
    // same layout, and the server's answer decrypts to the exact product.
    let key = ClientKey::from_seed(12);
    let mut rng = Rng64::seed_from_u64(13);
    let (tokens, n_in, n_out) = (300, 48, 24);
    let (x, w) = (random_i8(&mut rng, tokens * n_in), random_i8(&mut rng, n_in * n_out));
    let server = LinearServer::from_weights(vec![(LayerId(0), n_in, n_out, w.clone())]);
    let call = CallHeader { layer: LayerId(0), direction: Direction::Forward };
    for setting in Setting::ALL {
        let request = encrypt_request(&key, setting, call, &x, tokens, n_in).unwrap();
        let (_, block) = decode_request(&request).unwrap();
        assert_eq!((block.setting, block.tokens, block.inputs), (setting, tokens, n_in));
        assert_eq!(encode_request(call, &block), request, "{setting}");
        let (_, output) = decode_response(&server.handle(LayerId(0), Direction::Forward, &request).unwrap()).unwrap();
        let (got, want) = (decrypt(&key, &output), exact_product(&x, tokens, &w, n_in, n_out, Direction::Forward));
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).max().unwrap();
        assert!(worst <= if setting == Setting::Exact { 0 } else { 60 }, "{setting}: error {worst}");
    }
}

#[test]
fn another_key_cannot_decrypt() {
    let (key, other) = (ClientKey::from_seed(7), ClientKey::from_seed(8));
    let mut rng = Rng64::seed_from_u64(9);
    let (tokens, n_in, n_out) = (64, 32, 16);
    let (x, w) = (random_i8(&mut rng, tokens * n_in), random_i8(&mut rng, n_in * n_out));
    let server = LinearServer::from_weights(vec![(LayerId(0), n_in, n_out, w.clone())]);
    let block = encrypt(&key, Setting::Exact, &x, tokens, n_in).unwrap();
    let call = CallHeader { layer: LayerId(0), direction: Direction::Forward };
    let (_, output) = decode_response(&server.handle(LayerId(0), Direction::Forward, &encode_request(call, &block)).unwrap()).unwrap();
    let want = exact_product(&x, tokens, &w, n_in, n_out, Direction::Forward);
    assert_eq!(decrypt(&key, &output), want);
    let wrong = decrypt(&other, &output);
    let matching = wrong.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert!(matching < want.len() / 100, "{matching} of {} values decrypted with the wrong key", want.len());
}

#[test]
fn encryption_is_randomized_and_hides_equal_inputs() {
    let key = ClientKey::from_seed(10);
    let x = vec![5i8; 4 * 3];
    let (a, b) = (encrypt(&key, Setting::Exact, &x, 4, 3).unwrap(), encrypt(&key, Setting::Exact, &x, 4, 3).unwrap());
    assert_ne!(a.seed, b.seed);
    assert_ne!(a.bodies, b.bodies);
}

fn valid_request(tokens: usize, inputs: usize) -> Vec<u8> {
    let key = ClientKey::from_seed(11);
    let block = encrypt(&key, Setting::Compact, &vec![1i8; tokens * inputs], tokens, inputs).unwrap();
    encode_request(CallHeader { layer: LayerId(0), direction: Direction::Forward }, &block)
}

fn wire_error(result: Result<Vec<u8>, RlweError>) -> String {
    result.err().expect("must be refused").to_string()
}

#[test]
fn malformed_requests_are_refused_with_the_reason() {
    let server = LinearServer::from_weights(vec![(LayerId(0), 8, 4, vec![1; 32])]);
    let handle = |bytes: &[u8]| server.handle(LayerId(0), Direction::Forward, bytes);
    let good = valid_request(3, 8);
    assert!(handle(&good).is_ok());

    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() - 1].to_vec(), "truncated"),
        ([good.clone(), vec![0]].concat(), "oversized"),
        (good[..10].to_vec(), "shorter than its 22-byte header"),
        (b"GET / HTTP/1.1\r\n\r\n and some more bytes".to_vec(), "wrong magic"),
        (valid_request(3, 9), "takes 8 features per token, the request has 9"),
    ];
    let mut patched = |offset: usize, bytes: &[u8], expected: &'static str| {
        let mut m = good.clone();
        m[offset..offset + bytes.len()].copy_from_slice(bytes);
        cases.push((m, expected));
    };
    patched(4, &(PROTOCOL_VERSION + 1).to_le_bytes(), "protocol version 3 is not supported");
    patched(6, &7u16.to_le_bytes(), "parameter set 7 is not this server's");
    patched(8, &[9], "unknown setting 9");
    patched(9, &[4], "unknown direction 4");
    patched(9, &[1], "sent to layer 0 forward");
    patched(10, &5u32.to_le_bytes(), "is for layer 5");
    patched(14, &0u32.to_le_bytes(), "0 tokens");
    patched(14, &(POLY_SIZE as u32 + 1).to_le_bytes(), "2049 tokens");
    patched(18, &0u32.to_le_bytes(), "0 features");
    patched(18, &u32::MAX.to_le_bytes(), "at most 16384");
    for (bytes, expected) in cases {
        let message = wire_error(handle(&bytes));
        assert!(message.contains(expected), "`{expected}` not in `{message}`");
    }
    let message = wire_error(server.handle(LayerId(3), Direction::Forward, &good));
    assert!(message.contains("unknown layer 3"), "{message}");
}

#[test]
fn random_bytes_never_panic_any_decoder() {
    let server = LinearServer::from_weights(vec![(LayerId(0), 8, 4, vec![1; 32])]);
    let good = valid_request(2, 8);
    let mut rng = Rng64::seed_from_u64(12);
    for round in 0..3000 {
        let bytes: Vec<u8> = match round % 3 {
            // Pure noise of any length.
            0 => (0..rng.random_range(0..200)).map(|_| rng.random()).collect(),
            // A valid message with a few bytes flipped (headers mostly).
            1 => {
                let mut m = good.clone();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..40.min(m.len()));
                    m[i] ^= rng.random::<u8>() | 1;
                }
                m
            }
            // A valid message cut anywhere.
            _ => good[..rng.random_range(0..good.len())].to_vec(),
        };
        let _ = decode_request(&bytes);
        let _ = decode_response(&bytes);
        let _ = server.handle(LayerId(0), Direction::Forward, &bytes);
    }
}

#[test]
fn a_client_key_round_trips_through_its_file_and_only_the_owner_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys/client.key");
    let key = ClientKey::from_seed(13);
    key.save(&path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let loaded = ClientKey::load(&path).unwrap();
    let x = vec![3i8; 2 * 4];
    let server = LinearServer::from_weights(vec![(LayerId(0), 4, 2, vec![2; 8])]);
    let block = encrypt(&key, Setting::Exact, &x, 2, 4).unwrap();
    let call = CallHeader { layer: LayerId(0), direction: Direction::Forward };
    let (_, out) = decode_response(&server.handle(LayerId(0), Direction::Forward, &encode_request(call, &block)).unwrap()).unwrap();
    assert_eq!(decrypt(&loaded, &out), vec![24; 4]);

    std::fs::write(&path, b"not a key").unwrap();
    assert!(ClientKey::load(&path).err().unwrap().to_string().contains("not an fhe-lora client key file"));
    let missing = ClientKey::load(&dir.path().join("none.key")).err().unwrap().to_string();
    assert!(missing.contains("none.key"), "{missing}");
}
