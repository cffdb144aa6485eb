//! `fhe-run client train` as a user runs it: against a real `fhe-run server` process, with
//! real encryption; and every kind of bad data explained, without a panic.

use std::process::Command;

use fhe_tests::repo_path;

mod common;
use common::{artifact, Server};

fn train(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fhe-run")).args(["client", "train"]).args(args).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn losses(metrics: &std::path::Path) -> Vec<f32> {
    let text = std::fs::read_to_string(metrics).unwrap();
    text.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect()
}

#[test]
fn encrypted_training_against_a_server_process_follows_simulation_and_clear() {
    let dir = artifact();
    let server = Server::start(dir.path(), &[]);
    let data = repo_path("data_finetune/private_ml_qa.txt");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["--artifact", dir.path().to_str().unwrap(), "--data", data.to_str().unwrap()];
        args.extend(["--steps", "10", "--batch", "4", "--block-size", "32", "--seed", "5", "--out", out.to_str().unwrap()]);
        args.extend(extra);
        let (code, stdout, stderr) = train(&args);
        assert_eq!(code, Some(0), "{name}: {stdout}\n{stderr}");
        out
    };
    let encrypted_dir = run("encrypted", &["--server", &server.url]);
    let encrypted = losses(&encrypted_dir.join("metrics.csv"));
    let simulated = losses(&run("simulated", &["--fhe", "simulate"]).join("metrics.csv"));
    let clear = losses(&run("clear", &["--fhe", "clear"]).join("metrics.csv"));
    assert_eq!(encrypted.len(), 10);
    let drop = |l: &[f32]| l[0] - l[l.len() - 1];
    assert!(drop(&encrypted) > 0.02, "loss did not fall: {encrypted:?}");
    for (step, (e, s)) in encrypted.iter().zip(&simulated).enumerate() {
        assert!((e - s).abs() <= 1e-3, "step {}: encrypted {e} vs simulated {s}", step + 1);
    }
    assert!(drop(&encrypted) >= 0.9 * drop(&clear), "encrypted drop {} vs clear drop {}", drop(&encrypted), drop(&clear));
    let metrics = std::fs::read_to_string(encrypted_dir.join("metrics.csv")).unwrap();
    let sent: u64 = metrics.lines().last().unwrap().split(',').nth(5).unwrap().parse().unwrap();
    assert!(sent > 0, "{metrics}");
    for file in ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "client.key", "loss.svg"] {
        assert!(encrypted_dir.join(file).is_file(), "{file} missing");
    }
}

#[test]
fn bad_data_is_explained() {
    let dir = artifact();
    let data_dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = data_dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let artifact_dir = dir.path().to_str().unwrap().to_string();
    let good = repo_path("data_finetune/private_ml_qa.txt").to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--data".into(), "/nonexistent/data.txt".into()], "cannot read `/nonexistent/data.txt`"),
        (vec!["--data".into(), write("empty.txt", b"")], "is empty"),
        (vec!["--data".into(), write("blob.txt", &[0xff, 0xfe, 0, 1, 2])], "not UTF-8 text"),
        (vec!["--data".into(), write("bad.jsonl", b"{\"text\": \"fine\"}\n{broken\n")], "line 2"),
        (vec!["--data".into(), good.clone(), "--block-size".into(), "4096".into()], "larger than the model's context of 128"),
        (vec!["--data".into(), good.clone(), "--steps".into(), "0".into()], "must be at least 1"),
        (vec!["--data".into(), good.clone(), "--epochs".into(), "0".into()], "must be at least 1"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["--artifact".to_string(), artifact_dir.clone(), "--fhe".into(), "clear".into(), "--out".into(), data_dir.path().join("o").to_str().unwrap().into()];
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, stderr) = train(&refs);
        assert_eq!(code, Some(1), "{expected}: {stderr}");
        assert!(stderr.contains(expected) && !stderr.contains("panicked"), "`{expected}` not in: {stderr}");
    }
}

#[test]
fn a_killed_run_resumes_and_ends_with_the_uninterrupted_adapter() {
    let dir = artifact();
    let data = repo_path("data_finetune/private_ml_qa.txt");
    let run = |out: &std::path::Path, extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fhe-run"));
        cmd.args(["client", "train", "--artifact", dir.path().to_str().unwrap(), "--data", data.to_str().unwrap()])
            .args(["--steps", "8", "--checkpoint-every", "2", "--setting", "exact", "--seed", "3", "--out", out.to_str().unwrap()])
            .args(extra);
        cmd
    };
    let whole = dir.path().join("whole");
    assert!(run(&whole, &[]).output().unwrap().status.success());

    let killed = dir.path().join("killed");
    let mut child = run(&killed, &[]).stdout(std::process::Stdio::null()).spawn().unwrap();
    // Wait for the checkpoint after step 4, then kill without warning.
    let metrics = killed.join("metrics.csv");
    for _ in 0..600 {
        let rows = std::fs::read_to_string(&metrics).map(|m| m.lines().count()).unwrap_or(0);
        if rows > 5 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("adapter").exists(), "the run finished before it was killed");
    let resumed = run(&killed, &["--resume"]).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(String::from_utf8_lossy(&resumed.stdout).contains("resuming after step"));
    let adapter = |d: &std::path::Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&killed), adapter(&whole), "resumed adapter differs from the uninterrupted one");
    let rows = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert_eq!(rows, 9, "one metrics row per step");
}

#[test]
fn generation_runs_encrypted_and_matches_the_simulation() {
    let dir = artifact();
    let generate = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fhe-run"))
            .args(["client", "generate", "--artifact", dir.path().to_str().unwrap(), "--prompt", "What is a ciphertext?", "--max-new-tokens", "6"])
            .args(extra)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, encrypted, stderr) = generate(&["--setting", "exact", "--key", dir.path().join("k").to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let (_, simulated, _) = generate(&["--fhe", "simulate"]);
    assert!(encrypted.starts_with("What is a ciphertext?") && encrypted.len() > "What is a ciphertext?\n".len(), "{encrypted}");
    assert_eq!(encrypted, simulated);
    let (code, _, stderr) = generate(&["--fhe", "clear", "--adapter", "/nonexistent"]);
    assert!(code == Some(1) && stderr.contains("reading the adapter"), "{stderr}");
}

#[test]
fn training_waits_for_a_server_that_dies_and_comes_back() {
    let dir = artifact();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start_in(dir.path(), &listen, &[], None);
    let out = dir.path().join("run");
    let data = repo_path("data_finetune/private_ml_qa.txt");
    let trainer = Command::new(env!("CARGO_BIN_EXE_fhe-run"))
        .args(["client", "train", "--artifact", dir.path().to_str().unwrap(), "--data", data.to_str().unwrap()])
        .args(["--server", &server.url, "--steps", "10", "--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("metrics.csv");
    for _ in 0..600 {
        if std::fs::read_to_string(&metrics).map(|m| m.lines().count()).unwrap_or(0) > 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(server); // SIGKILL: gone mid-run
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let _back = Server::start_in(dir.path(), &listen, &[], None);
    let output = trainer.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("retrying"), "no retry message: {stderr}");
    assert_eq!(std::fs::read_to_string(&metrics).unwrap().lines().count(), 11);
}
