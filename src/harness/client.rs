//! A small MCP client for a spawned `elpis-server` over stdio (raw JSON-RPC
//! lines, as Psyche's client sends them). Used by `replay`, `soak` and
//! `bench`; it never loads a model itself.

use std::collections::HashMap;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;

/// A response and when it arrived.
pub type Response = (Value, Instant);

#[derive(Default)]
struct Inbox {
    waiting: HashMap<String, oneshot::Sender<Response>>,
    /// Responses per request id (a correct server sends exactly one).
    counts: HashMap<String, usize>,
    /// Responses that arrived with nobody waiting.
    unclaimed: HashMap<String, Response>,
    notifications: Vec<(Value, Instant)>,
    /// Stdout lines that are not JSON-RPC messages (must stay empty).
    garbage: Vec<String>,
    closed: bool,
}

pub struct McpClient {
    child: Child,
    stdin: Option<ChildStdin>,
    inbox: Arc<Mutex<Inbox>>,
    next_id: u64,
}

/// The key a request id is tracked under.
pub fn id_key(id: &Value) -> String {
    id.to_string()
}

impl McpClient {
    /// Spawn `binary args` with `env` added; stderr goes to `stderr_to` or is dropped.
    pub fn spawn(binary: &Path, args: &[String], env: &[(String, String)], stderr_to: Option<&Path>) -> std::io::Result<Self> {
        let stderr = match stderr_to {
            Some(p) => Stdio::from(std::fs::File::create(p)?),
            None => Stdio::null(),
        };
        let mut cmd = Command::new(binary);
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(stderr).kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        let stdin = child.stdin.take();
        let inbox: Arc<Mutex<Inbox>> = Arc::default();
        let reader_inbox = Arc::clone(&inbox);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let now = Instant::now();
                let mut inbox = reader_inbox.lock().unwrap_or_else(|p| p.into_inner());
                match serde_json::from_str::<Value>(&line) {
                    Ok(msg) if msg.get("jsonrpc") == Some(&json!("2.0")) => {
                        let is_response = msg.get("result").is_some() || msg.get("error").is_some();
                        match msg.get("id").filter(|_| is_response) {
                            Some(id) => {
                                let key = id_key(id);
                                *inbox.counts.entry(key.clone()).or_default() += 1;
                                match inbox.waiting.remove(&key) {
                                    Some(tx) => {
                                        let _ = tx.send((msg, now));
                                    }
                                    None => {
                                        inbox.unclaimed.insert(key, (msg, now));
                                    }
                                }
                            }
                            None => inbox.notifications.push((msg, now)),
                        }
                    }
                    _ => inbox.garbage.push(line),
                }
            }
            reader_inbox.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        });
        Ok(McpClient { child, stdin, inbox, next_id: 1_000_000 })
    }

    fn inbox(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Write one line (a message or anything else) to the server's stdin.
    pub async fn send_line(&mut self, line: &str) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| std::io::Error::other("stdin closed"))?;
        stdin.write_all(line.as_bytes()).await?;
        stdin.write_all(b"\n").await?;
        stdin.flush().await
    }

    /// Send a message; if it is a request, returns a receiver for its response.
    pub async fn send(&mut self, msg: &Value) -> std::io::Result<Option<oneshot::Receiver<Response>>> {
        let rx = match msg.get("id").filter(|_| msg.get("method").is_some()) {
            Some(id) => {
                let (tx, rx) = oneshot::channel();
                let key = id_key(id);
                let mut inbox = self.inbox();
                match inbox.unclaimed.remove(&key) {
                    Some(response) => {
                        let _ = tx.send(response);
                    }
                    None => {
                        inbox.waiting.insert(key, tx);
                    }
                }
                Some(rx)
            }
            None => None,
        };
        self.send_line(&msg.to_string()).await?;
        Ok(rx)
    }

    /// Send a request with a fresh id; returns the id and the response receiver.
    pub async fn request(&mut self, method: &str, params: Value) -> std::io::Result<(Value, oneshot::Receiver<Response>)> {
        let id = json!(self.next_id);
        self.next_id += 1;
        let rx = self
            .send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await?
            .ok_or_else(|| std::io::Error::other("not a request"))?;
        Ok((id, rx))
    }

    /// A request's result, or an error string.
    pub async fn call(&mut self, method: &str, params: Value, timeout: Duration) -> Result<Value, String> {
        let (_, rx) = self.request(method, params).await.map_err(|e| e.to_string())?;
        let (response, _) = tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| format!("{method}: no response within {timeout:?}"))?
            .map_err(|_| format!("{method}: server closed"))?;
        match response.get("error") {
            Some(e) => Err(format!("{method}: {e}")),
            None => Ok(response["result"].clone()),
        }
    }

    /// MCP handshake, as Psyche does it.
    pub async fn initialize(&mut self, timeout: Duration) -> Result<Value, String> {
        let result = self
            .call(
                "initialize",
                json!({"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "elpis-client", "version": env!("CARGO_PKG_VERSION")}}),
                timeout,
            )
            .await?;
        self.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await
            .map_err(|e| e.to_string())?;
        Ok(result)
    }

    /// Call a tool; Ok is the parsed JSON object (which may hold "error").
    pub async fn tool(&mut self, name: &str, args: Value, timeout: Duration) -> Result<Value, String> {
        let result = self.call("tools/call", json!({"name": name, "arguments": args}), timeout).await?;
        tool_result_object(&result)
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn garbage(&self) -> Vec<String> {
        self.inbox().garbage.clone()
    }

    /// Notifications received so far, with their arrival times.
    pub fn notifications(&self) -> Vec<(Value, Instant)> {
        self.inbox().notifications.clone()
    }

    /// How many responses arrived for `id`.
    pub fn response_count(&self, id: &Value) -> usize {
        self.inbox().counts.get(&id_key(id)).copied().unwrap_or(0)
    }

    pub fn stdout_closed(&self) -> bool {
        self.inbox().closed
    }

    /// Wait for the process to exit; None if it did not within `timeout` (it is then killed).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = self.child.kill().await;
                None
            }
        }
    }

    /// Resident memory of the server in KiB (Linux /proc).
    pub fn rss_kib(&self) -> Option<u64> {
        self.proc_status_kib("VmRSS:")
    }

    /// Peak resident memory of the server in KiB (Linux /proc).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.proc_status_kib("VmHWM:")
    }

    fn proc_status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

/// The JSON object inside a tools/call result's single text block.
pub fn tool_result_object(result: &Value) -> Result<Value, String> {
    let content = result["content"].as_array().ok_or_else(|| format!("no content in {result}"))?;
    if content.len() != 1 || content[0]["type"] != "text" {
        return Err(format!("expected one text block: {result}"));
    }
    let text = content[0]["text"].as_str().ok_or("text block without text")?;
    let value: Value = serde_json::from_str(text).map_err(|e| format!("text is not JSON ({e}): {text}"))?;
    if !value.is_object() {
        return Err(format!("result is not a JSON object: {value}"));
    }
    Ok(value)
}

/// p50 and p99 (nearest rank) of a list of milliseconds.
pub fn percentiles(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}
