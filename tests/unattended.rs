//! Work nobody waits for, through the real binary: streams nobody reads stop
//! and yield to requests a client is waiting on, and a client that stops
//! reading stdout ends the session, while one that is merely slow gets
//! every answer.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ONE_THREAD: (&str, &str) = ("ELPIS_MODEL_N_THREADS", "1");

fn start_stream(s: &mut Server, prompt: &str, max_tokens: u32) -> String {
    let start = s.tool("generate_stream_start", greedy_args(prompt, max_tokens)).ok();
    start["stream_id"].as_str().unwrap().to_string()
}

fn read(s: &mut Server, id: &str) -> Value {
    s.tool("generate_stream_read", json!({"stream_id": id})).ok()
}

/// Polls get_capabilities until `done` holds (a hang guard of minutes, not a timing).
fn wait_caps(s: &mut Server, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let caps = s.tool("get_capabilities", json!({})).ok();
        if done(&caps) {
            return caps;
        }
        assert!(Instant::now() < deadline, "{what}: {caps}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn streams_nobody_reads_stop_and_stay_readable() {
    let mut s = Server::start(&[ONE_THREAD, ("ELPIS_SERVER_STREAM_IDLE_S", "1.5")]);
    let ids = [start_stream(&mut s, "Write a long story.", 2000), start_stream(&mut s, "Count from one to one thousand.", 2000)];
    let first: Vec<Value> = ids.iter().map(|id| read(&mut s, id)).collect();
    // Nobody reads them any more: past the idle limit they stop generating.
    let caps = wait_caps(&mut s, "abandoned streams still generate", |c| c["active_generations"] == 0 && c["queued_generations"] == 0);
    assert_eq!(caps["active_streams"], 2, "their text is still readable: {caps}");
    for slot in caps["slot_states"].as_array().unwrap() {
        assert_eq!(slot["busy"], false, "{slot}");
        assert_eq!(slot["kv_pos_max"].as_i64().unwrap(), slot["tokens"].as_i64().unwrap() - 1, "reply cells freed: {slot}");
    }
    for (id, first) in ids.iter().zip(&first) {
        let last = read(&mut s, id);
        assert_eq!(last["is_complete"], true, "{last}");
        let text = format!("{}{}", first["new_content"].as_str().unwrap(), last["new_content"].as_str().unwrap());
        assert_eq!(last["full_content"].as_str().unwrap(), text);
        let tokens = last["usage"]["completion_tokens"].as_u64().unwrap();
        // Abandoned, unless the model ended the reply on its own first.
        match last["finish_reason"].as_str().unwrap() {
            "abandoned" => assert!(tokens < 2000, "{last}"),
            "stop" => eprintln!("a stream ended by itself before it was abandoned ({tokens} tokens)"),
            other => panic!("finish_reason {other}: {last}"),
        }
        assert!(s.tool("generate_stream_read", json!({"stream_id": id})).err().contains("unknown stream_id"));
    }
    s.shutdown();
}

/// The property: a `generate` gets a slot while two unread streams hold
/// both, instead of queueing until one finishes. It is shown when both
/// streams are still unfinished once the generate has answered; a run in
/// which a stream ended first (a very fast machine) shows nothing, and is
/// tried again rather than counted.
#[test]
fn a_generate_does_not_wait_behind_streams_nobody_reads() {
    let mut s = Server::start(&[ONE_THREAD]);
    for attempt in 1..=3 {
        // Two slots, both taken by streams that were read once and then left.
        let ids = [start_stream(&mut s, "Write a long story.", 300), start_stream(&mut s, "Count from one to one thousand.", 300)];
        let mut texts: Vec<String> = ids.iter().map(|id| read(&mut s, id)["new_content"].as_str().unwrap().to_string()).collect();
        let sent = Instant::now();
        let out = s.tool("generate", greedy_args("Say hello.", 16)).ok();
        let waited = sent.elapsed();
        assert!(out["usage"]["completion_tokens"].as_u64().unwrap() >= 1, "{out}");
        let caps = s.tool("get_capabilities", json!({})).ok();
        let unfinished = caps["active_generations"].as_u64().unwrap() + caps["queued_generations"].as_u64().unwrap();
        eprintln!("attempt {attempt}: generate answered in {waited:?}; {unfinished} of the two unread streams unfinished then");
        // Read again (both, in turn, as a client would): the streams resume
        // where they stopped and finish whole.
        let mut open = vec![true, true];
        let deadline = Instant::now() + TIMEOUT;
        while open.contains(&true) {
            for (i, id) in ids.iter().enumerate() {
                if !open[i] {
                    continue;
                }
                let r = read(&mut s, id);
                texts[i].push_str(r["new_content"].as_str().unwrap());
                if r["is_complete"] == true {
                    open[i] = false;
                    assert_eq!(r["full_content"].as_str().unwrap(), texts[i]);
                    let tokens = r["usage"]["completion_tokens"].as_u64().unwrap();
                    match r["finish_reason"].as_str().unwrap() {
                        "length" => assert_eq!(tokens, 300, "{r}"),
                        "stop" => assert!(tokens < 300, "{r}"),
                        other => panic!("finish_reason {other}: {r}"),
                    }
                }
            }
            assert!(Instant::now() < deadline, "streams did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = s.tool("get_capabilities", json!({})).ok();
        for slot in caps["slot_states"].as_array().unwrap() {
            assert_eq!(slot["kv_pos_max"].as_i64().unwrap(), slot["tokens"].as_i64().unwrap() - 1, "{slot}");
        }
        if unfinished == 2 {
            s.shutdown();
            return;
        }
    }
    panic!("in three tries the generate never answered while both unread streams were unfinished");
}

/// A server driven by hand: the test decides when (and whether) stdout is read.
struct Raw {
    child: Child,
    stdin: ChildStdin,
    stdout: Option<BufReader<ChildStdout>>,
    stderr_path: std::path::PathBuf,
}

impl Raw {
    fn spawn(name: &str) -> Raw {
        let stderr_path = std::env::temp_dir().join(format!("elpis-unattended-{name}-{}.stderr", std::process::id()));
        let mut child = server_command()
            .env("ELPIS_LOGGING_LEVEL", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = Some(BufReader::new(child.stdout.take().unwrap()));
        let mut raw = Raw { child, stdin, stdout, stderr_path };
        raw.send(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
            "capabilities": {}, "clientInfo": {"name": "elpis-tests", "version": "1"}}}));
        let init = raw.next_message();
        assert_eq!(init["id"], 0, "{init}");
        raw.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        raw
    }

    fn send(&mut self, msg: &Value) {
        writeln!(self.stdin, "{msg}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn next_message(&mut self) -> Value {
        let mut line = String::new();
        let n = self.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
        assert!(n > 0, "stdout closed; stderr:\n{}", self.stderr());
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

fn generate_request(id: u64, max_tokens: u32, progress: Option<&str>) -> Value {
    let mut params = json!({"name": "generate", "arguments": {"messages": user("Write a long story."), "max_tokens": max_tokens, "temperature": 0}});
    if let Some(token) = progress {
        params["_meta"] = json!({"progressToken": token});
    }
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params})
}

#[test]
fn a_client_that_stops_reading_ends_the_session() {
    let mut raw = Raw::spawn("gone");
    raw.send(&generate_request(1, 2000, None));
    std::thread::sleep(Duration::from_millis(300));
    // The reader is gone; stdin stays open.
    drop(raw.stdout.take());
    let sent = Instant::now();
    raw.send(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "get_emotion", "arguments": {}}}));
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = raw.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running {TIMEOUT:?} after its reader left; stderr:\n{}", raw.stderr());
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("exited {:?} after the first answer it could not write", sent.elapsed());
    assert!(status.success(), "{status:?}\n{}", raw.stderr());
    assert!(raw.stderr().contains("the client stopped reading"), "{}", raw.stderr());
}

/// While the reader pauses, the server keeps generating and coalesces the
/// progress text it cannot write yet. To make that certain rather than a
/// race with the decode speed, the test stops reading until the server has
/// *finished* the whole generation (its log says so): every token was then
/// produced while stdout was blocked, and what can be queued without
/// coalescing is bounded by the pipe and the channels (about 100 lines of
/// 2 KB), far below the 400 tokens.
#[test]
fn a_reader_that_pauses_gets_every_answer_with_flat_memory() {
    let mut raw = Raw::spawn("paused");
    // Once read as it comes, for the baseline.
    raw.send(&generate_request(1, 400, Some("warm")));
    loop {
        if raw.next_message()["id"] == 1 {
            break;
        }
    }
    let before = raw.rss_kib();
    let finished_before = raw.stderr().matches("generation finished").count();
    // A long token makes each notification about 2 KB: the 64 KB pipe holds
    // about 30 of them.
    let token = format!("slow-{}", "x".repeat(2000));
    raw.send(&generate_request(2, 400, Some(&token)));
    // Not a byte is read until the generation is over.
    let deadline = Instant::now() + TIMEOUT;
    while raw.stderr().matches("generation finished").count() == finished_before {
        assert!(Instant::now() < deadline, "the generation did not finish while the reader paused; stderr:\n{}", raw.stderr());
        assert!(raw.child.try_wait().unwrap().is_none(), "the server exited; stderr:\n{}", raw.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut streamed = String::new();
    let mut notifications = 0;
    let response = loop {
        let msg = raw.next_message();
        if msg["id"] == 2 {
            break msg;
        }
        assert_eq!(msg["method"], "notifications/progress", "{msg}");
        assert_eq!(msg["params"]["progressToken"].as_str(), Some(token.as_str()), "{msg}");
        streamed.push_str(msg["params"]["message"].as_str().unwrap_or(""));
        notifications += 1;
    };
    let after = raw.rss_kib();
    let out = parse_tool_response(&response).ok();
    assert_eq!(streamed, out["content"].as_str().unwrap(), "every piece of text arrived, in order");
    let tokens = out["usage"]["completion_tokens"].as_u64().unwrap();
    eprintln!(
        "paused reader: {notifications} progress notifications for {tokens} tokens; RSS {} -> {} MiB",
        before / 1024,
        after / 1024
    );
    // Bounded by what stdout and the queues hold, not by the tokens.
    assert!(notifications <= 128 && (tokens < 128 || notifications < tokens), "progress was not coalesced: {notifications} for {tokens} tokens");
    assert!(after < before + 16 * 1024, "memory grew while the reader paused: {before} -> {after} KiB");
    raw.send(&json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "get_emotion", "arguments": {}}}));
    assert_eq!(raw.next_message()["id"], 3);
}
