//! Command-line arguments (raw values; `main` turns them into settings).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "elpis-server", version, about = "Local LLM inference over MCP (stdio), with an emotional state")]
pub struct Cli {
    /// TOML config file (default: configs/elpis.toml if it exists).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
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
    /// Replay session files against a freshly spawned server and check them.
    Replay {
        /// Session files (JSON lines, see tests/sessions/).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Divide every wait in the sessions by this.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
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
    /// Run random mixed operations against a spawned server, then check it.
    Soak {
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}
