//! The command line: its arguments (raw values), and [`run`], which loads
//! the configuration and logging, builds the one current_thread runtime and
//! dispatches to the chosen command: serving (the default), or a command a
//! person runs in a terminal ([`chat`], and the harness's [`reports`]).

pub mod chat;
pub mod prompt;
pub mod reports;
pub mod steering;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::server::serve;

#[derive(Debug, Parser)]
#[command(name = "elpis-server", version, about = "Local LLM inference over MCP (stdio), with an emotional state")]
pub struct Cli {
    /// TOML config file (default: configs/elpis.toml if it exists).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// Serve MCP over streamable HTTP at ADDR (host:port, path /mcp) instead
    /// of stdio (also server.http, ELPIS_SERVER_HTTP). Off loopback it needs
    /// a bearer token, and TLS or --insecure-http.
    #[arg(long, global = true, value_name = "ADDR")]
    pub http: Option<String>,
    /// Allow the bearer token over plain HTTP on a non-loopback address.
    #[arg(long, global = true)]
    pub insecure_http: bool,
    /// Relay stdio to a remote Elpis at URL, loading no model here (also
    /// server.remote, ELPIS_SERVER_REMOTE; token: ELPIS_SERVER_HTTP_TOKEN).
    #[arg(long, global = true, value_name = "URL")]
    pub remote: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve MCP over stdio (what Psyche runs; the default).
    Serve,
    /// Stream a reply to MESSAGE on the terminal, then print the emotional state.
    Chat {
        message: String,
        /// System message to put before it.
        #[arg(long)]
        system: Option<String>,
        #[arg(long)]
        max_tokens: Option<i64>,
        /// Sampling temperature (default: from the emotional state).
        #[arg(long)]
        temperature: Option<f64>,
    },
    /// Show what the model is fed: read a JSON array of conversations on
    /// stdin, print each one's rendered prompt, segments and tokens as JSON.
    Prompt,
    /// Compute the loaded model's emotion vectors (four quadrant sets of
    /// control vectors) into the cache, or into emotion.vectors_path.
    Vectors,
    /// Measure emotion steering on the loaded model: word-probability
    /// margins under two moods, strength 0 against none, decode speed.
    SteeringCheck,
    /// Replay session files against a freshly spawned server and check them.
    Replay {
        /// Session files (JSON lines, see tests/sessions/).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Divide every wait in the sessions by this.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// A quick call slower than this many seconds counts as a stall.
        #[arg(long, default_value_t = 5.0)]
        stall_s: f64,
        /// Cap every generation's max_tokens (short replies on a slow device).
        #[arg(long)]
        max_tokens: Option<u64>,
        /// Cut every message's text to this many characters (short prompts on a slow device).
        #[arg(long)]
        clip_chars: Option<usize>,
        /// Print the reports as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Measure the server against a raw llama.cpp loop; print a table, write JSON.
    Bench {
        /// Repeat the whole measurement; the table shows medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value = "bench.json")]
        out: PathBuf,
    },
    /// Serve this machine's CPU to other Elpis servers over ggml RPC (they
    /// name it in model.rpc_servers). Unauthenticated and unencrypted: a
    /// non-loopback address needs --allow-remote.
    RpcWorker {
        /// ip:port to listen on.
        #[arg(long, default_value = "127.0.0.1:50052")]
        listen: String,
        /// Compute threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Listen on a non-loopback address, on a network you trust.
        #[arg(long)]
        allow_remote: bool,
    },
    /// Run random mixed operations against a spawned server, then check it.
    Soak {
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// Run the command line: load config and logging, then the chosen command
/// on a current_thread runtime (with a LocalSet: the engine is `!Send`).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let (config, mut warnings) = Config::load(cli.config.as_deref())?;
    warnings.extend(crate::logging::init(&config.logging));
    crate::engine::route_llama_logs();
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    // Shared (never across threads) with the hook that answers requests
    // while the model loads.
    let runtime = std::rc::Rc::new(runtime);
    let local = std::rc::Rc::new(tokio::task::LocalSet::new());
    let serving = matches!(cli.command, None | Some(Command::Serve));
    if !serving && (cli.http.is_some() || cli.remote.is_some() || cli.insecure_http) {
        anyhow::bail!("--http, --insecure-http and --remote go with serving (no command, or `serve`)");
    }
    let result = match cli.command {
        // These drive the engine on this thread, with the session a task.
        None | Some(Command::Serve) => {
            let listen = serve::Listen::choose(&config, cli.http, cli.insecure_http, cli.remote)?;
            serve::serve(&runtime, &local, config, listen)
        }
        Some(Command::Chat { message, system, max_tokens, temperature }) => {
            // A one-shot reply steers with vectors that exist, but does
            // not start computing missing ones (that is the server's job).
            let mut settings = config.engine_settings();
            settings.steering.compute_missing = false;
            serve::with_engine(&runtime, &local, &config, settings, move |inference| async move {
                chat::chat(&inference, message, system, max_tokens, temperature).await
            })
        }
        Some(Command::Prompt) => prompt::prompt(&config),
        Some(Command::RpcWorker { listen, threads, allow_remote }) => {
            let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            crate::engine::serve_worker(&listen, threads, allow_remote)
        }
        Some(Command::Vectors) => steering::vectors(&config),
        Some(Command::SteeringCheck) => steering::check(&config),
        Some(Command::Replay { files, speed, stall_s, max_tokens, clip_chars, json }) => {
            local.block_on(&runtime, reports::replay_files(&files, speed, stall_s, (max_tokens, clip_chars), json))
        }
        Some(Command::Soak { seconds, seed }) => local.block_on(&runtime, reports::soak(seconds, seed)),
        Some(Command::Bench { runs, out }) => local.block_on(&runtime, reports::bench(&config, runs, out)),
    };
    // Don't wait for the runtime's blocking pool (a stdin read may be parked
    // there). The tasks go first: they may hold handles into the runtime.
    drop(local);
    if let Ok(runtime) = std::rc::Rc::try_unwrap(runtime) {
        runtime.shutdown_timeout(Duration::from_millis(100));
    }
    result
}
