//! The scheduler on the real model: prompt-cache reuse gives the cold
//! answer, concurrent streams stay independent, and no slot ever holds KV
//! cells it does not account for.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ONE_THREAD: (&str, &str) = ("ELPIS_MODEL_N_THREADS", "1");

/// Every slot's token count matches what llama.cpp's memory holds.
fn assert_slots_accounted(s: &mut Server) {
    let caps = s.tool("get_capabilities", json!({})).ok();
    let slots = caps["slot_states"].as_array().unwrap();
    assert!(!slots.is_empty());
    for slot in slots {
        let tokens = slot["tokens"].as_i64().unwrap();
        assert_eq!(slot["kv_pos_max"].as_i64().unwrap(), tokens - 1, "slot cells do not match its accounting: {slot}");
        assert_eq!(slot["busy"], false, "{slot}");
    }
}

/// A last message the model echoes with confidence: its greedy reply does
/// not hinge on float rounding, so it must be the same however the prompt
/// was batched (see the note on the free-form comparison below).
const ECHO: &str = "one two three four five six seven eight nine ten eleven twelve";

fn conversation(turns: usize, last: &str) -> Value {
    let mut m = vec![json!({"role": "system", "content": "You are a patient tutor. ".repeat(40)})];
    for i in 0..turns {
        m.push(json!({"role": "user", "content": format!("Question {i}: what is {i} plus {i}?")}));
        m.push(json!({"role": "assistant", "content": format!("{} .", i + i)}));
    }
    m.push(json!({"role": "user", "content": last}));
    Value::from(m)
}

/// Where two texts first differ (for the report), or None.
fn divergence(a: &str, b: &str) -> Option<usize> {
    a.chars().zip(b.chars()).position(|(x, y)| x != y).or(if a.len() == b.len() { None } else { Some(a.len().min(b.len())) })
}

#[test]
fn cached_prompt_gives_the_cold_answer() {
    let mut s = Server::start(&[ONE_THREAD]);
    let args = json!({"messages": conversation(3, ECHO), "max_tokens": 12, "temperature": 0});
    let cold = s.tool("generate", args.clone()).ok();
    assert_eq!(cold["usage"]["cached_tokens"], 0, "{cold}");
    assert!(cold["content"].as_str().unwrap().contains("one two three"), "not an echo: {cold}");
    let warm = s.tool("generate", args).ok();
    let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(warm["usage"]["cached_tokens"].as_u64().unwrap(), prompt - 1, "all but the last prompt token reused: {warm}");
    assert_eq!(cold["content"], warm["content"]);
    // A grown conversation reuses the shared prefix and answers as a fresh
    // server does: stale cells from the shorter conversation would show.
    let grown = json!({"messages": conversation(4, ECHO), "max_tokens": 12, "temperature": 0});
    let reused = s.tool("generate", grown.clone()).ok();
    assert!(reused["usage"]["cached_tokens"].as_u64().unwrap() > 100, "{reused}");
    // Free-form text from the cache, for the record: llama.cpp computes a
    // batch of one token and a chunk of many with different kernels, so
    // low-confidence continuations may drift apart after a while.
    let free = json!({"messages": conversation(4, "Now explain addition."), "max_tokens": 32, "temperature": 0});
    let free_cached = s.tool("generate", free.clone()).ok();
    assert_slots_accounted(&mut s);
    s.shutdown();

    let mut fresh = Server::start(&[ONE_THREAD]);
    let cold_grown = fresh.tool("generate", grown).ok();
    assert_eq!(cold_grown["usage"]["cached_tokens"], 0);
    assert_eq!(cold_grown["content"], reused["content"], "cache reuse changed the greedy answer");
    let free_cold = fresh.tool("generate", free).ok();
    let (a, b) = (free_cold["content"].as_str().unwrap(), free_cached["content"].as_str().unwrap());
    match divergence(a, b) {
        None => eprintln!("free-form greedy text: cached == cold ({} chars)", a.len()),
        Some(at) => eprintln!("free-form greedy text: cached and cold agree on {at} chars, then differ:\n  cold:   {a:?}\n  cached: {b:?}"),
    }
    fresh.shutdown();
}

#[test]
fn cancelling_one_of_several_streams_leaves_the_others_intact() {
    let mut s = Server::start(&[ONE_THREAD, ("ELPIS_MODEL_PARALLEL", "3")]);
    let prompts = [
        "red orange yellow green blue indigo violet",
        "Count to twenty slowly, please, one number per line.",
        "alpha beta gamma delta epsilon zeta eta theta",
    ];
    let args = |p: &str| json!({"messages": user(p), "max_tokens": 10, "temperature": 0});
    let solo: Vec<Value> = prompts.iter().map(|p| s.tool("generate", args(p)).ok()["content"].clone()).collect();
    let ids: Vec<String> = prompts
        .iter()
        .map(|p| s.tool("generate_stream_start", args(p)).ok()["stream_id"].as_str().unwrap().to_string())
        .collect();
    s.tool("generate_stream_cancel", json!({"stream_id": ids[1]})).ok();
    for i in [0, 2] {
        let (text, last) = poll_stream(&mut s, &ids[i], Duration::from_millis(20));
        assert_eq!(last["full_content"].as_str().unwrap(), text);
        assert!(last.get("error").is_none(), "{last}");
        assert_eq!(last["full_content"], solo[i], "stream {i} changed by batching with others or by the cancel");
    }
    assert_slots_accounted(&mut s);
    s.shutdown();
}

#[test]
fn no_slot_leaks_after_a_mix_of_work() {
    let mut s = Server::start(&[ONE_THREAD]);
    // Finished, cancelled mid-prompt, cancelled mid-reply, failed, and truncated by length.
    s.tool("generate", json!({"messages": user("Hello"), "max_tokens": 6})).ok();
    let long = "Tell me about the ocean and its tides. ".repeat(150);
    let id = s.tool("generate_stream_start", json!({"messages": user(&long), "max_tokens": 50})).ok()["stream_id"]
        .as_str()
        .unwrap()
        .to_string();
    s.tool("generate_stream_cancel", json!({"stream_id": id})).ok();
    let id = s.tool("generate_stream_start", json!({"messages": user("Write a poem."), "max_tokens": 200})).ok()["stream_id"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::sleep(Duration::from_millis(500));
    s.tool("generate_stream_cancel", json!({"stream_id": id})).ok();
    let req = s.request_tool("generate", json!({"messages": user("Write an essay."), "max_tokens": 500}));
    std::thread::sleep(Duration::from_millis(300));
    s.notify("notifications/cancelled", json!({"requestId": req}));
    s.tool("generate", json!({"messages": []})).err();
    s.tool("generate", json!({"messages": user("One more"), "max_tokens": 3})).ok();
    std::thread::sleep(Duration::from_millis(200));
    assert_slots_accounted(&mut s);
    s.shutdown();
}

#[test]
fn generation_at_the_end_of_the_context_stops_with_length() {
    let mut s = Server::start(&[ONE_THREAD, ("ELPIS_MODEL_CONTEXT_LENGTH", "256"), ("ELPIS_MODEL_MAX_TOKENS", "256")]);
    let prompt = "Keep writing words forever. ".repeat(30);
    let out = s.tool("generate", json!({"messages": user(&prompt), "max_tokens": 256, "temperature": 1.0})).ok();
    let usage = &out["usage"];
    let total = usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap();
    // The last sampled token needs no cell: at most context + 1.
    assert!(total <= 257, "{out}");
    if out["finish_reason"] == "length" {
        assert!(total >= 250, "stopped early: {out}");
    }
    assert_slots_accounted(&mut s);
    s.shutdown();
}

#[test]
fn sliding_window_without_full_cache_never_reuses_a_cut_prefix() {
    // Gemma 3 has sliding-window layers; with swa_full off, llama.cpp cannot
    // cut a cached sequence in the middle, so the engine must start over.
    let mut s = Server::start(&[ONE_THREAD, ("ELPIS_MODEL_SWA_FULL", "false")]);
    let first = json!({"messages": conversation(3, ECHO), "max_tokens": 12, "temperature": 0});
    s.tool("generate", first).ok();
    let grown = json!({"messages": conversation(4, ECHO), "max_tokens": 12, "temperature": 0});
    let out = s.tool("generate", grown.clone()).ok();
    assert_eq!(out["usage"]["cached_tokens"], 0, "a cut prefix was reused on a sliding-window cache: {out}");
    assert_slots_accounted(&mut s);
    s.shutdown();
    let mut fresh = Server::start(&[ONE_THREAD, ("ELPIS_MODEL_SWA_FULL", "false")]);
    let cold = fresh.tool("generate", grown).ok();
    assert_eq!(cold["content"], out["content"]);
    fresh.shutdown();
}
