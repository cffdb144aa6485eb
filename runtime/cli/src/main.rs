//! `fhe-run`: runs the fhe-lora server and client.

mod generate;
mod train;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fhe_server::{serve, ServerConfig};

// Requests and training steps allocate tens to hundreds of MB at a time; see fhe-alloc.
#[global_allocator]
static ALLOCATOR: fhe_alloc::Allocator = fhe_alloc::Allocator;

#[derive(Parser, Debug)]
#[command(name = "fhe-run", version, about = "Run the fhe-lora server, or fine-tune as its client.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the frozen linear layers of an artifact over HTTP(S), on encrypted inputs.
    Server(ServerArgs),
    /// The client side: fine-tuning.
    #[command(subcommand)]
    Client(ClientCommand),
}

#[derive(Subcommand, Debug)]
enum ClientCommand {
    /// Fine-tune the LoRA adapters on private data; frozen layers run encrypted on a server.
    Train(train::TrainArgs),
    /// Generate text, with the frozen layers encrypted on the server, with or without an adapter.
    Generate(generate::GenerateArgs),
}

#[derive(clap::Args, Debug)]
struct ServerArgs {
    /// The artifact directory written by fhe-compile, or just its `server/` part.
    #[arg(long)]
    artifact: PathBuf,

    /// Address to listen on (port 0 picks a free port and prints it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Largest accepted request body in bytes (a 3072-wide request of 2048 tokens is ~38 MB).
    #[arg(long, default_value_t = 64 << 20)]
    max_body: usize,

    /// Requests computed at once; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 2)]
    max_concurrent: usize,

    /// File holding a bearer token that every request must present.
    #[arg(long)]
    token_file: Option<PathBuf>,

    /// PEM certificate chain, to serve HTTPS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Seconds a request may compute before it is answered 504.
    #[arg(long, default_value_t = 600)]
    request_timeout: u64,
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = interrupt => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down: finishing the requests in flight");
}

fn run_server(args: ServerArgs) -> Result<()> {
    let token = match &args.token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path).with_context(|| format!("reading --token-file {}", path.display()))?.trim().to_string();
            if token.is_empty() {
                bail!("--token-file {} is empty; put the bearer token in it", path.display());
            }
            Some(token)
        }
        None => None,
    };
    let config = ServerConfig {
        artifact: args.artifact,
        listen: args.listen,
        max_body: args.max_body,
        max_concurrent: args.max_concurrent,
        token,
        tls: args.tls_cert.zip(args.tls_key),
        request_timeout: Duration::from_secs(args.request_timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(
        config,
        |addr, tls| {
            // On stdout, for whoever started us (scripts and tests read the port from here).
            println!("listening on {}://{addr}", if tls { "https" } else { "http" });
            let _ = std::io::stdout().flush();
        },
        shutdown_signal(),
    ))?;
    Ok(())
}

fn main() -> ExitCode {
    fhe_alloc::keep_freed_memory();
    let cli = Cli::parse();
    // The server logs each request; a client shows its own progress and only warnings.
    let default_filter = if matches!(cli.command, Command::Server(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Server(args) => run_server(args),
        Command::Client(ClientCommand::Train(args)) => train::run(args),
        Command::Client(ClientCommand::Generate(args)) => generate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
