//! How a request fails, for every face: what went wrong in words that say
//! what to do, and what kind of failure it is, which each face maps onto
//! its own shape (MCP: `{"error": message}`; OpenAI: an error object with
//! a status).

use crate::engine::EngineError;
use super::streams::StreamError;

/// What kind of failure a [`RequestError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (a bad value, a prompt too long): the
    /// client must change it.
    Invalid,
    /// Too many requests wait already: the same request may succeed later.
    Busy,
    /// The server could not serve it (the engine stopped, a decode failed,
    /// a lost RPC worker).
    Failed,
}

/// A request that could not be served: the message names the offending
/// argument and the fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub kind: ErrorKind,
    pub message: String,
}

impl RequestError {
    /// The request is wrong; `message` names the argument.
    pub fn invalid(message: impl Into<String>) -> Self {
        RequestError { kind: ErrorKind::Invalid, message: message.into() }
    }

    /// The queue is full.
    pub fn busy(message: impl Into<String>) -> Self {
        RequestError { kind: ErrorKind::Busy, message: message.into() }
    }

    /// The server failed to serve a valid request.
    pub fn failed(message: impl Into<String>) -> Self {
        RequestError { kind: ErrorKind::Failed, message: message.into() }
    }
}

impl From<EngineError> for RequestError {
    fn from(e: EngineError) -> Self {
        let kind = match e {
            EngineError::PromptTooLong { .. } | EngineError::Template(_) | EngineError::Grammar(_) => ErrorKind::Invalid,
            _ => ErrorKind::Failed,
        };
        RequestError { kind, message: e.to_string() }
    }
}

impl From<StreamError> for RequestError {
    fn from(e: StreamError) -> Self {
        let kind = match e {
            StreamError::Unknown(_) => ErrorKind::Invalid,
            StreamError::Limit(_) => ErrorKind::Busy,
        };
        let mut message = e.to_string();
        if let (StreamError::Unknown(_), Some(why)) = (&e, restarted_after()) {
            message.push_str(&format!(
                "; or it was started before this server restarted ({why}), which ended every stream"
            ));
        }
        RequestError { kind, message }
    }
}

/// Why the supervisor restarted this server, if it did.
fn restarted_after() -> Option<String> {
    std::env::var(crate::engine::RESTARTED_ENV).ok().filter(|why| !why.is_empty())
}
