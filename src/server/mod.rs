//! The server: the process that Psyche spawns, in three layers.
//!
//! - [`core`], protocol-free: generation requests, controls, tool use, the
//!   mood, streams and metrics, over the engine's handle.
//! - Two thin faces over it: [`mcp`] (tools and resources, with the tools'
//!   argument schemas in `mcp::wire`) and [`openai`] (OpenAI's HTTP API).
//! - The transports under them: [`transport`] reads and writes stdio's
//!   JSON-RPC lines, answering every one; [`http`] carries `/mcp` and the
//!   OpenAI routes on one listener; [`bridge`] relays stdio to a remote
//!   Elpis, or to an engine process of its own when the model is split
//!   over RPC workers (the other end: [`upstream`]); [`serve`] owns the
//!   process's lifetime.
//!
//! Imports run one way: transports → faces → core.

pub mod bridge;
pub mod core;
pub mod http;
pub mod mcp;
pub mod openai;
pub mod serve;
pub mod transport;
pub mod upstream;
