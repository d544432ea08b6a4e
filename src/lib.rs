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
//! [`engine`], [`emotion`], [`config`] → [`prompt`].
//!
//! - [`cli`]: the command line: arguments, the runtime, and the dispatch to
//!   serving or to a person's commands (`chat`, `prompt`, `vectors`,
//!   `steering-check`, and `replay`, `soak`, `bench`, which print the
//!   harness's reports).
//! - [`server`]: the process Psyche spawns, in layers: a protocol-free
//!   `core` (requests' arguments, generation whole or streamed, controls,
//!   tool use, `streams`, the live `mood`, `metrics`), two thin faces over
//!   it (`mcp`: tools and resources, with `mcp::wire`'s schemas; `openai`:
//!   OpenAI's HTTP API), and the transports under them (`transport`:
//!   stdio's JSON-RPC lines, every one answered; `http`; `bridge`, relaying
//!   stdio to an `upstream`: a remote Elpis, or the supervised engine
//!   process of a model split over RPC workers), with `serve` owning the
//!   process's lifetime.
//! - [`engine`]: the one owner of llama.cpp, split by what each part owns:
//!   the `!Send` [`engine::Engine`] and its loop (`scheduler`), loading
//!   (`model`), requests becoming jobs (`admission`), a job and its sampler
//!   (`job`, `sampler`), the KV sequences and queue (`slots`), one decode
//!   step and its size (`step`, `planner`), emotion steering with control
//!   vectors (`steering`, `vectors`, `sys`), detokenisation (`text`), the
//!   measurements' probes (`probes`), and the plain data it sends and
//!   receives (`request`, `handle`).
//! - [`prompt`]: pure prompt code: messages, the model's Jinja template and
//!   the built-in formats, data kept apart from template text, tool specs
//!   and the native and generic tool-call formats with their grammars and
//!   parsers.
//! - [`emotion`]: the emotional state model, pure, time injected.
//! - [`harness`]: what drives a spawned server to check it: `client`,
//!   `replay`, `soak`, `bench`.
//! - [`session`]: the session file format, and the recorder the server
//!   writes it with (`ELPIS_RECORD`); the harness replays it.
//! - [`config`]: the TOML file and `ELPIS_*` environment (`env`), the
//!   predecessor's values (`legacy`), validated.
//! - [`logging`]: tracing to stderr or `~/.elpis/elpis-server.log`.

pub mod cli;
pub mod config;
pub mod emotion;
pub mod engine;
pub mod harness;
pub mod logging;
pub mod prompt;
pub mod server;
pub mod session;
