//! Helpers shared by the integration tests of `fhe-run`.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use fhe_client::{ClientConfig, HttpClient};
use fhe_compile::{compile, CompileOptions};
use fhe_passes::{LoraConfig, LoraTargets};
use fhe_tests::{registry, repo_path};

/// A compiled tiny GPT-2 in a temporary directory.
pub fn artifact() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let lora = LoraConfig { rank: 4, alpha: 32.0, targets: LoraTargets::Modules(vec!["c_attn".into()]), seed: 0 };
    let options = CompileOptions { model: repo_path("models/gpt2-tiny/model.onnx"), output: dir.path().to_path_buf(), lora, tokenizer: None };
    compile(&options, &registry()).unwrap();
    dir
}

/// A running server process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    pub fn start(artifact: &Path, extra: &[&str]) -> Server {
        Server::start_in(artifact, "127.0.0.1:0", extra, None)
    }

    pub fn start_in(artifact: &Path, listen: &str, extra: &[&str], sandbox: Option<&Path>) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fhe-run"));
        cmd.args(["server", "--artifact"]).arg(artifact).args(["--listen", listen]).args(extra);
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        if let Some(dir) = sandbox {
            // Nothing of the user's: an empty home and working directory, a bare environment.
            cmd.env_clear().env("HOME", dir).current_dir(dir);
        }
        let mut child = cmd.spawn().expect("fhe-run starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line `{line}`")).to_string();
        Server { child, url }
    }

    pub fn client(&self) -> HttpClient {
        HttpClient::new(ClientConfig::new(&self.url)).unwrap()
    }

    pub fn client_with(&self, edit: impl FnOnce(&mut ClientConfig)) -> HttpClient {
        let mut config = ClientConfig::new(&self.url);
        edit(&mut config);
        HttpClient::new(config).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

