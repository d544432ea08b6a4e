//! The session's edges through the real binary: whatever arrives before
//! `initialize` gets a clear answer, and every request read before stdin
//! closes is answered before the server exits 0, even when the request and
//! stdin's end are written together.

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Write `input` to a fresh server's stdin in one go, close it, and collect
/// every stdout line and the exit status.
fn one_shot(input: &str) -> (Vec<Value>, std::process::ExitStatus, String) {
    let mut child = server_command()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    // Both pipes drained aside, so the server never blocks on a full one.
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).unwrap();
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    // A hang guard only: a server that never exits is killed and fails here.
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("the server hung: no exit {TIMEOUT:?} after stdin closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::process::Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() };
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}")))
        .collect();
    (lines, out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn line(msg: Value) -> String {
    format!("{msg}\n")
}

fn initialize(id: u64) -> String {
    line(json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
        "capabilities": {}, "clientInfo": {"name": "elpis-tests", "version": "1"}}}))
}

fn answer<'a>(lines: &'a [Value], id: &Value) -> &'a Value {
    let answers: Vec<&Value> = lines.iter().filter(|l| l.get("id") == Some(id) && l.get("method").is_none()).collect();
    assert_eq!(answers.len(), 1, "request {id} got {} answers: {lines:?}", answers.len());
    answers[0]
}

#[test]
fn a_request_before_initialize_is_answered_even_with_stdin_closing_at_once() {
    let request = line(json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"}));
    for _ in 0..3 {
        let (lines, status, stderr) = one_shot(&request);
        assert!(status.success(), "{status:?}: {stderr}");
        let a = answer(&lines, &json!(7));
        assert_eq!(a["error"]["code"], -32600, "{a}");
        let message = a["error"]["message"].as_str().unwrap();
        assert!(message.contains("send initialize first") && message.contains("io.modelcontextprotocol/protocolVersion"), "{message}");
        assert_eq!(lines.len(), 1, "{lines:?}");
    }
}

#[test]
fn stdin_closing_before_initialize_exits_zero() {
    let (lines, status, stderr) = one_shot("");
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(lines.is_empty(), "{lines:?}");
    // A notification before initialize is no reason to end badly either.
    let (lines, status, stderr) = one_shot(&line(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})));
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(lines.is_empty(), "{lines:?}");
}

#[test]
fn the_session_goes_on_after_early_mistakes() {
    let mut input = String::new();
    input += &line(json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}));
    input += &line(json!({"jsonrpc": "2.0", "id": "early", "method": "tools/call", "params": {"name": "get_emotion", "arguments": {}}}));
    // A sessionless client that forgot its capabilities hears which field is missing.
    input += &line(json!({"jsonrpc": "2.0", "id": "partial", "method": "tools/list",
        "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}}));
    input += &line(json!({"jsonrpc": "2.0", "id": "ping", "method": "ping"}));
    input += &initialize(1);
    input += &line(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    input += &line(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "get_emotion", "arguments": {}}}));
    let (lines, status, stderr) = one_shot(&input);
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(answer(&lines, &json!("early"))["error"]["message"].as_str().unwrap().contains("send initialize first"));
    let partial = answer(&lines, &json!("partial"));
    assert_eq!(partial["error"]["code"], -32602, "{partial}");
    assert!(partial["error"]["message"].as_str().unwrap().contains("io.modelcontextprotocol/clientCapabilities"), "{partial}");
    assert_eq!(answer(&lines, &json!("ping"))["result"], json!({}));
    assert!(answer(&lines, &json!(1))["result"]["serverInfo"].is_object());
    let mood = parse_tool_response(answer(&lines, &json!(2))).ok();
    assert!(mood["valence"].is_number(), "{mood}");
}

/// A generate written together with stdin's end, and quick calls behind it:
/// each is answered before the exit (the generate cut short as cancelled).
#[test]
fn every_request_read_before_stdin_closes_is_answered() {
    let mut input = initialize(1);
    input += &line(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    input += &line(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "generate", "arguments": {"messages": user("Write a long story."), "max_tokens": 2000, "temperature": 0}}}));
    input += &line(json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "generate_stream_start", "arguments": {"messages": user("Write a poem."), "max_tokens": 2000}}}));
    input += &line(json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "get_capabilities", "arguments": {}}}));
    input += &line(json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}));
    let (lines, status, stderr) = one_shot(&input);
    assert!(status.success(), "{status:?}: {stderr}");
    let generate = parse_tool_response(answer(&lines, &json!(2))).ok();
    assert!(["cancelled", "length", "stop"].contains(&generate["finish_reason"].as_str().unwrap()), "{generate}");
    assert!(generate["usage"]["completion_tokens"].as_u64().unwrap() < 2000, "{generate}");
    parse_tool_response(answer(&lines, &json!(3))).ok();
    parse_tool_response(answer(&lines, &json!(4))).ok();
    assert_eq!(answer(&lines, &json!(5))["result"]["tools"].as_array().unwrap().len(), 9);
}

/// Issue 33's regression: requests sent under the id of one still in flight
/// (a client bug, but a real one), over every kind of call. Each gets exactly
/// one answer (a clear error, or its result when the first had already been
/// answered), the first goes on, and stdin's end still ends the session.
#[test]
fn a_request_id_reused_while_in_flight_is_answered_and_the_session_still_ends() {
    let call = |name: &str, arguments: Value| {
        line(json!({"jsonrpc": "2.0", "id": "dup", "method": "tools/call", "params": {"name": name, "arguments": arguments}}))
    };
    let long = json!({"messages": user("Write a long story."), "max_tokens": 2000, "temperature": 0});
    let mut input = initialize(1);
    input += &line(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    input += &call("generate", long.clone());
    let reused = [
        call("generate", long.clone()),
        call("generate_stream_start", long),
        call("function_call", json!({"messages": user("Weather in Paris?"), "tools": [{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]})),
        call("get_emotion", json!({})),
        call("update_emotion", json!({"event_type": "success", "intensity": 0.5})),
        line(json!({"jsonrpc": "2.0", "id": "dup", "method": "tools/list"})),
        line(json!({"jsonrpc": "2.0", "id": "dup", "method": "resources/list"})),
    ];
    for r in &reused {
        input += r;
    }
    input += &line(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "get_emotion", "arguments": {}}}));
    let (lines, status, stderr) = one_shot(&input);
    assert!(status.success(), "{status:?}: {stderr}");
    let answers: Vec<&Value> = lines.iter().filter(|l| l["id"] == json!("dup") && l.get("method").is_none()).collect();
    assert_eq!(answers.len(), 1 + reused.len(), "one answer per request: {answers:?}");
    let refused: Vec<&&Value> = answers.iter().filter(|a| a["error"]["code"] == -32600).collect();
    for a in &refused {
        assert!(a["error"]["message"].as_str().unwrap().contains("already in flight"), "{a}");
    }
    assert!(!refused.is_empty(), "the reused ids were read while the first generate ran: {answers:?}");
    let mood = parse_tool_response(answer(&lines, &json!(2))).ok();
    assert!(mood["valence"].is_number(), "{mood}");
}
