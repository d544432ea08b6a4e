//! The server: the process that Psyche spawns, and the path a request takes
//! through it. [`serve`] owns stdio and the process's lifetime; [`mcp`] is
//! the rmcp handler (tools and resources, thin); [`wire`] holds the tools'
//! argument types and schemas; [`inference`] does what each tool means, from
//! validated arguments to the result object, through the engine's handle;
//! [`streams`] keeps the polled streams; [`mood`] is the live emotional state;
//! [`transport`] reads and writes the JSON-RPC lines, answering every one.

pub mod inference;
pub mod mcp;
pub mod mood;
pub mod serve;
pub mod streams;
pub mod transport;
pub mod wire;
