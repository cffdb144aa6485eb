//! Benchmark: one encrypted GPT-2-small linear layer call with a full block of T = 2048
//! tokens, split into client encryption, server work and client decryption, with bytes on the
//! wire, against the clear f32 matmul of the same shape (the clear executor's GEMM) in the
//! same run.
//!
//! cargo run --release -p fhe-tests --bin bench_rlwe -- [--setting compact|exact] [--iters N]

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fhe_backend_rlwe::wire::{decode_response, encode_request, CallHeader};
use fhe_backend_rlwe::{decrypt, encrypt, kernel_name, ClientKey, LinearServer, Setting, POLY_SIZE};
use fhe_ir::{Direction, LayerId};
use fhe_tests::Random;

// As in the fhe-run binary: large per-request buffers are reused instead of being returned to
// the OS and faulted in again on every call.
#[global_allocator]
static ALLOCATOR: fhe_alloc::Allocator = fhe_alloc::Allocator;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<()> {
    fhe_alloc::keep_freed_memory();
    let (mut setting, mut iters) = (Setting::Compact, 3usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--setting" => setting = Setting::parse(&args.next().context("--setting needs a value")?).context("exact or compact")?,
            "--iters" => iters = args.next().context("--iters needs a value")?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let key = ClientKey::from_seed(1);
    let tokens = POLY_SIZE;
    let mut r = Random::new(0);
    println!(
        "T = {tokens} tokens per call, setting {setting}, {iters} iterations (median), kernel {}, NTT {}, {} rayon threads",
        kernel_name(),
        if key_uses_ifma(&key) { "ifma" } else { "portable" },
        rayon::current_num_threads()
    );
    println!("| layer (in×out) | encrypt | server | decrypt | server per token | clear f32 matmul | server / clear | up B/input | down B/output |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (n_in, n_out) in [(768, 2304), (768, 768), (768, 3072), (3072, 768)] {
        let w: Vec<i8> = (0..n_in * n_out).map(|i| ((i * 7919) % 255) as i32 as i8).collect();
        let server = LinearServer::from_weights(vec![(LayerId(0), n_in, n_out, w)]);
        let x: Vec<i8> = (0..tokens * n_in).map(|i| ((i * 104729) % 255) as i32 as i8).collect();
        let call = CallHeader { layer: LayerId(0), direction: Direction::Forward };
        let (mut enc, mut srv, mut dec) = (vec![], vec![], vec![]);
        let (mut up, mut down) = (0, 0);
        for _ in 0..iters {
            let t = Instant::now();
            let request = encode_request(call, &encrypt(&key, setting, &x, tokens, n_in)?);
            enc.push(t.elapsed());
            let t = Instant::now();
            let response = server.handle(LayerId(0), Direction::Forward, &request)?;
            srv.push(t.elapsed());
            let t = Instant::now();
            let (_, output) = decode_response(&response)?;
            let y = decrypt(&key, &output);
            dec.push(t.elapsed());
            assert_eq!(y.len(), tokens * n_out);
            (up, down) = (request.len(), response.len());
        }
        let (a, b) = (r.f32(&[tokens, n_in], -1.0, 1.0), r.f32(&[n_in, n_out], -1.0, 1.0));
        let (a, b) = (a.as_f32()?.clone(), b.as_f32()?.clone());
        let clear = median(
            (0..iters.max(3))
                .map(|_| {
                    let t = Instant::now();
                    let y = fhe_ops_std::matmul(&a, &b, false, false).expect("shapes fit");
                    std::hint::black_box(y);
                    t.elapsed()
                })
                .collect(),
        );
        let (enc, srv, dec) = (median(enc), median(srv), median(dec));
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!(
            "| {n_in}×{n_out} | {} | {} | {} | {:.3} ms | {} | {:.1} | {:.2} | {:.2} |",
            ms(enc),
            ms(srv),
            ms(dec),
            srv.as_secs_f64() * 1e3 / tokens as f64,
            ms(clear),
            srv.as_secs_f64() / clear.as_secs_f64(),
            up as f64 / (tokens * n_in) as f64,
            down as f64 / (tokens * n_out) as f64,
        );
    }
    println!("evaluation keys sent to the server: 0 bytes");
    Ok(())
}

fn key_uses_ifma(_key: &ClientKey) -> bool {
    std::arch::is_x86_feature_detected!("avx512ifma")
}
