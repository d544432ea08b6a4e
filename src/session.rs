//! Session files: the JSON-lines format a client's session is kept in, and
//! the [`Recorder`] that writes one while the server runs (`ELPIS_RECORD=path`).
//! The harness's replay (`harness::replay`) reads them back.
//!
//! # Format
//!
//! JSON lines; each line is one step, run `after` seconds after the previous
//! step finished:
//!
//! - `{"after": 0.1, "send": <JSON-RPC message>}`: send it (a request's
//!   answer is collected in the background).
//! - `{"send_raw": "text"}`: send a line as is (malformed input).
//! - `{"wait": {"response": <id>}}`: wait for the answer to request `<id>`.
//! - `{"cancel": <id>}`: send `notifications/cancelled` for request `<id>`.
//! - `{"poll": {"stream_of": <id>, "every": 0.05, "cancel_after": 1.5}}`:
//!   read the stream that request `<id>` started until complete, like Psyche
//!   (cancel it after `cancel_after` seconds if given).
//!   With `"stop_after": s` it stops polling after `s` seconds, cancelling nothing.
//! - `{"poll_all": {"streams_of": [<id>, ...], "every": 0.05, "cancel": [<id>]}}`:
//!   read several streams round-robin until all are complete; those in
//!   `cancel` are cancelled after their first read.
//! - `{"background": {"every": 1.0, "tool": "get_emotion", "args": {}}}`:
//!   call a tool periodically until the session ends.
//! - `{"stream": {"request": <id>, "stream_id": "..."}}`: written by the
//!   recorder: request `<id>` started that stream, so later messages naming
//!   it are rewritten to the replay's own stream id.
//! - `{"close": true}`: close stdin (Psyche exiting), then the server must exit 0.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub after: f64,
    #[serde(flatten)]
    pub action: Action,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Send(Value),
    SendRaw(String),
    Wait { response: Value },
    Cancel(Value),
    Poll {
        stream_of: Value,
        #[serde(default = "default_poll")]
        every: f64,
        #[serde(default)]
        cancel_after: Option<f64>,
        /// Stop polling (without cancelling) after this many seconds.
        #[serde(default)]
        stop_after: Option<f64>,
    },
    PollAll {
        streams_of: Vec<Value>,
        #[serde(default = "default_poll")]
        every: f64,
        /// Streams to cancel after their first read.
        #[serde(default)]
        cancel: Vec<Value>,
    },
    Background {
        every: f64,
        tool: String,
        #[serde(default)]
        args: Value,
    },
    Stream { request: Value, stream_id: String },
    Close(bool),
}

fn default_poll() -> f64 {
    0.05
}

/// Parse a session file's text.
pub fn parse_session(text: &str) -> Result<Vec<Step>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, line)| serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1)))
        .collect()
}

/// Appends what a client sends to a session file (`ELPIS_RECORD=path`).
pub struct Recorder {
    state: Mutex<RecorderState>,
}

struct RecorderState {
    file: std::fs::File,
    last: Instant,
    /// Bytes of an incomplete line.
    partial: Vec<u8>,
}

impl Recorder {
    pub fn create(path: &Path) -> std::io::Result<Recorder> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Recorder { state: Mutex::new(RecorderState { file, last: Instant::now(), partial: Vec::new() }) })
    }

    fn write_step(state: &mut RecorderState, action: Action) {
        let now = Instant::now();
        let after = (now - state.last).as_secs_f64();
        state.last = now;
        let step = Step { after: (after * 1000.0).round() / 1000.0, action };
        if let Ok(line) = serde_json::to_string(&step) {
            let _ = writeln!(state.file, "{line}");
        }
    }

    /// Bytes the server read from stdin.
    pub fn incoming(&self, bytes: &[u8]) {
        let mut state = lock(&self.state);
        state.partial.extend_from_slice(bytes);
        while let Some(end) = state.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = state.partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).trim_end_matches('\r').to_string();
            if text.trim().is_empty() {
                continue;
            }
            let action = match serde_json::from_str::<Value>(&text) {
                Ok(msg) => Action::Send(msg),
                Err(_) => Action::SendRaw(text),
            };
            Self::write_step(&mut state, action);
        }
    }

    /// Request `request` started stream `stream_id`.
    pub fn stream_started(&self, request: Value, stream_id: &str) {
        Self::write_step(&mut lock(&self.state), Action::Stream { request, stream_id: stream_id.to_string() });
    }

    /// Stdin closed.
    pub fn closed(&self) {
        Self::write_step(&mut lock(&self.state), Action::Close(true));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn steps_parse_in_every_form() {
        let text = r#"
{"after": 0.5, "send": {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get_emotion", "arguments": {}}}}
{"send_raw": "{not json"}
{"wait": {"response": 1}}
{"cancel": 1}
{"poll": {"stream_of": 2}}
{"poll": {"stream_of": 3, "every": 0.1, "cancel_after": 1.5}}
{"background": {"every": 1.0, "tool": "get_emotion"}}
{"stream": {"request": 2, "stream_id": "abc"}}
{"after": 1, "close": true}
"#;
        let steps = parse_session(text).unwrap();
        assert_eq!(steps.len(), 9);
        assert_eq!(steps[0].after, 0.5);
        assert!(matches!(steps[4].action, Action::Poll { every, cancel_after: None, stop_after: None, .. } if every == 0.05));
        assert!(matches!(steps[8].action, Action::Close(true)));
        assert!(parse_session("{\"bogus\": 1}").unwrap_err().contains("line 1"));
    }

    #[test]
    fn recorder_writes_replayable_steps() {
        let path = std::env::temp_dir().join(format!("elpis-record-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let rec = Recorder::create(&path).unwrap();
        rec.incoming(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\n{\"jsonrpc\":");
        rec.incoming(b"\"2.0\",\"method\":\"notifications/initialized\"}\nnot json\n");
        rec.stream_started(json!(4), "s-1");
        rec.closed();
        let steps = parse_session(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(steps.len(), 5);
        assert!(matches!(&steps[0].action, Action::Send(m) if m["method"] == "ping"));
        assert!(matches!(&steps[1].action, Action::Send(m) if m["method"] == "notifications/initialized"));
        assert_eq!(steps[2].action, Action::SendRaw("not json".into()));
        assert_eq!(steps[3].action, Action::Stream { request: json!(4), stream_id: "s-1".into() });
        assert_eq!(steps[4].action, Action::Close(true));
    }
}
