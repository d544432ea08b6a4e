//! Elpis: a local LLM inference server speaking MCP over stdio, with an
//! emotional state that shapes sampling.
//!
//! The whole process runs on one tokio `current_thread` runtime. That thread
//! loads the model and steps the decode loop, yielding after every decode
//! step, so requests are answered between tokens; nothing else ever touches
//! llama.cpp (the engine is `!Send`).
//!
//! # Layout
//!
//! - [`config`]: the TOML file and `ELPIS_*` environment, validated.
//! - [`logging`]: tracing to stderr or `~/.elpis/elpis-server.log`.
//! - [`emotion`]: the emotional state model, pure, time injected.
//! - [`mood`]: the live emotional state (the model plus the wall clock and a lock).
//! - [`engine`]: the one owner of llama.cpp: model, context, scheduler
//!   (slots, batches, prompt cache), sampling, chat formats, tool-call
//!   grammar, detokenisation.
//! - [`streams`]: the registry of polled streams.
//! - [`inference`]: what each tool does, from validated arguments to the
//!   result object.
//! - [`wire`]: tool argument types and their JSON schemas.
//! - [`mcp`]: the rmcp server handler: tools and resources.
//! - [`serve`]: process lifecycle: runtime, stdio, shutdown on EOF or signal.
//! - [`replay`]: session files: recording (`ELPIS_RECORD`) and replay with
//!   the checks every session must pass.
//! - [`bench`]: the benchmark: raw llama.cpp floor vs the server over stdio.
//! - [`soak`]: random mixed load against a spawned server, with its checks.
//! - [`client`]: a stdio MCP client for a spawned server (replay, soak, bench).
//! - [`cli`], [`chat`]: the command line and the `chat` subcommand.

pub mod bench;
pub mod chat;
pub mod cli;
pub mod client;
pub mod config;
pub mod emotion;
pub mod engine;
pub mod inference;
pub mod logging;
pub mod mcp;
pub mod mood;
pub mod replay;
pub mod serve;
pub mod soak;
pub mod streams;
pub mod wire;
