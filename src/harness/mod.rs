//! The harness: what drives a spawned `elpis-server` over stdio to check it,
//! as a client would. [`client`] is a small MCP client for a child server;
//! [`replay`] plays session files and checks the rules of sessions.md;
//! [`soak`] runs random mixed load; [`bench`] measures the server against a
//! raw llama.cpp loop. None of it is on the request path.

pub mod bench;
pub mod client;
pub mod replay;
pub mod soak;
