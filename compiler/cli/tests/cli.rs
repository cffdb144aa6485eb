//! `fhe-compile` as a user runs it: the real binary, real files, every bad input a clear
//! message and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fhe_exec::tensor_io::{read_safetensors, write_safetensors};
use fhe_ir::Tensor;
use fhe_tests::{input, repo_path, single_op_model, Random};

fn fhe_compile(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fhe-compile"));
    for a in args {
        cmd.arg(a);
    }
    cmd.output().expect("fhe-compile runs")
}

fn tiny() -> PathBuf {
    repo_path("models/gpt2-tiny/model.onnx")
}

fn tiny_io() -> PathBuf {
    repo_path("models/gpt2-tiny/reference_io.safetensors")
}

/// Asserts a failed run with a message containing every one of `needles`.
fn assert_fails_with(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    }
}

fn write_io(dir: &Path, tensors: &[(&str, &Tensor)]) -> PathBuf {
    let path = dir.join("io.safetensors");
    let named: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.to_string(), *t)).collect();
    write_safetensors(&path, &named).unwrap();
    path
}

#[test]
fn compiles_next_to_the_model_by_default_and_checks_io() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("gpt2.onnx");
    std::fs::copy(tiny(), &model).unwrap();
    let out = fhe_compile(&[&model, &"--check-io", &tiny_io()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.path().join("gpt2.fhe/manifest.json").is_file());
    assert!(stdout.contains("logits, server layers in f32: max |Δ| =") && stdout.contains("(ok)"), "{stdout}");
}

#[test]
fn help_documents_every_option() {
    let out = fhe_compile(&[&"--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for option in ["--output", "--check-io", "--tolerance", "--lora-rank", "--lora-alpha", "--lora-targets", "--lora-seed", "all-linear", "<MODEL>"] {
        assert!(help.contains(option), "{option} missing from --help:\n{help}");
    }
}

#[test]
fn a_file_that_is_not_onnx_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.onnx");
    std::fs::write(&path, "this is a text file, not a model\n").unwrap();
    assert_fails_with(&fhe_compile(&[&path]), 1, &["notes.onnx", "ONNX"]);
}

#[test]
fn a_missing_file_is_rejected() {
    assert_fails_with(&fhe_compile(&[&"/nonexistent/model.onnx"]), 1, &["/nonexistent/model.onnx", "No such file"]);
}

#[test]
fn a_truncated_model_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(tiny()).unwrap();
    for (i, len) in [bytes.len() / 2, bytes.len() - 1000, 100].into_iter().enumerate() {
        let path = dir.path().join(format!("cut{i}.onnx"));
        std::fs::write(&path, &bytes[..len]).unwrap();
        assert_fails_with(&fhe_compile(&[&path]), 1, &["ONNX"]);
    }
}

#[test]
fn an_unsupported_op_is_named_with_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hardmax.onnx");
    let model = single_op_model("Hardmax", 17, &[], &[input(Random::new(1).f32(&[2, 3], 0.0, 1.0))], 1);
    std::fs::write(&path, model).unwrap();
    assert_fails_with(&fhe_compile(&[&path]), 1, &["op `Hardmax`", "node `test_Hardmax`", "supported ops:"]);
}

#[test]
fn check_io_without_the_model_input_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let io: Vec<(String, Tensor)> = read_safetensors(&tiny_io()).unwrap();
    let logits = &io.iter().find(|(n, _)| n == "logits").unwrap().1;
    let ids = &io.iter().find(|(n, _)| n == "input_ids").unwrap().1;
    let out_dir = dir.path().join("out");

    let missing = write_io(dir.path(), &[("logits", logits)]);
    assert_fails_with(&fhe_compile(&[&tiny(), &"-o", &out_dir, &"--check-io", &missing]), 1, &["no tensor named `input_ids`"]);

    let misnamed = write_io(dir.path(), &[("ids", ids), ("logits", logits)]);
    assert_fails_with(&fhe_compile(&[&tiny(), &"-o", &out_dir, &"--check-io", &misnamed]), 1, &["no tensor named `input_ids`", "\"ids\""]);

    let no_output = write_io(dir.path(), &[("input_ids", ids)]);
    assert_fails_with(&fhe_compile(&[&tiny(), &"-o", &out_dir, &"--check-io", &no_output]), 1, &["no tensor named `logits`"]);

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, [7u8; 64]).unwrap();
    assert_fails_with(&fhe_compile(&[&tiny(), &"-o", &out_dir, &"--check-io", &garbage]), 1, &["garbage.safetensors", "safetensors"]);
}

#[test]
fn a_sequence_longer_than_n_positions_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let ids = Random::new(2).i64(&[1, 130], 0, 50257);
    let logits = Tensor::from_f32(&[1, 130, 1], vec![0.0; 130]).unwrap();
    let io = write_io(dir.path(), &[("input_ids", &ids), ("logits", &logits)]);
    let out = fhe_compile(&[&tiny(), &"-o", &dir.path().join("out"), &"--check-io", &io]);
    assert_fails_with(&out, 1, &["130 tokens", "n_positions) is 128"]);
}

#[test]
fn outputs_beyond_the_tolerance_fail_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let io: Vec<(String, Tensor)> = read_safetensors(&tiny_io()).unwrap();
    let ids = &io.iter().find(|(n, _)| n == "input_ids").unwrap().1;
    let logits = io.iter().find(|(n, _)| n == "logits").unwrap().1.as_f32().unwrap().mapv(|v| v + 0.01);
    let path = write_io(dir.path(), &[("input_ids", ids), ("logits", &Tensor::F32(logits))]);
    let out = fhe_compile(&[&tiny(), &"-o", &dir.path().join("out"), &"--check-io", &path]);
    assert_fails_with(&out, 2, &["--tolerance"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ABOVE TOLERANCE"));
}

#[test]
fn the_documented_command_line_works_as_is() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny(), dir.path().join("gpt2.onnx")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fhe-compile")).current_dir(dir.path()).args(["gpt2.onnx", "--lora-rank", "8"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for part in ["gpt2.fhe/manifest.json", "gpt2.fhe/client/part.json", "gpt2.fhe/server/part.json"] {
        assert!(dir.path().join(part).is_file(), "{part} missing");
    }
    let manifest = std::fs::read_to_string(dir.path().join("gpt2.fhe/manifest.json")).unwrap();
    assert!(manifest.contains("\"rank\": 8") && manifest.contains("transformer.h.1.mlp.c_proj"), "{manifest}");
    assert!(stdout.contains("split report") && stdout.contains("LoRA parameters (trained)") && stdout.contains("4096"), "{stdout}");
}

#[test]
fn bad_lora_options_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    assert_fails_with(&fhe_compile(&[&tiny(), &"-o", &out_dir, &"--lora-targets", &"q_proj"]), 1, &["matches no layer", "transformer.h.0.attn.c_attn"]);
    assert_fails_with(&fhe_compile(&[&tiny(), &"-o", &out_dir, &"--lora-rank", &"0"]), 1, &["--lora-rank must be at least 1"]);
    assert_fails_with(&fhe_compile(&[&tiny(), &"-o", &out_dir, &"--lora-targets", &" , "]), 1, &["--lora-targets is empty"]);
    let out = fhe_compile(&[&tiny(), &"--lora-rank", &"eight"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects a non-number");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lora-rank"));
}
