//! Answers inside a decode step (issue 33, item 1), on servers with two
//! llama.cpp threads, so that ggml's other thread waits at its barrier
//! while the runtime's tasks run between graph nodes. The servers run one
//! at a time (two of them would share the two cores four ways).
//!
//! No assertion here is about time: that a call was answered inside a step
//! is read from the server's own count (`quick_calls_inside_steps`), taken
//! where the call is answered; and a context call from inside a step would
//! trip the engine's assertion, which brings the server down.

mod common;

use std::sync::Mutex;

use common::*;
use serde_json::{json, Value};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn two_threads() -> Server {
    Server::start(&[("ELPIS_MODEL_N_THREADS", "2"), ("ELPIS_MODEL_CONTEXT_LENGTH", "4096")])
}

/// A prompt of about 2,000 tokens: many whole-chunk steps to read.
fn long_prompt() -> Value {
    let text: String = (0..220).map(|i| format!("Line {i}: the river bends north past the mill. ")).collect();
    json!([{"role": "user", "content": text}])
}

fn metrics(s: &mut Server) -> Value {
    let read = s.call("resources/read", json!({"uri": "elpis://metrics"}));
    serde_json::from_str(read["contents"][0]["text"].as_str().unwrap()).unwrap()
}

/// Quick calls sent while a long prompt is read are answered from inside
/// its steps, not held until a step ends.
#[test]
fn a_quick_call_is_answered_inside_a_long_step() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = two_threads();
    let long = s.request_tool("generate", json!({"messages": long_prompt(), "max_tokens": 2, "temperature": 0}));
    let mut calls = 0;
    while !s.has_response(&long) {
        assert!(s.tool("get_emotion", json!({})).ok()["valence"].is_number());
        calls += 1;
    }
    let out = parse_tool_response(&s.wait(&long)).ok();
    assert!(out["usage"]["prompt_tokens"].as_u64().unwrap() > 1000, "{out}");
    let m = metrics(&mut s);
    let inside = m["quick_calls_inside_steps"].as_u64().unwrap();
    eprintln!("{calls} mood reads during the prompt; {inside} of all quick calls were answered inside a step");
    assert!(inside >= 1, "no quick call was answered inside a step: {m}");
    assert!(m["quick_calls"].as_u64().unwrap() >= inside);
    s.shutdown();
}

/// `get_capabilities` reports the engine's load, which only the engine's
/// thread may read; inside a long step it is answered with the load the
/// last turn left instead of at the step's end (a client held for seconds
/// stops reading its streams, which then lose their rows in the steps).
#[test]
fn capabilities_are_answered_inside_a_long_step() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = two_threads();
    let long = s.request_tool("generate", json!({"messages": long_prompt(), "max_tokens": 2, "temperature": 0}));
    let mut calls = 0;
    while !s.has_response(&long) {
        let caps = s.tool("get_capabilities", json!({})).ok();
        assert!(caps["active_generations"].as_u64().unwrap() <= 1, "{caps}");
        calls += 1;
    }
    assert!(!parse_tool_response(&s.wait(&long)).is_error);
    let m = metrics(&mut s);
    let inside = m["loads_from_last_turn"].as_u64().unwrap();
    eprintln!("{calls} get_capabilities during the prompt; {inside} answered inside a step");
    assert!(inside >= 1, "every get_capabilities waited for a step to end: {m}");
    // Between steps the load is the engine's own, at once.
    let idle = s.tool("get_capabilities", json!({})).ok();
    assert_eq!(idle["active_generations"], 0, "{idle}");
    s.shutdown();
}

/// Every kind of call, sent while a long prompt is read, runs in a task the
/// engine's thread polls from inside the step; none may reach the context
/// from there (`Engine::assert_owner_thread` asserts it on every context
/// entry). All are answered, the server stays up, and the assertion never
/// fired.
#[test]
fn no_call_inside_a_step_reaches_the_context() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = two_threads();
    let long = s.request_tool("generate", json!({"messages": long_prompt(), "max_tokens": 2, "temperature": 0}));
    let tool = json!([{"type": "function", "function": {"name": "pick", "parameters": {"type": "object",
        "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"]}}}]);
    // Once the prompt is being read (a mood read answered inside a step
    // says so), every kind of call at once, none waited for until all are sent.
    while metrics(&mut s)["quick_calls_inside_steps"].as_u64().unwrap() == 0 && !s.has_response(&long) {
        let _ = s.tool("get_emotion", json!({}));
    }
    let ids = vec![
        s.request_tool("get_capabilities", json!({})),
        s.request("resources/read", json!({"uri": "elpis://metrics"})),
        s.request_tool("generate_stream_start", json!({"messages": user("Hi"), "max_tokens": 2})),
        s.request_tool("function_call", json!({"messages": user("Pick a colour."), "tools": tool, "tool_choice": "required", "temperature": 0})),
        s.request_tool("generate", json!({"messages": user("A name."), "max_tokens": 2,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}})),
        s.request_tool("generate", json!({"messages": []})),
        s.request_tool("update_emotion", json!({"event_type": "insight"})),
        s.request_tool("generate_stream_read", json!({"stream_id": "none"})),
    ];
    let answers: Vec<Value> = ids.iter().map(|id| s.wait(id)).collect();
    for response in &answers {
        assert!(response.get("error").is_none(), "{response}");
    }
    let started = parse_tool_response(&answers[2]).ok();
    let _ = s.tool("generate_stream_cancel", json!({"stream_id": started["stream_id"]}));
    assert!(!parse_tool_response(&answers[3]).is_error);
    assert!(!parse_tool_response(&answers[4]).is_error);
    assert!(parse_tool_response(&answers[5]).is_error);
    assert!(!parse_tool_response(&s.wait(&long)).is_error);
    let m = metrics(&mut s);
    assert!(m["quick_calls_inside_steps"].as_u64().unwrap() >= 1, "nothing ran inside a step: {m}");
    let stderr = s.stderr_all();
    assert!(!stderr.contains("inside a decode") && !stderr.contains("panicked"), "{stderr}");
    eprintln!("every kind of call during the prompt; {} quick calls inside steps", m["quick_calls_inside_steps"]);
    s.shutdown();
}
