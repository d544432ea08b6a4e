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
}
