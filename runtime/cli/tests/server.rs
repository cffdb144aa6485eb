//! The real `fhe-run server` binary on loopback: correct results, the right refusal for every
//! bad request (and service afterwards), tokens, concurrency limits with client retries, TLS,
//! graceful shutdown, and no key material anywhere.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use fhe_backend_rlwe::wire::{decode_response, encode_request, CallHeader, PROTOCOL_VERSION};
use fhe_backend_rlwe::{decrypt, encrypt, ClientKey, LinearServer, Reply, Setting};
use fhe_client::{ClientConfig, ClientError, HttpClient};
use fhe_exec::artifact::ServerArtifact;
use fhe_ir::{Direction, LayerId};

mod common;
use common::{artifact, Server};

/// A valid encrypted request for layer 0 (64 → 192 in the tiny model), and the plaintext.
fn request(key: &ClientKey, layer: u32, direction: Direction, width: usize, tokens: usize) -> (Vec<u8>, Vec<i8>) {
    let x: Vec<i8> = (0..tokens * width).map(|i| ((i * 37) % 255) as i32 as i8).map(|v| v.max(-127)).collect();
    let block = encrypt(key, Setting::Exact, &x, tokens, width).unwrap();
    (encode_request(CallHeader { layer: LayerId(layer), direction }, &block), x)
}

fn refused(result: Result<Reply, ClientError>) -> (u16, String) {
    match result {
        Err(ClientError::Refused { status, message, .. }) => (status, message),
        other => panic!("expected a refusal, got {:?}", other.map(|r| r.body.len())),
    }
}

#[test]
fn forward_and_backward_answers_equal_the_direct_backend_call() {
    let dir = artifact();
    let server = Server::start(dir.path(), &[]);
    let direct = LinearServer::new(&ServerArtifact::load(dir.path()).unwrap());
    let client = server.client();
    let info = client.info().unwrap();
    assert_eq!((info.protocol_version, info.parameter_set_id, info.layers.len()), (PROTOCOL_VERSION, 1, 8));
    assert_eq!(info.layers[0].name, "transformer.h.0.attn.c_attn");
    let key = ClientKey::from_seed(1);
    for (layer, direction, width) in [(0, Direction::Forward, 64), (3, Direction::Backward, 64), (2, Direction::Forward, 64)] {
        let (body, _) = request(&key, layer, direction, width, 100);
        let reply = client.linear(LayerId(layer), direction, &body).unwrap();
        assert!(reply.server_time.is_some(), "the server reports its compute time (Server-Timing)");
        let over_http = reply.body;
        let in_process = direct.handle(LayerId(layer), direction, &body).unwrap();
        assert_eq!(over_http, in_process, "layer {layer} {direction}");
        let (_, output) = decode_response(&over_http).unwrap();
        assert_eq!(decrypt(&key, &output).len(), 100 * output.outputs);
    }
}

#[test]
fn every_bad_request_gets_its_status_and_the_server_keeps_serving() {
    let dir = artifact();
    let server = Server::start(dir.path(), &["--max-body", "1000000"]);
    let client = server.client();
    let key = ClientKey::from_seed(2);
    let (good, _) = request(&key, 0, Direction::Forward, 64, 10);
    let patch = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    let (narrow, _) = request(&key, 0, Direction::Forward, 63, 10);
    let cases: Vec<(&str, u32, &str, Vec<u8>, u16, &str)> = vec![
        ("unknown layer", 99, "forward", good.clone(), 404, "unknown layer 99"),
        ("wrong direction", 0, "sideways", good.clone(), 404, "unknown direction `sideways`"),
        ("shape mismatch", 0, "forward", narrow, 422, "takes 64 features per token, the request has 63"),
        ("protocol version", 0, "forward", patch(4, &[9, 0]), 400, "protocol version 9 is not supported"),
        ("parameter set", 0, "forward", patch(6, &[5, 0]), 400, "parameter set 5"),
        ("truncated", 0, "forward", good[..good.len() - 7].to_vec(), 400, "truncated"),
        ("random bytes", 0, "forward", (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(), 400, "malformed"),
        ("url and body disagree", 1, "forward", good.clone(), 400, "is for layer 0"),
    ];
    // Oversized: refused as soon as the body passes --max-body.
    let (status, reply) = announce_body(&server.url, "/v1/linear/0/forward", 1_200_000);
    assert_eq!(status, 413, "{reply}");
    assert!(reply.contains("--max-body"), "{reply}");
    client.linear(LayerId(0), Direction::Forward, &good).unwrap();
    let agent_path = |layer: u32, direction: &str| format!("{}/v1/linear/{layer}/{direction}", server.url);
    for (what, layer, direction, body, status, needle) in cases {
        let (got_status, message) = raw_post(&agent_path(layer, direction), &body);
        assert_eq!(got_status, status, "{what}: {message}");
        assert!(message.contains(needle), "{what}: `{needle}` not in `{message}`");
        // And the next valid request is served.
        client.linear(LayerId(0), Direction::Forward, &good).unwrap_or_else(|e| panic!("after {what}: {e}"));
    }
}

/// POSTs a body of `length` bytes over a raw socket, writing until the server stops reading
/// (it answers 413 and hangs up once the limit is passed), then reads the answer.
fn announce_body(url: &str, path: &str, length: usize) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n").unwrap();
    let chunk = vec![0u8; 64 << 10];
    let mut sent = 0;
    while sent < length && stream.write_all(&chunk[..chunk.len().min(length - sent)]).is_ok() {
        sent += chunk.len();
    }
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, reply)
}

/// A POST without retries, returning status and the error message (or body length).
fn raw_post(url: &str, body: &[u8]) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut response = agent.post(url).send(body).unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["error"].as_str().map(String::from)).unwrap_or(text);
    (status, message)
}

#[test]
fn a_required_token_is_checked() {
    let dir = artifact();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let server = Server::start(dir.path(), &["--token-file", token_file.to_str().unwrap()]);
    let key = ClientKey::from_seed(3);
    let (body, _) = request(&key, 0, Direction::Forward, 64, 4);
    let (status, message) = refused(server.client().linear(LayerId(0), Direction::Forward, &body));
    assert_eq!((status, message.contains("requires `Authorization: Bearer")), (401, true), "{message}");
    let wrong = server.client_with(|c| c.token = Some("guess".into()));
    let (status, message) = refused(wrong.linear(LayerId(0), Direction::Forward, &body));
    assert_eq!((status, message.as_str()), (401, "the bearer token is wrong"));
    assert!(matches!(wrong.info(), Err(ClientError::Refused { status: 401, .. })));
    let right = server.client_with(|c| c.token = Some("s3cret-token".into()));
    right.linear(LayerId(0), Direction::Forward, &body).unwrap();
    right.info().unwrap();
    // Health checks need no token.
    assert_eq!(raw_get(&format!("{}/healthz", server.url)), (200, "ok".to_string()));
}

fn raw_get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut response = agent.get(url).call().unwrap();
    (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
}

/// Expected integer product for layer `layer` forward, from the server artifact's weights.
fn expected(dir: &Path, layer: u32, x: &[i8], tokens: usize) -> Vec<i64> {
    let artifact = ServerArtifact::load(dir).unwrap();
    let l = &artifact.layers[&LayerId(layer)];
    let (n, m) = (l.entry.in_features, l.entry.out_features);
    let mut y = vec![0i64; tokens * m];
    for t in 0..tokens {
        for j in 0..m {
            y[t * m + j] = (0..n).map(|i| x[t * n + i] as i64 * l.qweight[i * m + j] as i64).sum();
        }
    }
    y
}

/// `clients` threads, each sending `each` requests at the same moment; returns how many
/// succeeded, checking every answer that arrives.
fn burst(server: &Server, dir: &Path, clients: usize, each: usize, retry: bool) -> (usize, usize) {
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (url, barrier, dir) = (server.url.clone(), barrier.clone(), dir.to_path_buf());
            std::thread::spawn(move || {
                let mut config = ClientConfig::new(&url);
                if !retry {
                    config.retry_for = Duration::ZERO;
                }
                let client = HttpClient::new(config).unwrap();
                let key = ClientKey::from_seed(100 + c as u128);
                let (mut ok, mut busy) = (0, 0);
                let prepared: Vec<_> = (0..each).map(|_| request(&key, 6, Direction::Forward, 64, 2048)).collect();
                barrier.wait();
                for (body, x) in prepared {
                    match client.linear(LayerId(6), Direction::Forward, &body) {
                        Ok(reply) => {
                            let (_, output) = decode_response(&reply.body).unwrap();
                            assert_eq!(decrypt(&key, &output), expected(&dir, 6, &x, 2048), "client {c}");
                            ok += 1;
                        }
                        Err(ClientError::Unreachable { last, .. }) if last.contains("503") => busy += 1,
                        Err(e) => panic!("client {c}: {e}"),
                    }
                }
                (ok, busy)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

#[test]
fn eight_concurrent_clients_all_get_correct_answers() {
    let dir = artifact();
    let server = Server::start(dir.path(), &["--max-concurrent", "8"]);
    assert_eq!(burst(&server, dir.path(), 8, 3, true), (24, 0));
}

#[test]
fn beyond_max_concurrent_the_excess_gets_503_and_retries_complete() {
    let dir = artifact();
    let server = Server::start(dir.path(), &["--max-concurrent", "2"]);
    // Without retries, simultaneous requests beyond two are turned away (bounded attempts).
    let mut turned_away = 0;
    for _ in 0..10 {
        turned_away += burst(&server, dir.path(), 8, 1, false).1;
        if turned_away > 0 {
            break;
        }
    }
    assert!(turned_away > 0, "no request was answered 503 with --max-concurrent 2");
    // With the client library's retries, every request completes.
    assert_eq!(burst(&server, dir.path(), 8, 2, true), (16, 0));
}

#[test]
fn the_server_runs_with_no_key_material_anywhere_it_can_read() {
    let dir = artifact();
    // Only the server part, in a directory of its own; an empty home; a bare environment.
    let sandbox = tempfile::tempdir().unwrap();
    let server_part = sandbox.path().join("server-part");
    std::fs::create_dir(&server_part).unwrap();
    for f in std::fs::read_dir(dir.path().join("server")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), server_part.join(f.file_name())).unwrap();
    }
    let files: Vec<PathBuf> = walk(sandbox.path());
    assert!(files.iter().all(|f| !std::fs::read(f).unwrap().starts_with(b"FHE-LORA-CLIENT-KEY")), "{files:?}");
    let server = Server::start_in(&server_part, "127.0.0.1:0", &[], Some(sandbox.path()));
    let key = ClientKey::from_seed(4);
    let (body, x) = request(&key, 0, Direction::Forward, 64, 16);
    let (_, output) = decode_response(&server.client().linear(LayerId(0), Direction::Forward, &body).unwrap().body).unwrap();
    assert_eq!(decrypt(&key, &output), expected(dir.path(), 0, &x, 16));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flat_map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p)
            } else {
                vec![p]
            }
        })
        .collect()
}

#[test]
fn https_with_a_trusted_certificate() {
    let dir = artifact();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let server = Server::start(dir.path(), &["--tls-cert", cert_path.to_str().unwrap(), "--tls-key", key_path.to_str().unwrap()]);
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let client = server.client_with(|c| c.ca_cert = Some(cert_path.clone()));
    assert_eq!(client.info().unwrap().layers.len(), 8);
    let key = ClientKey::from_seed(5);
    let (body, x) = request(&key, 0, Direction::Forward, 64, 8);
    let (_, output) = decode_response(&client.linear(LayerId(0), Direction::Forward, &body).unwrap().body).unwrap();
    assert_eq!(decrypt(&key, &output), expected(dir.path(), 0, &x, 8));
    // Without trusting the certificate the client refuses to talk.
    let untrusting = server.client_with(|c| c.retry_for = Duration::ZERO);
    assert!(untrusting.info().is_err());
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let dir = artifact();
    let mut server = Server::start(dir.path(), &[]);
    assert_eq!(raw_get(&format!("{}/healthz", server.url)).0, 200);
    let status = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(status.success());
    for _ in 0..100 {
        if let Some(exit) = server.child.try_wait().unwrap() {
            assert!(exit.success(), "{exit:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the server did not stop within 5 s of SIGTERM");
}

#[test]
fn bad_command_lines_are_explained() {
    let dir = artifact();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fhe-run")).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let client_part = dir.path().join("client");
    let (code, stderr) = run(&["server", "--artifact", client_part.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("this is the client part") && !stderr.contains("panicked"), "{stderr}");
    let (code, stderr) = run(&["server", "--artifact", "/nonexistent", "--listen", "127.0.0.1:0"]);
    assert!(code == Some(1) && stderr.contains("no server part here"), "{stderr}");
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let (code, stderr) = run(&["server", "--artifact", dir.path().to_str().unwrap(), "--token-file", empty.to_str().unwrap()]);
    assert!(code == Some(1) && stderr.contains("is empty"), "{stderr}");
    let (code, stderr) = run(&["server", "--artifact", dir.path().to_str().unwrap(), "--tls-cert", "c.pem"]);
    assert!(code == Some(2) && stderr.contains("--tls-key"), "{stderr}");
}

#[test]
fn the_client_waits_for_a_server_that_comes_up_late() {
    let dir = artifact();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let artifact_path = dir.path().to_path_buf();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        Server::start_in(&artifact_path, &format!("127.0.0.1:{port}"), &[], None)
    });
    let patient = ClientConfig { retry_for: Duration::from_secs(30), ..ClientConfig::new(format!("http://127.0.0.1:{port}")) };
    let client = HttpClient::new(patient).unwrap();
    let info = client.info().expect("the client retries until the server is up");
    assert_eq!(info.layers.len(), 8);
    let server = starter.join().unwrap();
    drop(server);
    // Gone again: a bounded wait, then an error naming the server.
    let impatient = HttpClient::new(ClientConfig { retry_for: Duration::from_millis(300), ..ClientConfig::new(format!("http://127.0.0.1:{port}")) }).unwrap();
    let message = impatient.info().unwrap_err().to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")) && message.contains("unreachable"), "{message}");
}
