//! Elpis: a local LLM inference server speaking MCP over stdio, with an
//! emotional state that shapes sampling and steers the model's activations.
//!
//! The whole process runs on one tokio `current_thread` runtime. That thread
//! loads the model and steps the decode loop, yielding after every decode
//! step, so requests are answered between tokens; nothing else ever touches
//! llama.cpp (the engine is `!Send`).
//!
//! # Layout
//!
//! Imports run one way: `main` → [`cli`] → [`server`] / [`harness`] →
//! [`engine`], [`emotion`], [`config`].
//!
//! - [`cli`]: the command line: arguments, the runtime, and the dispatch to
//!   serving or to a person's commands (`chat`, `prompt`, `vectors`,
//!   `steering-check`, and `replay`, `soak`, `bench`, which print the
//!   harness's reports).
//! - [`server`]: the process Psyche spawns and the request path:
//!   `serve` (stdio, lifecycle) → `mcp` (tools, resources) → `wire`
//!   (argument types) → `inference` (what each tool does) → `streams`
//!   (polled streams) and `mood` (the live emotional state).
//! - [`engine`]: the one owner of llama.cpp: model, context, scheduler
//!   (slots, batches, prompt cache), sampling, the model's Jinja template
//!   and the built-in chat formats, data kept apart from template text,
//!   native and generic tool-call grammars, emotion steering with control
//!   vectors, detokenisation.
//! - [`emotion`]: the emotional state model, pure, time injected.
//! - [`harness`]: what drives a spawned server to check it: `client`,
//!   `replay`, `soak`, `bench`.
//! - [`session`]: the session file format, and the recorder the server
//!   writes it with (`ELPIS_RECORD`); the harness replays it.
//! - [`config`]: the TOML file and `ELPIS_*` environment, validated.
//! - [`logging`]: tracing to stderr or `~/.elpis/elpis-server.log`.

pub mod cli;
pub mod config;
pub mod emotion;
pub mod engine;
pub mod harness;
pub mod logging;
pub mod server;
pub mod session;
