//! Speculative decoding through the real binary, on the instruct model
//! (which copies text faithfully). The servers draft whenever a draft is
//! found (`model.speculative = "always"`), so what is drafted depends on the
//! text alone, not on this machine's speed: drafts accepted and rejected
//! (their cells removed, the reply going on as without them), a
//! grammar-constrained call, a stop string and a token limit inside a
//! draft, two slots of which one drafts, and a cancellation mid-draft.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};


/// A code snippet to copy (the project's own text: stable, ~300 tokens).
fn snippet() -> String {
    "fn common_prefix(a: &[u32], b: &[u32]) -> usize {\n    a.iter().zip(b).take_while(|(x, y)| x == y).count()\n}\n\n\
     /// The busy slot whose stream has gone unread the longest.\n\
     fn unattended_slot(slots: &[Slot], now: u64) -> Option<usize> {\n    slots\n        .iter()\n        .enumerate()\n        \
     .filter_map(|(i, s)| {\n            let idle = now.saturating_sub(s.last_read);\n            (idle > s.patience).then_some((i, idle))\n        })\n        \
     .max_by_key(|&(_, idle)| idle)\n        .map(|(i, _)| i)\n}\n"
        .to_string()
}

fn copy(text: &str) -> Value {
    json!([{"role": "system", "content": "You copy text exactly."},
           {"role": "user", "content": format!("Repeat this code exactly, and nothing else:\n```rust\n{text}```")}])
}

fn server(extra: &[(&str, &str)]) -> Server {
    let qwen = instruct_model_path("qwen");
    let mut env = vec![("ELPIS_MODEL_PATH", qwen.as_str()), ("ELPIS_MODEL_N_THREADS", "1"), ("ELPIS_MODEL_SPECULATIVE", "always")];
    env.extend_from_slice(extra);
    Server::start(&env)
}

fn assert_slots_accounted(s: &mut Server) {
    let caps = s.tool("get_capabilities", json!({})).ok();
    for slot in caps["slot_states"].as_array().unwrap() {
        assert_eq!(slot["kv_pos_max"].as_i64().unwrap(), slot["tokens"].as_i64().unwrap() - 1, "cells not accounted: {slot}");
    }
}

/// Greedy with drafts writes what greedy without them writes, but where the
/// two best tokens were a near-tie (said when it happens). A predicted
/// output that differs from the reply makes drafts fail: their cells go and
/// the reply continues as without them.
#[test]
fn drafts_hold_or_fail_and_the_reply_is_the_one_without_them() {
    let mut s = server(&[]);
    let text = snippet();
    let args = |speculative: bool, prediction: Option<String>| {
        let mut a = compared_args(copy(&text), 200);
        a["speculative"] = json!(speculative);
        if let Some(p) = prediction {
            a["prediction"] = json!({"type": "content", "content": p});
        }
        a
    };
    // Once for the cache: the runs below start from the same state.
    s.tool("generate", args(false, None)).ok();
    let plain = s.tool("generate", args(false, None)).ok();
    assert_eq!(plain["usage"]["draft_tokens"], 0, "{plain}");
    let wrong = text.replace("take_while", "skip_while").replace("saturating_sub", "wrapping_sub");
    for prediction in [None, Some(text.clone()), Some(wrong)] {
        let drafted = s.tool("generate", args(true, prediction.clone())).ok();
        let usage = &drafted["usage"];
        let (d, a) = (usage["draft_tokens"].as_u64().unwrap(), usage["accepted_tokens"].as_u64().unwrap());
        eprintln!("prediction {}: {d} draft tokens, {a} accepted, {} tokens", prediction.is_some(), usage["completion_tokens"]);
        assert!(d > 0 && a > 0 && a <= d, "{usage}");
        let (x, y) = (top_two(&plain), top_two(&drafted));
        match x.iter().zip(&y).position(|(p, q)| p.0 != q.0) {
            None => assert_eq!(plain["content"], drafted["content"]),
            Some(at) => {
                let gap = x[at].1 - x[at].2;
                eprintln!("the replies part at token {at} ({:?} vs {:?}): a near-tie, the top two {gap:.3} apart", x[at].0, y[at].0);
                assert!(gap < NEAR_TIE, "the replies part at token {at} where the model was sure ({gap:.3}): {:?} vs {:?}", x[at].0, y[at].0);
            }
        }
        assert_slots_accounted(&mut s);
    }
    // The wrong prediction proposed tokens the model did not write.
    let again = s.tool("generate", args(true, Some(text.replace("slots", "tables")))).ok();
    assert!(again["usage"]["accepted_tokens"].as_u64() < again["usage"]["draft_tokens"].as_u64(), "some drafts failed: {again}");
    assert_slots_accounted(&mut s);
    s.shutdown();
}

/// A grammar-constrained call echoing its input, with drafts.
#[test]
fn a_grammar_constrained_call_with_drafts() {
    let mut s = server(&[]);
    let tools = json!([{"type": "function", "function": {"name": "echo", "description": "Say a text back",
        "parameters": {"type": "object", "properties": {"text": {"type": "string", "maxLength": 200}}, "required": ["text"]}}}]);
    let phrase = "the quick brown fox jumps over the lazy dog near the river bank";
    let out = s
        .tool("function_call", json!({"messages": user(&format!("Call echo with exactly this text: {phrase}")),
            "tools": tools, "tool_choice": "required", "temperature": 0}))
        .ok();
    assert!(out.get("parse_error").is_none(), "{out}");
    assert_eq!(out["tool_calls"][0]["function"]["name"], "echo", "{out}");
    let arguments: Value = serde_json::from_str(out["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["text"].as_str().unwrap().contains("brown fox"), "{arguments}");
    assert!(out["usage"]["draft_tokens"].as_u64().unwrap() > 0, "no drafts: {out}");
    assert_slots_accounted(&mut s);
    s.shutdown();
}

/// A stop string and the token limit inside a draft: the reply ends exactly
/// there, and the draft's cells after it go.
#[test]
fn a_stop_and_a_token_limit_inside_a_draft() {
    let mut s = server(&[]);
    let text = snippet();
    let base = json!({"messages": copy(&text), "max_tokens": 200, "temperature": 0});
    s.tool("generate", base.clone()).ok();
    let mut stopped = base.clone();
    stopped["stop"] = json!(["take_while"]);
    let out = s.tool("generate", stopped).ok();
    assert_eq!((out["finish_reason"].clone(), out["stop_sequence"].clone()), (json!("stop"), json!("take_while")), "{out}");
    let content = out["content"].as_str().unwrap();
    assert!(content.ends_with("zip(b).") && !content.contains("take_while"), "{content:?}");
    assert!(out["usage"]["draft_tokens"].as_u64().unwrap() > 0, "{out}");
    assert_slots_accounted(&mut s);
    for limit in [1, 7, 23] {
        let mut limited = base.clone();
        limited["max_tokens"] = json!(limit);
        let out = s.tool("generate", limited).ok();
        assert_eq!((out["finish_reason"].clone(), out["usage"]["completion_tokens"].clone()), (json!("length"), json!(limit)), "{out}");
        assert_slots_accounted(&mut s);
    }
    s.shutdown();
}

/// Two streams at once, one drafting and one not: both read whole, each
/// unaffected by the other's drafts.
#[test]
fn two_slots_of_which_one_drafts_and_a_cancel_mid_draft() {
    let mut s = server(&[]);
    let text = snippet();
    let a = s.tool("generate_stream_start", json!({"messages": copy(&text), "max_tokens": 150, "temperature": 0})).ok();
    let b = s
        .tool("generate_stream_start", json!({"messages": user("Name three rivers."), "max_tokens": 40, "temperature": 0, "speculative": false}))
        .ok();
    let ids = [a["stream_id"].as_str().unwrap().to_string(), b["stream_id"].as_str().unwrap().to_string()];
    let mut texts = [String::new(), String::new()];
    let mut done: [Option<Value>; 2] = [None, None];
    let deadline = Instant::now() + TIMEOUT;
    while done.iter().any(Option::is_none) {
        for i in 0..2 {
            if done[i].is_some() {
                continue;
            }
            let r = s.tool("generate_stream_read", json!({"stream_id": ids[i]})).ok();
            texts[i].push_str(r["new_content"].as_str().unwrap());
            if r["is_complete"] == true {
                done[i] = Some(r);
            }
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let [da, db] = done.map(Option::unwrap);
    assert_eq!(da["full_content"].as_str().unwrap(), texts[0]);
    assert_eq!(db["full_content"].as_str().unwrap(), texts[1]);
    assert!(da["usage"]["draft_tokens"].as_u64().unwrap() > 0, "{da}");
    assert_eq!(db["usage"]["draft_tokens"], 0, "{db}");
    assert_slots_accounted(&mut s);
    // Cancelled while drafting: nothing left running, every cell accounted.
    let c = s.tool("generate_stream_start", json!({"messages": copy(&format!("{text}{text}")), "max_tokens": 600, "temperature": 0})).ok();
    let id = c["stream_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let r = s.tool("generate_stream_read", json!({"stream_id": id})).ok();
        if r["total_tokens"].as_u64().unwrap() >= 20 || r["is_complete"] == true {
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = s.tool("generate_stream_cancel", json!({"stream_id": id}));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let caps = s.tool("get_capabilities", json!({})).ok();
        if caps["active_generations"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{caps}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_slots_accounted(&mut s);
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["speculative"]["mode"], "always", "{caps}");
    s.shutdown();
}
