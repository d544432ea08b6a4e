//! Replay a session file (format: [`crate::session`]) against a freshly
//! spawned server, checking what `shared/docs/sessions.md` requires of every
//! session (no crash and exit 0, one well-formed answer per request, every
//! stream ended and consistent, quick calls answered between tokens).
//!
//! Request ids are the recorded ones. A session without `close` ends with
//! a `get_capabilities` check that no stream is left, then closes stdin.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::harness::client::{id_key, percentiles, tool_result_object, McpClient, Response};
use crate::session::{Action, Step};

/// Tools that must be answered between tokens.
const QUICK_TOOLS: [&str; 6] =
    ["get_emotion", "generate_stream_read", "generate_stream_cancel", "update_emotion", "reset_emotion", "get_capabilities"];
/// A quick call slower than this is a gross stall (unless the options say
/// otherwise: a test on a loaded machine wants only a hang guard).
pub const STALL: Duration = Duration::from_secs(5);
/// Longest wait for any one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the server may take to exit after stdin closed (a hang guard:
/// it answers what it owes first).
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a replay found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub session: String,
    pub requests: usize,
    pub responses: usize,
    pub streams: usize,
    pub quick_calls: usize,
    pub quick_p50_ms: f64,
    pub quick_p99_ms: f64,
    pub quick_max_ms: f64,
    pub exit_code: Option<i32>,
    pub duration_s: f64,
    /// Everything that broke a rule; empty means the session passed.
    pub violations: Vec<String>,
}

/// One request the replay sent.
struct Sent {
    id: Value,
    method: String,
    tool: String,
    sent_at: Instant,
    rx: Option<oneshot::Receiver<Response>>,
    response: Option<Response>,
    cancelled: bool,
}

#[derive(Default)]
struct StreamTrack {
    /// The replay's stream id, once the start was answered.
    actual: Option<String>,
    /// Read request ids, in sending order.
    reads: Vec<Value>,
    cancelled: bool,
}

struct Replay {
    client: Arc<tokio::sync::Mutex<McpClient>>,
    sent: Arc<Mutex<Vec<Sent>>>,
    /// By the request id that started the stream.
    streams: HashMap<String, StreamTrack>,
    /// Recorded stream id to the request that started it.
    recorded: HashMap<String, Value>,
    violations: Vec<String>,
    speed: f64,
    stall: Duration,
    max_tokens: Option<u64>,
    clip_chars: Option<usize>,
    closed: bool,
    /// The session itself closed stdin (Psyche exiting), perhaps mid-stream.
    closed_by_session: bool,
    next_id: u64,
}

/// Options of a replay.
pub struct ReplayOptions {
    pub binary: PathBuf,
    /// Extra environment for the server.
    pub env: Vec<(String, String)>,
    /// Waits are divided by this.
    pub speed: f64,
    /// A quick call slower than this is a violation.
    pub stall: Duration,
    pub stderr_to: Option<PathBuf>,
    /// Cap every generation's `max_tokens` (a slow device: the session's
    /// shape with short replies).
    pub max_tokens: Option<u64>,
    /// Cut every message's text to this many characters (a slow device:
    /// the session's shape with short prompts).
    pub clip_chars: Option<usize>,
}

/// Play `steps` against a fresh server and check the rules.
pub async fn replay(name: &str, steps: &[Step], options: &ReplayOptions) -> Report {
    let started = Instant::now();
    let mut report = Report { session: name.to_string(), ..Report::default() };
    let client = match McpClient::spawn(&options.binary, &[], &options.env, options.stderr_to.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            report.violations.push(format!("cannot spawn {}: {e}", options.binary.display()));
            return report;
        }
    };
    let mut r = Replay {
        client: Arc::new(tokio::sync::Mutex::new(client)),
        sent: Arc::default(),
        streams: HashMap::new(),
        recorded: HashMap::new(),
        violations: Vec::new(),
        speed: options.speed.max(0.001),
        stall: options.stall,
        max_tokens: options.max_tokens,
        clip_chars: options.clip_chars,
        closed: false,
        closed_by_session: false,
        next_id: 9_000_000,
    };
    if let Err(e) = r.client.lock().await.initialize(Duration::from_secs(60)).await {
        report.violations.push(format!("initialize failed: {e}"));
    }
    let stop_background = tokio_util::sync::CancellationToken::new();
    for step in steps {
        if step.after > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(step.after / r.speed)).await;
        }
        if let Err(e) = r.run(step, &stop_background).await {
            r.violations.push(e);
            break;
        }
        if r.closed {
            break;
        }
    }
    stop_background.cancel();
    if !r.closed {
        r.final_checks().await;
        r.close().await;
    }
    let exit = r.client.lock().await.wait_exit(EXIT_TIMEOUT).await;
    match exit {
        Some(status) => {
            report.exit_code = status.code();
            if !status.success() {
                r.violations.push(format!("server exited with {status}"));
            }
        }
        None => r.violations.push(format!("server did not exit within {EXIT_TIMEOUT:?} of stdin closing")),
    }
    r.check_answers(&mut report).await;
    report.violations = r.violations;
    report.duration_s = started.elapsed().as_secs_f64();
    report
}

impl Replay {
    async fn send(&mut self, msg: &Value) -> Result<(), String> {
        let mut msg = self.rewrite_stream_ids(msg.clone()).await?;
        if let (Some(cap), Some(n)) = (self.max_tokens, msg["params"]["arguments"]["max_tokens"].as_u64()) {
            msg["params"]["arguments"]["max_tokens"] = n.min(cap).into();
        }
        if let (Some(cap), Some(messages)) = (self.clip_chars, msg["params"]["arguments"]["messages"].as_array_mut()) {
            for m in messages {
                if let Some(text) = m["content"].as_str() {
                    m["content"] = text.chars().take(cap).collect::<String>().into();
                }
            }
        }
        let rx = self.client.lock().await.send(&msg).await.map_err(|e| format!("send failed: {e}"))?;
        if let Some(rx) = rx {
            let method = msg["method"].as_str().unwrap_or("").to_string();
            let tool = msg["params"]["name"].as_str().unwrap_or("").to_string();
            let id = msg["id"].clone();
            if tool == "generate_stream_start" {
                self.streams.entry(id_key(&id)).or_default();
            }
            if tool == "generate_stream_read" {
                if let Some(track) = self.stream_named(msg["params"]["arguments"]["stream_id"].as_str()) {
                    track.reads.push(id.clone());
                }
            }
            if tool == "generate_stream_cancel" {
                if let Some(track) = self.stream_named(msg["params"]["arguments"]["stream_id"].as_str()) {
                    track.cancelled = true;
                }
            }
            lock(&self.sent).push(Sent {
                id,
                method,
                tool,
                sent_at: Instant::now(),
                rx: Some(rx),
                response: None,
                cancelled: false,
            });
        }
        Ok(())
    }

    fn stream_named(&mut self, actual: Option<&str>) -> Option<&mut StreamTrack> {
        let actual = actual?;
        self.streams.values_mut().find(|t| t.actual.as_deref() == Some(actual))
    }

    /// Replace recorded stream ids in a message by this replay's ids.
    async fn rewrite_stream_ids(&mut self, mut msg: Value) -> Result<Value, String> {
        let Some(recorded) = msg["params"]["arguments"]["stream_id"].as_str().map(str::to_string) else {
            return Ok(msg);
        };
        let Some(start) = self.recorded.get(&recorded).cloned() else { return Ok(msg) };
        let actual = self.stream_id_of(&start).await?;
        msg["params"]["arguments"]["stream_id"] = json!(actual);
        Ok(msg)
    }

    /// Wait for the answer to request `id` and return it.
    async fn await_response(&mut self, id: &Value) -> Result<Response, String> {
        let rx = {
            let mut sent = lock(&self.sent);
            let s = sent
                .iter_mut()
                .find(|s| s.id == *id)
                .ok_or_else(|| format!("session waits for request {id}, which it never sent"))?;
            if let Some(r) = &s.response {
                return Ok(r.clone());
            }
            s.rx.take()
        };
        let rx = rx.ok_or_else(|| format!("request {id} is already being waited for"))?;
        let response = tokio::time::timeout(ANSWER_TIMEOUT, rx)
            .await
            .map_err(|_| format!("no answer to request {id} within {ANSWER_TIMEOUT:?}"))?
            .map_err(|_| format!("server closed stdout before answering request {id}"))?;
        if let Some(s) = lock(&self.sent).iter_mut().find(|s| s.id == *id) {
            s.response = Some(response.clone());
        }
        Ok(response)
    }

    /// The stream id that request `start` obtained.
    async fn stream_id_of(&mut self, start: &Value) -> Result<String, String> {
        if let Some(id) = self.streams.get(&id_key(start)).and_then(|t| t.actual.clone()) {
            return Ok(id);
        }
        let (response, _) = self.await_response(start).await?;
        let object = tool_result_object(&response["result"])?;
        let id = object["stream_id"]
            .as_str()
            .ok_or_else(|| format!("stream start {start} failed: {object}"))?
            .to_string();
        self.streams.entry(id_key(start)).or_default().actual = Some(id.clone());
        Ok(id)
    }

    fn fresh_id(&mut self) -> Value {
        self.next_id += 1;
        json!(self.next_id)
    }

    async fn tool_request(&mut self, tool: &str, args: Value) -> Result<Value, String> {
        let id = self.fresh_id();
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}}))
            .await?;
        Ok(id)
    }

    async fn run(&mut self, step: &Step, stop_background: &tokio_util::sync::CancellationToken) -> Result<(), String> {
        match &step.action {
            // The replay makes its own handshake; a recorded one is skipped.
            Action::Send(msg) if msg["method"] == "initialize" || msg["method"] == "notifications/initialized" => Ok(()),
            Action::Send(msg) => self.send(msg).await,
            Action::SendRaw(line) => {
                self.client.lock().await.send_line(line).await.map_err(|e| format!("send failed: {e}"))
            }
            Action::Wait { response } => self.await_response(response).await.map(|_| ()),
            Action::Cancel(id) => {
                if let Some(s) = lock(&self.sent).iter_mut().find(|s| s.id == *id) {
                    s.cancelled = true;
                }
                let note = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                  "params": {"requestId": id, "reason": "replay: client cancelled"}});
                self.client.lock().await.send(&note).await.map(|_| ()).map_err(|e| e.to_string())
            }
            Action::Stream { request, stream_id } => {
                self.recorded.insert(stream_id.clone(), request.clone());
                Ok(())
            }
            Action::Poll { stream_of, every, cancel_after, stop_after } => {
                self.poll(stream_of, *every, *cancel_after, *stop_after).await
            }
            Action::PollAll { streams_of, every, cancel } => self.poll_all(streams_of, *every, cancel).await,
            Action::Background { every, tool, args } => {
                self.background(*every, tool.clone(), args.clone(), stop_background.clone());
                Ok(())
            }
            Action::Close(_) => {
                self.closed_by_session = true;
                self.close().await;
                Ok(())
            }
        }
    }

    async fn poll(&mut self, start: &Value, every: f64, cancel_after: Option<f64>, stop_after: Option<f64>) -> Result<(), String> {
        let stream_id = self.stream_id_of(start).await?;
        let began = Instant::now();
        loop {
            let elapsed = began.elapsed().as_secs_f64() * self.speed;
            if cancel_after.is_some_and(|c| elapsed >= c) {
                return self.cancel_stream(&stream_id).await;
            }
            if stop_after.is_some_and(|s| elapsed >= s) {
                return Ok(());
            }
            if self.read_stream(&stream_id).await? {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs_f64(every / self.speed)).await;
        }
    }

    async fn poll_all(&mut self, starts: &[Value], every: f64, cancel: &[Value]) -> Result<(), String> {
        let mut open = Vec::new();
        for start in starts {
            open.push((start.clone(), self.stream_id_of(start).await?));
        }
        let mut first_read = true;
        while !open.is_empty() {
            let mut still = Vec::new();
            for (start, stream_id) in open {
                if self.read_stream(&stream_id).await? {
                    continue;
                }
                if first_read && cancel.contains(&start) {
                    self.cancel_stream(&stream_id).await?;
                    continue;
                }
                still.push((start, stream_id));
            }
            first_read = false;
            open = still;
            tokio::time::sleep(Duration::from_secs_f64(every / self.speed)).await;
        }
        Ok(())
    }

    /// One read; true when it reported completion.
    async fn read_stream(&mut self, stream_id: &str) -> Result<bool, String> {
        let id = self.tool_request("generate_stream_read", json!({"stream_id": stream_id})).await?;
        let (response, _) = self.await_response(&id).await?;
        let object = tool_result_object(&response["result"])?;
        if object.get("error").is_some() && object.get("is_complete").is_none() {
            return Err(format!("stream read failed: {object}"));
        }
        Ok(object["is_complete"] == true)
    }

    async fn cancel_stream(&mut self, stream_id: &str) -> Result<(), String> {
        let id = self.tool_request("generate_stream_cancel", json!({"stream_id": stream_id})).await?;
        let (response, _) = self.await_response(&id).await?;
        let object = tool_result_object(&response["result"])?;
        if object["status"] != "cancelled" {
            return Err(format!("stream cancel failed: {object}"));
        }
        Ok(())
    }

    fn background(&mut self, every: f64, tool: String, args: Value, stop: tokio_util::sync::CancellationToken) {
        let client = Arc::clone(&self.client);
        let sent = Arc::clone(&self.sent);
        let period = Duration::from_secs_f64(every / self.speed);
        let mut next_id = self.next_id + 5_000_000;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                next_id += 1;
                let id = json!(next_id);
                let msg = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}});
                let mut c = client.lock().await;
                if c.stdout_closed() {
                    return;
                }
                let Ok(Some(rx)) = c.send(&msg).await else { return };
                drop(c);
                lock(&sent).push(Sent {
                    id,
                    method: "tools/call".into(),
                    tool: tool.clone(),
                    sent_at: Instant::now(),
                    rx: Some(rx),
                    response: None,
                    cancelled: false,
                });
            }
        });
    }

    async fn final_checks(&mut self) {
        // Answers still owed (generates the session did not wait for) come first.
        let ids: Vec<Value> = lock(&self.sent).iter().filter(|s| !s.cancelled).map(|s| s.id.clone()).collect();
        for id in ids {
            if let Err(e) = self.await_response(&id).await {
                self.violations.push(e);
            }
        }
        match self.tool_request("get_capabilities", json!({})).await {
            Ok(id) => match self.await_response(&id).await.and_then(|(r, _)| tool_result_object(&r["result"])) {
                Ok(caps) => {
                    if caps["active_streams"] != 0 {
                        self.violations.push(format!("{} streams left registered at the end", caps["active_streams"]));
                    }
                }
                Err(e) => self.violations.push(e),
            },
            Err(e) => self.violations.push(e),
        }
    }

    async fn close(&mut self) {
        self.client.lock().await.close_stdin();
        self.closed = true;
    }

    /// After the server exited: every answer, well-formed, once; streams
    /// consistent; quick-call latency.
    async fn check_answers(&mut self, report: &mut Report) {
        let client = self.client.lock().await;
        if !client.garbage().is_empty() {
            self.violations.push(format!("non-protocol output on stdout: {:?}", client.garbage()));
        }
        let mut sent = lock(&self.sent);
        let mut latencies = Vec::new();
        report.requests = sent.len();
        for s in sent.iter_mut() {
            if s.response.is_none() {
                if let Some(mut rx) = s.rx.take() {
                    s.response = rx.try_recv().ok();
                }
            }
            let count = client.response_count(&s.id);
            report.responses += count;
            // Every request written before stdin closed is owed its answer,
            // unless the session cancelled it.
            if count > 1 || (count == 0 && !s.cancelled) {
                self.violations.push(format!("request {} ({} {}) got {count} answers", s.id, s.method, s.tool));
            }
            let Some((response, at)) = &s.response else { continue };
            if s.method == "tools/call" {
                if let Err(e) = tool_result_object(&response["result"]) {
                    if response.get("error").is_none() {
                        self.violations.push(format!("request {}: malformed tool result: {e}", s.id));
                    }
                }
                if QUICK_TOOLS.contains(&s.tool.as_str()) {
                    let ms = at.saturating_duration_since(s.sent_at).as_secs_f64() * 1000.0;
                    latencies.push(ms);
                    if ms > self.stall.as_secs_f64() * 1000.0 {
                        self.violations.push(format!("{} took {ms:.0} ms: a stall", s.tool));
                    }
                }
            }
        }
        report.quick_calls = latencies.len();
        (report.quick_p50_ms, report.quick_p99_ms) = percentiles(&latencies);
        report.quick_max_ms = latencies.iter().copied().fold(0.0, f64::max);
        report.streams = self.streams.len();
        let by_id: HashMap<String, Value> = sent
            .iter()
            .filter_map(|s| s.response.as_ref().map(|(r, _)| (id_key(&s.id), r["result"].clone())))
            .collect();
        for (start, track) in &self.streams {
            let mut text = String::new();
            let mut complete = false;
            for read in &track.reads {
                let Some(object) = by_id.get(&id_key(read)).and_then(|r| tool_result_object(r).ok()) else { continue };
                text.push_str(object["new_content"].as_str().unwrap_or(""));
                if object["is_complete"] == true {
                    complete = true;
                    if object.get("error").is_none() && object["full_content"].as_str() != Some(text.as_str()) {
                        self.violations.push(format!("stream of request {start}: reads do not add up to full_content"));
                    }
                }
            }
            // Streams still running when the session closed stdin end with the server.
            if !complete && !track.cancelled && !self.closed_by_session {
                self.violations.push(format!("stream of request {start} was neither completed nor cancelled"));
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
