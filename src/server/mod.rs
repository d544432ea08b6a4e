//! The server: the process that Psyche spawns, and the path a request takes
//! through it. [`serve`] owns stdio and the process's lifetime; [`mcp`] is
//! the rmcp handler (tools and resources, thin); [`wire`] holds the tools'
//! argument types and schemas; [`inference`] does what each tool means, from
//! validated arguments to the result object, through the engine's handle
//! ([`controls`] validates sampling and stops, [`calls`] sets up tool calls
//! and JSON replies and reads them back, [`metrics`] counts);
//! [`streams`] keeps the polled streams; [`mood`] is the live emotional state;
//! [`transport`] reads and writes the JSON-RPC lines, answering every one;
//! [`http`] serves MCP over HTTP and, beside it, [`openai`]: the OpenAI API,
//! a second thin face over the same [`inference`].

pub mod bridge;
pub mod calls;
pub mod controls;
pub mod http;
pub mod inference;
pub mod mcp;
pub mod metrics;
pub mod mood;
pub mod openai;
pub mod serve;
pub mod streams;
pub mod transport;
pub mod wire;
