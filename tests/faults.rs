//! Faults against the real binary and model: each gives a clear error or a
//! clean exit, and never loses an answer to another request.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// One decode thread per server: tests run two at a time on two cores.
const ONE_THREAD: (&str, &str) = ("ELPIS_MODEL_N_THREADS", "1");

/// How long a server may take to exit once told to: a hang guard.
const EXIT: Duration = Duration::from_secs(120);

#[test]
fn sigterm_during_a_long_prompt_exits_zero_and_answers_it() {
    let mut s = Server::start(&[ONE_THREAD]);
    let long = "The river bends and the light changes. ".repeat(250); // ~2,000 tokens
    let id = s.request_tool("generate", json!({"messages": user(&long), "max_tokens": 16}));
    // Once the engine has taken it (whatever the machine's speed), stop the server.
    let deadline = Instant::now() + TIMEOUT;
    let caps = loop {
        let caps = s.tool("get_capabilities", json!({})).ok();
        if caps["active_generations"] == 1 || s.has_response(&id) {
            break caps;
        }
        assert!(Instant::now() < deadline, "{caps}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let sent = Instant::now();
    s.kill_signal("TERM");
    let status = s.wait_exit(EXIT);
    assert!(status.success(), "{status:?}\n{}", s.stderr());
    eprintln!("SIGTERM with the prompt being read ({}): exit 0 after {:?}", caps["slot_states"], sent.elapsed());
    // The request it was serving was answered before the exit: cut short
    // as cancelled (or complete, had it finished first).
    let out = parse_tool_response(&s.wait(&id)).ok();
    assert!(["cancelled", "length", "stop"].contains(&out["finish_reason"].as_str().unwrap()), "{out}");
}

#[test]
fn stdin_closed_mid_stream_exits_zero() {
    let mut s = Server::start(&[ONE_THREAD]);
    let start = s.tool("generate_stream_start", greedy_args("Write a long story.", 2000)).ok();
    let id = start["stream_id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(300));
    s.tool("generate_stream_read", json!({"stream_id": id})).ok();
    let closed = Instant::now();
    s.close_stdin();
    let status = s.wait_exit(EXIT);
    assert!(status.success(), "{status:?}\n{}", s.stderr());
    eprintln!("stdin closed mid-stream: exit 0 after {:?}", closed.elapsed());
}

#[test]
fn the_101st_stream_is_refused_and_the_rest_survive() {
    // Streams waiting for a slot count against server.max_queued (64) too:
    // raise it, so this test meets the stream limit and not the queue's.
    let mut s = Server::start(&[ONE_THREAD, ("ELPIS_SERVER_MAX_QUEUED", "200")]);
    let mut ids = Vec::new();
    for i in 0..100 {
        let start = s
            .tool("generate_stream_start", json!({"messages": user(&format!("Number {i}")), "max_tokens": 2}))
            .ok();
        ids.push(start["stream_id"].as_str().unwrap().to_string());
    }
    let err = s.tool("generate_stream_start", json!({"messages": user("one too many"), "max_tokens": 2})).err();
    assert!(err.contains("too many streams") && err.contains("100"), "{err}");
    // Every one of the hundred still completes and reads consistently.
    for id in &ids {
        let (text, last) = poll_stream(&mut s, id, Duration::from_millis(5));
        assert_eq!(last["full_content"].as_str().unwrap(), text);
    }
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["active_streams"], 0);
    // Room again.
    s.tool("generate_stream_start", json!({"messages": user("now there is room"), "max_tokens": 2})).ok();
    s.shutdown();
}

#[test]
fn a_stream_expired_by_age_while_being_read() {
    let mut s = Server::start(&[ONE_THREAD, ("ELPIS_SERVER_STREAM_MAX_AGE_S", "1.0")]);
    let old = s
        .tool("generate_stream_start", greedy_args("Write a long story.", 2000))
        .ok()["stream_id"]
        .as_str()
        .unwrap()
        .to_string();
    s.tool("generate_stream_read", json!({"stream_id": old})).ok();
    // Past its age (the sleep makes that certain), it is expired by the next start.
    std::thread::sleep(Duration::from_millis(1200));
    let new = s.tool("generate_stream_start", json!({"messages": user("Hi"), "max_tokens": 4})).ok();
    let err = s.tool("generate_stream_read", json!({"stream_id": old})).err();
    assert!(err.contains("unknown stream_id") && err.contains("expired"), "{err}");
    // The expired stream's generation was stopped: once the new one is read
    // to its end, nothing is left running.
    let (text, last) = poll_stream(&mut s, new["stream_id"].as_str().unwrap(), Duration::from_millis(20));
    assert_eq!(last["full_content"].as_str().unwrap(), text);
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert_eq!((caps["active_streams"].as_u64(), caps["active_generations"].as_u64()), (Some(0), Some(0)), "{caps}");
    s.shutdown();
}

#[test]
fn a_thousand_quick_calls_during_one_generation() {
    let mut s = Server::start(&[ONE_THREAD]);
    let args = json!({"messages": user("Write about mountains."), "max_tokens": 64, "temperature": 0});
    // Once cold, so that the flooded run and the quiet one below both start from the same cache.
    s.tool("generate", args.clone()).ok();
    let generate = s.request_tool("generate", args.clone());
    let started = Instant::now();
    let ids: Vec<Value> = (0..1000)
        .map(|i| match i % 4 {
            0 => s.request_tool("get_emotion", json!({})),
            1 => s.request_tool("get_capabilities", json!({})),
            2 => s.request("resources/read", json!({"uri": "emotion://state"})),
            _ => s.request_tool("generate_stream_read", json!({"stream_id": format!("nope-{i}")})),
        })
        .collect();
    let mut latencies = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (response, at) = s.wait_timed(id, TIMEOUT);
        latencies.push((at - started).as_secs_f64() * 1000.0);
        assert!(response.get("error").is_none(), "{response}");
        if i % 4 != 2 {
            let r = parse_tool_response(&response);
            assert_eq!(r.is_error, i % 4 == 3, "{response}");
        }
    }
    let all_answered_ms = latencies.iter().copied().fold(0.0, f64::max);
    let out = parse_tool_response(&s.wait(&generate)).ok();
    let generate_ms = started.elapsed().as_secs_f64() * 1000.0;
    eprintln!("1000 quick calls answered within {all_answered_ms:.0} ms; the generation took {generate_ms:.0} ms");
    // The same greedy prompt, alone, gives the same text: the flood changed nothing.
    let again = s.tool("generate", args).ok();
    assert_eq!(out["content"], again["content"]);
    s.shutdown();
}

#[test]
fn a_failed_request_never_disturbs_a_running_stream() {
    let mut s = Server::start(&[ONE_THREAD]);
    let start = s.tool("generate_stream_start", greedy_args("Tell a story.", 48)).ok();
    let id = start["stream_id"].as_str().unwrap().to_string();
    // Bad requests of every kind while it runs.
    s.send_line("{garbage");
    s.tool("generate", json!({"messages": []})).err();
    s.tool("generate_stream_start", json!({"messages": user("x"), "max_tokens": -1})).err();
    s.tool("function_call", json!({"messages": user("x"), "tools": [{"type": "function"}]})).err();
    s.tool("generate_stream_cancel", json!({"stream_id": "bogus"})).err();
    s.tool("update_emotion", json!({"event_type": 12})).err();
    let (text, last) = poll_stream(&mut s, &id, Duration::from_millis(50));
    assert_eq!(last["full_content"].as_str().unwrap(), text);
    assert!(last.get("error").is_none(), "{last}");
    s.shutdown();
}

/// Grammar checking over a 262k-token vocabulary once left ~170 MiB of
/// temporaries in the process for good; what a tool needs only while it
/// runs must be returned when it ends.
#[test]
fn function_calls_leave_no_memory_behind() {
    let mut s = Server::start(&[ONE_THREAD]);
    s.tool("generate", json!({"messages": user("Hello"), "max_tokens": 8, "temperature": 0})).ok();
    std::thread::sleep(Duration::from_millis(300));
    let before = s.rss_kib();
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}]);
    for city in ["Oslo", "Rome", "Lima"] {
        let args = json!({"messages": user(&format!("Weather in {city}?")), "tools": tools, "tool_choice": "required", "temperature": 0});
        s.tool("function_call", args).ok();
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = s.rss_kib();
    eprintln!("RSS around three function_calls: {} -> {} MiB", before / 1024, after / 1024);
    assert!(after < before + 24 * 1024, "function_call kept memory: {before} -> {after} KiB");
    s.shutdown();
}

/// Generations queue up to server.max_queued; beyond that a clear "busy"
/// error, and room again once the queue drains.
#[test]
fn the_queue_is_bounded() {
    let mut s = Server::start(&[ONE_THREAD, ("ELPIS_MODEL_PARALLEL", "1"), ("ELPIS_SERVER_MAX_QUEUED", "2")]);
    let wait_for = |s: &mut Server, active: u64, queued: u64| {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let caps = s.tool("get_capabilities", json!({})).ok();
            if caps["active_generations"] == active && caps["queued_generations"] == queued {
                break;
            }
            assert!(Instant::now() < deadline, "{caps}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut ids = vec![s.request_tool("generate", greedy_args("Write a long story.", 2000))];
    wait_for(&mut s, 1, 0);
    ids.push(s.request_tool("generate", greedy_args("Write a long story number two.", 2000)));
    wait_for(&mut s, 1, 1);
    ids.push(s.request_tool("generate", greedy_args("Write a long story number three.", 2000)));
    wait_for(&mut s, 1, 2);
    let err = s.tool("generate", greedy_args("One too many.", 4)).err();
    assert!(err.contains("busy") && err.contains("server.max_queued"), "{err}");
    let err = s.tool("generate_stream_start", greedy_args("One too many.", 4)).err();
    assert!(err.contains("busy"), "{err}");
    for id in &ids {
        s.notify("notifications/cancelled", json!({"requestId": id}));
    }
    wait_for(&mut s, 0, 0);
    let out = s.tool("generate", greedy_args("Now there is room.", 4)).ok();
    assert!(out["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    s.shutdown();
}

/// With overflow = "truncate", a conversation of 1,500 short messages is
/// cut in about one render and one tokenisation (it used to re-render the
/// whole conversation once per dropped message: 16 s, and a get_emotion sent
/// meanwhile waited 11.6 s).
#[test]
fn truncating_a_long_conversation_keeps_quick_calls_quick() {
    let mut s = Server::start(&[ONE_THREAD, ("ELPIS_MODEL_CONTEXT_LENGTH", "1024"), ("ELPIS_MODEL_OVERFLOW", "truncate")]);
    let mut messages = vec![json!({"role": "system", "content": "You are terse."})];
    for i in 0..750 {
        messages.push(json!({"role": "user", "content": format!("Note {i}: the garden needs water.")}));
        messages.push(json!({"role": "assistant", "content": "Noted."}));
    }
    messages.push(json!({"role": "user", "content": "Say hi."}));
    let started = Instant::now();
    let generate = s.request_tool("generate", json!({"messages": messages, "max_tokens": 4, "temperature": 0}));
    std::thread::sleep(Duration::from_millis(20));
    let sent = Instant::now();
    let quick = s.request_tool("get_emotion", json!({}));
    let (_, answered) = s.wait_timed(&quick, TIMEOUT);
    let out = parse_tool_response(&s.wait(&generate)).ok();
    eprintln!(
        "1,501 messages truncated and answered in {:?}; get_emotion meanwhile answered in {:?}",
        started.elapsed(),
        answered - sent
    );
    assert_eq!(out["truncated"], true, "{out}");
    let prompt = out["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt < 1024 && prompt > 500, "cut to fit, not to the bone: {out}");
    s.shutdown();
}
