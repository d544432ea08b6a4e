//! A raw JSON-RPC client for the real `elpis-server` binary over stdio, as
//! Psyche's client speaks it: newline-delimited JSON, one reader thread.
//! Every stdout line must be a JSON-RPC message; anything else fails the test.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A gross-stall guard, not a speed check: grammar-constrained replies on a
/// shared two-core machine can take minutes.
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// Every test server samples with this seed: a test that samples at a
/// temperature (to exercise the emotional modulation) still sees the same
/// tokens on every run. Tests that assert on what the model wrote also ask
/// for greedy decoding (`temperature: 0`).
pub const SEED: &str = "20261127";

/// The nine tools of wire.md.
pub const TOOL_NAMES: [&str; 9] = [
    "generate",
    "generate_stream_start",
    "generate_stream_read",
    "generate_stream_cancel",
    "function_call",
    "update_emotion",
    "reset_emotion",
    "get_emotion",
    "get_capabilities",
];

/// The GGUF model the tests run on: ELPIS_MODEL_PATH, else the fetch script's cache.
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ELPIS_MODEL_PATH") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("ELPIS_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/elpis"));
    let path = cache.join("gemma-3-270m-Q4_K_M.gguf");
    assert!(path.exists(), "test model missing at {}: run scripts/fetch-model.sh (scripts/test.sh does)", path.display());
    path
}

/// One of the instruct test models (`qwen`, `smollm2`): ELPIS_QWEN_PATH /
/// ELPIS_SMOLLM2_PATH, else the fetch script's cache.
pub fn instruct_model_path(name: &str) -> String {
    let (var, file) = match name {
        "qwen" => ("ELPIS_QWEN_PATH", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        "smollm2" => ("ELPIS_SMOLLM2_PATH", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        other => panic!("no test model {other}"),
    };
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p).display().to_string();
    }
    let cache = std::env::var_os("ELPIS_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/elpis"));
    let path = cache.join(file);
    assert!(path.exists(), "test model missing at {}: run scripts/fetch-model.sh {name} (scripts/test.sh does)", path.display());
    path.display().to_string()
}

/// Run `elpis-server prompt` on `model` with `cases` on stdin; its JSON.
pub fn inspect_prompts(model: &str, cases: &Value) -> Vec<Value> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_elpis-server"))
        .arg("prompt")
        .env("ELPIS_MODEL_PATH", model)
        .env("ELPIS_MODEL_N_THREADS", "1")
        .env("ELPIS_EMOTION_STEERING", "off")
        // Drafts are sized by timing, and batched verification rounds
        // differently at near-ties: off, unless a test turns it on.
        .env("ELPIS_MODEL_SPECULATIVE", "off")
        // Saved prompts would carry over from test to test: none, unless a test wants them.
        .env("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "0")
        .env_remove("ELPIS_QUIET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn elpis-server prompt");
    child.stdin.take().unwrap().write_all(cases.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "elpis-server prompt failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("prompt prints a JSON array")
}

#[derive(Default)]
struct Inbox {
    responses: HashMap<String, (Value, Instant)>,
    notifications: Vec<(Value, Instant)>,
    /// Lines on stdout that are not JSON-RPC messages.
    garbage: Vec<String>,
    closed: bool,
}

pub struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    inbox: Arc<(Mutex<Inbox>, Condvar)>,
    next_id: u64,
    stderr_path: PathBuf,
}

/// A tool call's parsed result: the JSON object and the isError flag.
#[derive(Debug, Clone)]
pub struct ToolResult {
    pub value: Value,
    pub is_error: bool,
}

impl ToolResult {
    pub fn ok(self) -> Value {
        assert!(!self.is_error && self.value.get("error").is_none(), "tool failed: {}", self.value);
        self.value
    }

    pub fn err(self) -> String {
        assert!(self.is_error, "expected isError: {}", self.value);
        self.value["error"].as_str().unwrap_or_else(|| panic!("no error text: {}", self.value)).to_string()
    }
}

pub fn id_key(id: &Value) -> String {
    id.to_string()
}

/// `elpis-server` with the test settings every test server shares: the
/// test model, one thread, the fixed seed, and what would make replies or
/// state depend on timing or on earlier tests turned off.
pub fn server_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_elpis-server"));
    cmd.env("ELPIS_MODEL_PATH", model_path())
        // Tests run two servers at once on two cores: one thread each,
        // or llama.cpp's threads stall waiting for each other.
        .env("ELPIS_MODEL_N_THREADS", "1")
        .env("ELPIS_MODEL_SEED", SEED)
        // Steering changes what the model writes once vectors exist (and
        // computes them in the background when missing): off, unless a
        // test turns it on.
        .env("ELPIS_EMOTION_STEERING", "off")
        // Drafts are sized by timing, and batched verification rounds
        // differently at near-ties: off, unless a test turns it on.
        .env("ELPIS_MODEL_SPECULATIVE", "off")
        // Saved prompts would carry over from test to test: none, unless a test wants them.
        .env("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "0")
        .env_remove("ELPIS_QUIET");
    cmd
}

impl Server {
    /// Spawn the server on the test model with `env` added, without initialising.
    pub fn spawn_raw(env: &[(&str, &str)], args: &[&str]) -> Server {
        Server::spawn_command(server_command(), env, args)
    }

    /// Spawn the server through `wrapper` (a program and its arguments,
    /// given the server's path and `args` last), and run the handshake.
    pub fn start_under(wrapper: &[&str], env: &[(&str, &str)]) -> Server {
        let plain = server_command();
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..]).arg(plain.get_program());
        for (k, v) in plain.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let mut s = Server::spawn_command(cmd, env, &[]);
        s.initialize();
        s
    }

    fn spawn_command(mut cmd: Command, env: &[(&str, &str)], args: &[&str]) -> Server {
        let stderr_path = std::env::temp_dir().join(format!(
            "elpis-test-{}-{}.stderr",
            std::process::id(),
            uuid_like()
        ));
        let stderr = std::fs::File::create(&stderr_path).expect("create stderr file");
        cmd.args(args)
            .env("ELPIS_LOGGING_LEVEL", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn elpis-server");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let inbox: Arc<(Mutex<Inbox>, Condvar)> = Arc::default();
        let reader_inbox = Arc::clone(&inbox);
        std::thread::spawn(move || {
            let reader = BufReader::new(stdout);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                let now = Instant::now();
                let (lock, cvar) = &*reader_inbox;
                let mut inbox = lock.lock().unwrap();
                // One message, or a batch answer (an array of them).
                let messages = match serde_json::from_str::<Value>(&line) {
                    Ok(Value::Array(items)) if !items.is_empty() => items,
                    Ok(msg) => vec![msg],
                    Err(_) => vec![Value::Null],
                };
                for msg in messages {
                    if msg.get("jsonrpc") != Some(&json!("2.0")) {
                        inbox.garbage.push(line.clone());
                    } else if msg.get("id").is_some() && (msg.get("result").is_some() || msg.get("error").is_some()) {
                        inbox.responses.insert(id_key(&msg["id"]), (msg, now));
                    } else {
                        inbox.notifications.push((msg, now));
                    }
                }
                cvar.notify_all();
            }
            let (lock, cvar) = &*reader_inbox;
            lock.lock().unwrap().closed = true;
            cvar.notify_all();
        });
        Server { child, stdin, inbox, next_id: 1, stderr_path }
    }

    /// Spawn and run the MCP handshake, as Psyche does.
    pub fn start(env: &[(&str, &str)]) -> Server {
        let mut s = Server::spawn_raw(env, &[]);
        s.initialize();
        s
    }

    pub fn initialize(&mut self) -> Value {
        let result = self.call(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "elpis-tests", "version": "1"}}),
        );
        self.notify("notifications/initialized", json!({}));
        result
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Send raw bytes as one line (they need not be UTF-8).
    pub fn send_bytes(&mut self, line: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(line).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    pub fn send(&mut self, msg: &Value) {
        self.send_line(&msg.to_string());
    }

    pub fn notify(&mut self, method: &str, params: Value) {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    /// Send a request; returns its id.
    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = json!(self.next_id);
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        id
    }

    /// Send a tools/call request; returns its id.
    pub fn request_tool(&mut self, name: &str, args: Value) -> Value {
        self.request("tools/call", json!({"name": name, "arguments": args}))
    }

    /// Wait for the response to `id` (the whole JSON-RPC message) and when it arrived.
    pub fn wait_timed(&self, id: &Value, timeout: Duration) -> (Value, Instant) {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.inbox;
        let mut inbox = lock.lock().unwrap();
        loop {
            assert!(inbox.garbage.is_empty(), "non-protocol output on stdout: {:?}", inbox.garbage);
            if let Some(r) = inbox.responses.remove(&id_key(id)) {
                return r;
            }
            assert!(!inbox.closed, "server closed stdout before answering {id}; stderr:\n{}", self.stderr());
            let now = Instant::now();
            assert!(now < deadline, "no response to {id} within {timeout:?}; stderr:\n{}", self.stderr());
            inbox = cvar.wait_timeout(inbox, deadline - now).unwrap().0;
        }
    }

    /// Whether the response to `id` has arrived (without taking it).
    pub fn has_response(&self, id: &Value) -> bool {
        self.inbox.0.lock().unwrap().responses.contains_key(&id_key(id))
    }

    pub fn wait(&self, id: &Value) -> Value {
        self.wait_timed(id, TIMEOUT).0
    }

    /// A request's result; panics on a JSON-RPC error.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.request(method, params);
        let response = self.wait(&id);
        assert!(response.get("error").is_none(), "{method} failed: {response}");
        response["result"].clone()
    }

    /// Call a tool and parse its one text block as JSON.
    pub fn tool(&mut self, name: &str, args: Value) -> ToolResult {
        let id = self.request_tool(name, args);
        parse_tool_response(&self.wait(&id))
    }

    pub fn notifications(&self) -> Vec<Value> {
        self.inbox.0.lock().unwrap().notifications.iter().map(|(n, _)| n.clone()).collect()
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn kill_signal(&self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("server did not exit within {timeout:?}; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    }

    /// The server's memory mappings (`/proc/PID/maps`).
    pub fn maps(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/maps", self.child.id())).expect("the server's mappings")
    }

    /// The CPUs each of the server's threads may run on now (Linux's
    /// `Cpus_allowed_list`, as `0-3,6`), one entry per thread.
    pub fn thread_cpu_lists(&self) -> Vec<String> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).expect("the server's threads");
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
            .filter_map(|status| status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(|v| v.trim().to_string()))
            .collect()
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr_all(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Close stdin and require a clean exit (code 0).
    pub fn shutdown(mut self) {
        self.close_stdin();
        let status = self.wait_exit(Duration::from_secs(120));
        assert!(status.success(), "exit status {status:?}; stderr:\n{}", self.stderr());
        let inbox = self.inbox.0.lock().unwrap();
        assert!(inbox.garbage.is_empty(), "non-protocol output on stdout: {:?}", inbox.garbage);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

/// Parse a tools/call response: exactly one text block holding a JSON object.
pub fn parse_tool_response(response: &Value) -> ToolResult {
    assert!(response.get("error").is_none(), "JSON-RPC error: {response}");
    let result = &response["result"];
    let content = result["content"].as_array().unwrap_or_else(|| panic!("no content: {response}"));
    assert_eq!(content.len(), 1, "expected one content block: {response}");
    assert_eq!(content[0]["type"], "text", "{response}");
    let text = content[0]["text"].as_str().unwrap();
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("text is not JSON ({e}): {text}"));
    assert!(value.is_object(), "result is not an object: {value}");
    ToolResult { value, is_error: result["isError"].as_bool().unwrap_or(false) }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}", N.fetch_add(1, Ordering::Relaxed))
}

pub fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// `generate` arguments for a greedy reply of at most `max_tokens`.
pub fn greedy_args(text: &str, max_tokens: u32) -> Value {
    json!({"messages": user(text), "max_tokens": max_tokens, "temperature": 0})
}

/// `generate` arguments for a greedy reply to `messages` that is compared
/// with another at near-ties ([`agree_or_near_tie`]): each token's two best
/// log-probabilities, and no repetition penalty (see [`NEAR_TIE`]).
pub fn compared_args(messages: Value, max_tokens: u32) -> Value {
    json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.0,
           "logprobs": true, "top_logprobs": 2})
}

/// Poll a stream until complete, like Psyche (every `interval`). Returns the
/// concatenated new_content and the final read.
pub fn poll_stream(server: &mut Server, stream_id: &str, interval: Duration) -> (String, Value) {
    let mut text = String::new();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let read = server.tool("generate_stream_read", json!({"stream_id": stream_id})).ok();
        text.push_str(read["new_content"].as_str().expect("new_content"));
        if read["is_complete"] == true {
            return (text, read);
        }
        assert!(Instant::now() < deadline, "stream {stream_id} did not complete");
        std::thread::sleep(interval);
    }
}

/// Top-two log-probabilities closer than this are a near-tie: batched
/// arithmetic, or another backend's kernels, may round the pick either way.
/// Replies compared this way are asked with [`compared_args`]: the
/// log-probabilities reported are the model's, before penalties, and a
/// penalty can bring two tokens 2.4 apart there to a tie at the pick (Gemma
/// on "def fibonacci(n):", where the local reply and one through an RPC
/// worker, which drafted, parted at `" =="` against `" %"`).
pub const NEAR_TIE: f64 = 0.5;

/// A reply's tokens (asked with `logprobs` and `top_logprobs` >= 2), each
/// with its two best log-probabilities.
pub fn top_two(out: &Value) -> Vec<(String, f64, f64)> {
    out["logprobs"]["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs: {out}"))
        .iter()
        .map(|t| {
            let top: Vec<f64> = t["top_logprobs"].as_array().unwrap().iter().map(|x| x["logprob"].as_f64().unwrap()).collect();
            (t["token"].as_str().unwrap().to_string(), top[0], top.get(1).copied().unwrap_or(f64::NEG_INFINITY))
        })
        .collect()
}

/// Two greedy replies agree token for token, but where the first reply's
/// two best tokens were a near-tie (from there on they may part).
pub fn agree_or_near_tie(a: &Value, b: &Value) {
    let (x, y) = (top_two(a), top_two(b));
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p.0 != q.0) {
        let gap = x[at].1 - x[at].2;
        eprintln!("the replies part at token {at} ({:?} vs {:?}), top two {gap:.3} apart", x[at].0, y[at].0);
        assert!(gap < NEAR_TIE, "the replies part at token {at} where the model was sure: {a}\n{b}");
    } else {
        assert_eq!(a["content"], b["content"]);
    }
}

/// The CPUs a `Cpus_allowed_list` names (`0-3,6` is 0, 1, 2, 3, 6).
pub fn cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(a.trim().parse::<usize>().unwrap()..=b.trim().parse::<usize>().unwrap());
    }
    cpus
}

/// p50 and p99 of durations in milliseconds.
pub fn percentiles(mut ms: Vec<f64>) -> (f64, f64) {
    if ms.is_empty() {
        return (0.0, 0.0);
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}
