//! The stream registry: generations a client polls with
//! `generate_stream_read` until complete, or cancels.
//!
//! Each stream buffers the text produced since the last read. At most
//! [`MAX_STREAMS`] exist at once; a stream older than [`MAX_AGE`] is removed
//! (its generation stopped) when the next stream starts. The read that
//! reports completion removes the stream. Every read touches the stream's
//! [`Interest`], which the engine uses to let work a client waits on go
//! first, and which abandons a stream nobody reads (see `inference`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::engine::{Completion, Interest};

/// Defaults of wire.md (configurable in `[server]`).
pub const MAX_STREAMS: usize = 100;
pub const MAX_AGE: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("unknown stream_id {0:?}: it never existed, was cancelled, expired, or was already read to completion")]
    Unknown(String),
    #[error("too many streams: {0} are open; read them to completion or cancel some with generate_stream_cancel")]
    Limit(usize),
}

/// How a stream ended.
#[derive(Debug, Clone)]
pub enum StreamEnd {
    /// The completion, and the fields its completing read carries
    /// (finish_reason, usage, timings, and tool calls or JSON problems).
    Finished(Completion, serde_json::Map<String, serde_json::Value>),
    Failed(String),
}

/// Which session a stream belongs to (None: the one stdio session).
pub type Owner = Option<u64>;

struct Stream {
    created: Instant,
    /// The session that started it: only that one may read or cancel it.
    owner: Owner,
    /// Text produced since the last read.
    unread: String,
    /// All text produced so far.
    full: String,
    total_tokens: u32,
    end: Option<StreamEnd>,
    cancel: CancellationToken,
    /// Touched by every read.
    interest: Interest,
}

/// One read of a stream.
#[derive(Debug, Clone)]
pub struct StreamRead {
    pub new_content: String,
    pub total_tokens: u32,
    /// Set on the read that reports completion (the stream is then gone).
    pub end: Option<(String, StreamEnd)>,
}

pub struct StreamRegistry {
    streams: HashMap<String, Stream>,
    max_streams: usize,
    max_age: Duration,
}

impl Default for StreamRegistry {
    fn default() -> Self {
        StreamRegistry::new(MAX_STREAMS, MAX_AGE)
    }
}

impl StreamRegistry {
    pub fn new(max_streams: usize, max_age: Duration) -> Self {
        StreamRegistry { streams: HashMap::new(), max_streams, max_age }
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Remove streams older than the age limit (stopping them), then
    /// register a new one if there is room. Returns its id.
    pub fn start(&mut self, owner: Owner, cancel: CancellationToken, interest: Interest, now: Instant) -> Result<String, StreamError> {
        let max_age = self.max_age;
        self.streams.retain(|id, s| {
            let expired = now.saturating_duration_since(s.created) > max_age;
            if expired {
                tracing::info!(stream_id = %id, "stream expired after {:.1} s", max_age.as_secs_f64());
                s.cancel.cancel();
            }
            !expired
        });
        if self.streams.len() >= self.max_streams {
            return Err(StreamError::Limit(self.max_streams));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let stream = Stream {
            created: now,
            owner,
            unread: String::new(),
            full: String::new(),
            total_tokens: 0,
            end: None,
            cancel,
            interest,
        };
        self.streams.insert(id.clone(), stream);
        Ok(id)
    }

    /// Append generated text (ignored for a stream that is gone).
    pub fn push_text(&mut self, id: &str, text: &str) {
        if let Some(s) = self.streams.get_mut(id) {
            s.unread.push_str(text);
            s.full.push_str(text);
        }
    }

    pub fn set_tokens(&mut self, id: &str, total: u32) {
        if let Some(s) = self.streams.get_mut(id) {
            s.total_tokens = total;
        }
    }

    pub fn end(&mut self, id: &str, end: StreamEnd) {
        if let Some(s) = self.streams.get_mut(id) {
            if let StreamEnd::Finished(c, _) = &end {
                s.total_tokens = c.usage.completion_tokens;
            }
            s.end = Some(end);
        }
    }

    /// Take the text since the last read; the read that sees the end
    /// removes the stream and returns its full content.
    pub fn read(&mut self, owner: Owner, id: &str) -> Result<StreamRead, StreamError> {
        // Another session's stream is as unknown as one that never was.
        let s = self.streams.get_mut(id).filter(|s| s.owner == owner).ok_or_else(|| StreamError::Unknown(id.to_string()))?;
        s.interest.touch(Instant::now());
        let new_content = std::mem::take(&mut s.unread);
        let total_tokens = s.total_tokens;
        if s.end.is_none() {
            return Ok(StreamRead { new_content, total_tokens, end: None });
        }
        let s = self.streams.remove(id).ok_or_else(|| StreamError::Unknown(id.to_string()))?;
        let end = s.end.map(|e| (s.full, e));
        Ok(StreamRead { new_content, total_tokens, end })
    }

    /// Stop a stream's generation and forget it.
    pub fn cancel(&mut self, owner: Owner, id: &str) -> Result<(), StreamError> {
        if !self.streams.get(id).is_some_and(|s| s.owner == owner) {
            return Err(StreamError::Unknown(id.to_string()));
        }
        if let Some(s) = self.streams.remove(id) {
            s.cancel.cancel();
        }
        Ok(())
    }

    /// Stop and forget every stream of a session that ended.
    pub fn cancel_owned(&mut self, owner: Owner) {
        self.streams.retain(|_, s| {
            if s.owner == owner {
                s.cancel.cancel();
            }
            s.owner != owner
        });
    }

    /// Stop every stream (shutdown).
    pub fn cancel_all(&mut self) {
        for (_, s) in self.streams.drain() {
            s.cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{FinishReason, Interest, Usage};

    fn done(text: &str) -> StreamEnd {
        StreamEnd::Finished(
            Completion {
                text: text.into(),
                finish_reason: FinishReason::Stop,
                stop_sequence: None,
                usage: Usage { completion_tokens: 3, ..Usage::default() },
                truncated: false,
                timings: Default::default(),
                logprobs: None,
            },
            Default::default(),
        )
    }

    #[test]
    fn reads_take_new_text_and_completion_removes() {
        let mut r = StreamRegistry::default();
        let id = r.start(None, CancellationToken::new(), Interest::new(Instant::now()), Instant::now()).unwrap();
        r.push_text(&id, "Hel");
        assert_eq!(r.read(None, &id).unwrap().new_content, "Hel");
        assert_eq!(r.read(None, &id).unwrap().new_content, "");
        r.push_text(&id, "lo");
        r.end(&id, done("Hello"));
        let last = r.read(None, &id).unwrap();
        assert_eq!(last.new_content, "lo");
        assert_eq!(last.total_tokens, 3);
        assert_eq!(last.end.unwrap().0, "Hello");
        assert_eq!(r.read(None, &id).unwrap_err(), StreamError::Unknown(id));
        assert!(r.is_empty());
    }

    #[test]
    fn limit_and_expiry() {
        let mut r = StreamRegistry::default();
        let t0 = Instant::now();
        let first = CancellationToken::new();
        r.start(None, first.clone(), Interest::new(t0), t0).unwrap();
        for _ in 1..MAX_STREAMS {
            r.start(None, CancellationToken::new(), Interest::new(t0), t0).unwrap();
        }
        assert_eq!(r.start(None, CancellationToken::new(), Interest::new(t0), t0).unwrap_err(), StreamError::Limit(MAX_STREAMS));
        // Past the age limit, all are expired (and stopped) by the next start.
        let later = t0 + MAX_AGE + Duration::from_secs(1);
        r.start(None, CancellationToken::new(), Interest::new(later), later).unwrap();
        assert_eq!(r.len(), 1);
        assert!(first.is_cancelled());
    }

    #[test]
    fn cancel_stops_and_forgets() {
        let mut r = StreamRegistry::default();
        let token = CancellationToken::new();
        let id = r.start(None, token.clone(), Interest::new(Instant::now()), Instant::now()).unwrap();
        r.cancel(None, &id).unwrap();
        assert!(token.is_cancelled());
        assert!(r.cancel(None, &id).is_err());
        r.push_text(&id, "late text is ignored");
        assert!(r.is_empty());
    }

    #[test]
    fn a_stream_is_its_sessions_alone() {
        let mut r = StreamRegistry::default();
        let token = CancellationToken::new();
        let id = r.start(Some(1), token.clone(), Interest::new(Instant::now()), Instant::now()).unwrap();
        assert_eq!(r.read(Some(2), &id).unwrap_err(), StreamError::Unknown(id.clone()));
        assert_eq!(r.cancel(None, &id).unwrap_err(), StreamError::Unknown(id.clone()));
        assert!(r.read(Some(1), &id).is_ok());
        r.cancel_owned(Some(1));
        assert!(token.is_cancelled() && r.is_empty());
    }
}
