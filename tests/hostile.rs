//! Hostile input, property-based: random raw lines and random tool arguments
//! against one real server. Every request gets exactly one well-formed
//! answer and the server stays up. The case budget is fixed for CI
//! (ELPIS_FUZZ_CASES raises it; scripts/fuzz.sh runs a long one).

mod common;
#[path = "common/arbitrary.rs"]
mod arbitrary;

use std::sync::Mutex;
use std::time::Duration;

use arbitrary::{json_value, seeded};
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

fn cases() -> u32 {
    std::env::var("ELPIS_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

/// The real tools, plus names no tool has.
fn tool_names() -> Vec<&'static str> {
    TOOL_NAMES.iter().copied().chain(["no_such_tool", ""]).collect()
}
const KEYS: [&str; 10] =
    ["messages", "max_tokens", "temperature", "emotional_modulation", "stream_id", "event_type", "intensity", "context", "tools", "tool_choice"];

/// Tool arguments built from the real argument names with random values
/// (messages sometimes well-formed, so validation past the types is reached).
fn tool_args() -> impl Strategy<Value = Value> {
    let message = (prop_oneof![Just("user"), Just("system"), Just("assistant"), Just("wizard"), Just("")], "\\PC{0,30}")
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    let messages = prop_oneof![proptest::collection::vec(message, 0..3).prop_map(Value::from), json_value()];
    (proptest::collection::btree_map(proptest::sample::select(KEYS.to_vec()), json_value(), 0..5), messages, any::<bool>())
        .prop_map(|(mut map, messages, with_messages)| {
            if with_messages {
                map.insert("messages", messages);
            }
            // Keep any generation the fuzzer makes valid short.
            if map.get("max_tokens").is_some_and(|v| v.as_i64().is_some_and(|n| n > 8)) {
                map.insert("max_tokens", json!(8));
            }
            Value::Object(map.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
        })
}

#[derive(Debug, Clone)]
enum Input {
    RawLine(String),
    Json(Value),
    Tool(&'static str, Value),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        "[^\\n\\r]{0,200}".prop_map(Input::RawLine),
        json_value().prop_map(Input::Json),
        (proptest::sample::select(tool_names()), tool_args()).prop_map(|(t, a)| Input::Tool(t, a)),
    ]
}

#[test]
fn random_lines_and_arguments_never_break_the_server() {
    let server = Mutex::new(Server::start(&[("ELPIS_MODEL_N_THREADS", "1"), ("ELPIS_MODEL_MAX_TOKENS", "8"), ("ELPIS_LOGGING_LEVEL", "warn")]));
    let mut runner = TestRunner::new_with_rng(Config { cases: cases(), failure_persistence: None, ..Config::default() }, seeded(20261127));
    let requests = std::cell::Cell::new(0u64);
    let outcome = runner.run(&input(), |case| {
        let mut s = server.lock().unwrap();
        match case {
            Input::RawLine(line) => s.send_line(&line),
            Input::Json(value) => s.send(&value),
            Input::Tool(name, args) => {
                requests.set(requests.get() + 1);
                let id = s.request_tool(name, args);
                let response = s.wait_timed(&id, Duration::from_secs(60)).0;
                if response.get("error").is_none() {
                    let result = &response["result"];
                    let text = result["content"][0]["text"].as_str().expect("one text block");
                    let value: Value = serde_json::from_str(text).expect("JSON text");
                    prop_assert!(value.is_object());
                    if result["isError"] == true {
                        prop_assert!(value["error"].is_string());
                    }
                }
            }
        }
        // Still answering, between every case.
        let ping = s.request_tool("get_emotion", json!({}));
        requests.set(requests.get() + 1);
        let response = s.wait_timed(&ping, Duration::from_secs(60)).0;
        prop_assert!(parse_tool_response(&response).value.get("valence").is_some());
        Ok(())
    });
    let server = server.into_inner().unwrap();
    eprintln!("hostile input: {} cases, {} requests, all answered", cases(), requests.get());
    if let Err(e) = outcome {
        panic!("{e}\nstderr:\n{}", server.stderr());
    }
    server.shutdown();
}

/// Random JSON schemas, built from the keywords the converter reads
/// (types, properties, required, enums, patterns, formats, refs,
/// combinators, bounds), with junk among them.
fn schema() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        proptest::sample::select(vec!["string", "integer", "number", "boolean", "null", "object", "array", "bogus"])
            .prop_map(|t| json!({"type": t})),
        proptest::sample::select(vec!["^[a-z]+$", "(", "[a-", "\\d{2,1}", "a{99999}", ".*", "(?i)x", "\\p{L}", ""])
            .prop_map(|p| json!({"type": "string", "pattern": p})),
        proptest::sample::select(vec!["date", "date-time", "uuid", "email", "time", "nonsense"]).prop_map(|f| json!({"type": "string", "format": f})),
        (any::<i64>(), any::<i64>()).prop_map(|(a, b)| json!({"type": "integer", "minimum": a, "maximum": b})),
        (0u64..5, 0u64..100_000).prop_map(|(a, b)| json!({"type": "string", "minLength": b, "maxLength": a})),
        proptest::collection::vec(json_value(), 0..4).prop_map(|e| json!({"enum": e})),
        json_value().prop_map(|c| json!({"const": c})),
        proptest::sample::select(vec!["#/nowhere", "#", "#/$defs/a", "http://example.com/s.json", ""]).prop_map(|r| json!({"$ref": r})),
        json_value(),
    ];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            proptest::collection::btree_map("[a-z]{1,6}", inner.clone(), 0..3).prop_map(|props| {
                let required: Vec<&String> = props.keys().collect();
                json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
            }),
            (inner.clone(), 0u64..4, 0u64..4).prop_map(|(items, lo, hi)| json!({"type": "array", "items": items, "minItems": lo, "maxItems": hi})),
            proptest::collection::vec(inner.clone(), 0..3).prop_map(|v| json!({"anyOf": v})),
            proptest::collection::vec(inner.clone(), 0..3).prop_map(|v| json!({"allOf": v})),
            (inner.clone(), inner).prop_map(|(a, b)| json!({"$defs": {"a": a}, "oneOf": [b, {"$ref": "#/$defs/a"}]})),
        ]
    })
}

/// The JSON-schema-to-grammar converter (llama.cpp's, reached through
/// `response_format`) on random schemas: each request is answered, a reply
/// or an error naming response_format, and the server goes on serving.
#[test]
fn random_schemas_never_break_the_server() {
    let server = Mutex::new(Server::start(&[("ELPIS_MODEL_N_THREADS", "1"), ("ELPIS_LOGGING_LEVEL", "warn")]));
    let mut runner = TestRunner::new_with_rng(Config { cases: cases(), failure_persistence: None, ..Config::default() }, seeded(20261127));
    let refused = std::cell::Cell::new(0u32);
    let outcome = runner.run(&schema(), |schema| {
        let mut s = server.lock().unwrap();
        let format = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}});
        let id = s.request_tool("generate", json!({"messages": user("x"), "max_tokens": 2, "temperature": 0, "response_format": format}));
        let response = s.wait_timed(&id, Duration::from_secs(120)).0;
        let r = parse_tool_response(&response);
        if r.is_error {
            let error = r.value["error"].as_str().unwrap_or_default().to_string();
            prop_assert!(error.contains("response_format") || error.contains("schema") || error.contains("grammar"), "{error}");
            refused.set(refused.get() + 1);
        } else {
            prop_assert!(r.value["content"].is_string());
        }
        let ping = s.request_tool("get_emotion", json!({}));
        prop_assert!(parse_tool_response(&s.wait_timed(&ping, Duration::from_secs(60)).0).value.get("valence").is_some());
        Ok(())
    });
    let server = server.into_inner().unwrap();
    eprintln!("random schemas: {} cases, {} refused with an error", cases(), refused.get());
    if let Err(e) = outcome {
        panic!("{e}\nstderr:\n{}", server.stderr());
    }
    server.shutdown();
}

#[test]
fn named_hostile_inputs() {
    let mut s = Server::start(&[("ELPIS_MODEL_N_THREADS", "1"), ("ELPIS_MODEL_MAX_TOKENS", "8")]);
    for line in [
        "",
        "   ",
        "null",
        "42",
        "\"just a string\"",
        "{\"jsonrpc\": \"1.0\", \"id\": 1, \"method\": \"tools/list\"}",
        "{\"jsonrpc\": \"2.0\", \"method\": \"tools/call\"}",
        "{\"jsonrpc\": \"2.0\", \"id\": null, \"method\": \"tools/list\"}",
        "{\"jsonrpc\": \"2.0\", \"id\": {\"a\": 1}, \"method\": \"tools/list\"}",
        "\u{feff}{\"jsonrpc\": \"2.0\"}",
    ] {
        s.send_line(line);
    }
    let checks = [
        ("generate", json!({"messages": user("x"), "max_tokens": 1e300}), "max_tokens"),
        ("generate", json!({"messages": user("x"), "max_tokens": -9223372036854775808i64}), "max_tokens"),
        ("generate", json!({"messages": user("x"), "temperature": -0.0001}), "temperature"),
        ("generate", json!({"messages": user("x"), "temperature": "NaN"}), "temperature"),
        ("generate", json!({"messages": [{"role": "user", "content": "x"}, 7]}), "messages"),
        ("generate", json!({"messages": [{"role": "user", "content": null}]}), "content"),
        ("update_emotion", json!({"event_type": "success", "intensity": f64::MAX}), ""),
        ("generate_stream_read", json!({"stream_id": "../../etc/passwd"}), "unknown stream_id"),
        ("generate_stream_read", json!({"stream_id": ""}), "unknown stream_id"),
        ("function_call", json!({"messages": user("x"), "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}]}), ""),
    ];
    for (tool, args, word) in checks {
        let r = s.tool(tool, args.clone());
        if r.is_error {
            assert!(r.value["error"].as_str().unwrap().contains(word), "{tool} {args}: {}", r.value);
        }
    }
    // Empty content is fine; the server still serves.
    let out = s.tool("generate", json!({"messages": user(""), "max_tokens": 2})).ok();
    assert!(out["content"].is_string());
    s.shutdown();
}

/// Every line gets exactly one answer, even one no parser can read: the
/// request's id when the line shows it, else null. A line over
/// server.max_line_bytes is discarded as it streams in, not buffered.
#[test]
fn every_unreadable_line_is_answered() {
    let mut s = Server::start(&[("ELPIS_MODEL_N_THREADS", "1")]);
    let ping = |s: &mut Server| assert!(s.tool("get_emotion", json!({})).ok().get("valence").is_some());
    let error_of = |s: &mut Server, id: Value| -> (i64, String) {
        let response = s.wait(&id);
        let error = &response["error"];
        (error["code"].as_i64().unwrap_or_else(|| panic!("no error: {response}")), error["message"].as_str().unwrap().to_string())
    };
    s.send_bytes(b"{\"jsonrpc\":\"2.0\",\"id\":501,\"method\":\"tools/list\",\"params\":{\"x\":\"\xff\xfe\"}}");
    assert_eq!(error_of(&mut s, json!(501)).0, -32700);
    s.send_line(r#"[{"jsonrpc":"2.0","id":502,"method":"tools/list"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#);
    let (code, message) = error_of(&mut s, json!(502));
    assert_eq!(code, -32600);
    assert!(message.contains("batches"), "{message}");
    let deep = format!(r#"{{"jsonrpc":"2.0","id":503,"method":"tools/list","params":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
    s.send_line(&deep);
    let (code, message) = error_of(&mut s, json!(503));
    assert_eq!(code, -32700);
    assert!(message.contains("nested too deeply"), "{message}");
    ping(&mut s);
    let before = s.rss_kib();
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":504,"method":"tools/call","params":{{"name":"generate","arguments":{{"messages":[{{"role":"user","content":"{}"}}]}}}}}}"#,
        "x".repeat(20 * 1024 * 1024)
    );
    s.send_line(&huge);
    let (code, message) = error_of(&mut s, json!(504));
    let after = s.rss_kib();
    assert_eq!(code, -32600);
    assert!(message.contains("max_line_bytes"), "{message}");
    assert!(after < before + 12 * 1024, "a 20 MB line was buffered: RSS {before} -> {after} KiB");
    // No id to read: answered with null.
    s.send_line("{this is not json");
    let (code, _) = error_of(&mut s, Value::Null);
    assert_eq!(code, -32700);
    ping(&mut s);
    s.shutdown();
}
