//! The generation controls through the real binary: stop strings across
//! tokens and streamed pieces, per-request sampling and seeds, JSON replies
//! that validate, tool calls from a stream on the instruct model, timings
//! that add up, the metrics resource, and bad values refused with nothing
//! changed.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ONE_THREAD: (&str, &str) = ("ELPIS_MODEL_N_THREADS", "1");

fn progress_pieces(s: &Server, token: &str) -> Vec<String> {
    s.notifications()
        .into_iter()
        .filter(|n| n["method"] == "notifications/progress" && n["params"]["progressToken"] == token)
        .map(|n| n["params"]["message"].as_str().unwrap_or("").to_string())
        .collect()
}

fn generate_with_progress(s: &mut Server, args: Value, token: &str) -> (Value, Vec<String>) {
    let id = s.request("tools/call", json!({"name": "generate", "arguments": args, "_meta": {"progressToken": token}}));
    let out = parse_tool_response(&s.wait(&id)).ok();
    (out, progress_pieces(s, token))
}

/// A stop string made of the end of one token's text and the start of the
/// next (seen in the progress pieces of the same reply): the reply ends
/// before it, says which stop ended it, and no piece of it ever showed.
#[test]
fn a_stop_string_across_tokens_ends_the_reply_and_never_shows() {
    let mut s = Server::start(&[ONE_THREAD]);
    let args = json!({"messages": user("Write a story about a red fox in the snow."), "max_tokens": 48, "temperature": 0});
    // Twice: the second and the runs below start from the same cache state.
    s.tool("generate", args.clone()).ok();
    let (plain, pieces) = generate_with_progress(&mut s, args.clone(), "plain");
    let text = plain["content"].as_str().unwrap().to_string();
    assert_eq!(pieces.concat(), text);
    // Two neighbouring pieces with text: the stop straddles their boundary.
    let at = (1..pieces.len() - 1)
        .find(|&i| pieces[i].chars().count() >= 2 && !pieces[i + 1].trim().is_empty())
        .unwrap_or_else(|| panic!("no two pieces to straddle: {pieces:?}"));
    let tail: String = pieces[at].chars().rev().take(2).collect::<Vec<_>>().into_iter().rev().collect();
    let head: String = pieces[at + 1].chars().take(2).collect();
    let stop = format!("{tail}{head}");
    let before: String = pieces[..at].concat() + &pieces[at][..pieces[at].len() - tail.len()];
    let cut = text.find(&stop).unwrap();
    assert!(cut <= before.len());
    let mut stopped_args = args.clone();
    stopped_args["stop"] = json!(["never-written-xyz", stop]);
    let (out, pieces) = generate_with_progress(&mut s, stopped_args.clone(), "stopped");
    assert_eq!(out["content"].as_str().unwrap(), &text[..cut], "{out}");
    assert_eq!((out["finish_reason"].clone(), out["stop_sequence"].clone()), (json!("stop"), json!(stop)), "{out}");
    assert_eq!(pieces.concat(), text[..cut], "progress showed exactly the text before the stop");
    // A stream reads the same, piece by piece, and never more.
    let start = s.tool("generate_stream_start", stopped_args).ok();
    let (streamed, last) = poll_stream(&mut s, start["stream_id"].as_str().unwrap(), Duration::from_millis(10));
    assert_eq!(streamed, &text[..cut]);
    assert_eq!(last["full_content"].as_str().unwrap(), streamed);
    assert_eq!(last["stop_sequence"], json!(stop), "{last}");
    s.shutdown();
}

/// The same seed and settings on the same prompt from the same cache
/// state write the same sampled reply; explicit values are reported as used.
#[test]
fn seeds_reproduce_and_explicit_sampling_wins() {
    let mut s = Server::start(&[ONE_THREAD]);
    let args = json!({"messages": user("Describe the sea."), "max_tokens": 32, "temperature": 0.9, "seed": 424242,
        "top_p": 0.8, "top_k": 20, "min_p": 0.02, "repeat_penalty": 1.05, "presence_penalty": 0.4, "frequency_penalty": 0.2});
    s.tool("generate", args.clone()).ok();
    let a = s.tool("generate", args.clone()).ok();
    let b = s.tool("generate", args.clone()).ok();
    assert_eq!(a["content"], b["content"], "same seed, same settings, same prompt");
    let used = &a["modulated_params"];
    assert_eq!(
        (used["temperature"].clone(), used["top_p"].clone(), used["top_k"].clone(), used["seed"].clone()),
        (json!(0.9), json!(0.8), json!(20), json!(424242)),
        "{used}"
    );
    assert_eq!((used["presence_penalty"].clone(), used["frequency_penalty"].clone()), (json!(0.4), json!(0.2)));
    // Without a seed a fresh one is drawn, and reported so it can be reused.
    let drawn = s.tool("generate", json!({"messages": user("Hi"), "max_tokens": 2})).ok();
    assert!(drawn["modulated_params"]["seed"].is_u64(), "{drawn}");
    s.shutdown();
}

/// Check a value against the subset of JSON schema used below.
fn valid(value: &Value, schema: &Value) -> bool {
    match schema["type"].as_str() {
        Some("object") => {
            let Some(obj) = value.as_object() else { return false };
            let required = schema["required"].as_array().cloned().unwrap_or_default();
            let closed = schema["additionalProperties"] == false;
            required.iter().all(|k| obj.contains_key(k.as_str().unwrap()))
                && obj.iter().all(|(k, v)| match schema["properties"].get(k) {
                    Some(sub) => valid(v, sub),
                    None => !closed,
                })
        }
        Some("string") => value.as_str().is_some_and(|s| schema["maxLength"].as_u64().is_none_or(|m| s.chars().count() as u64 <= m)),
        Some("integer") => value.as_i64().is_some_and(|n| {
            schema["minimum"].as_i64().is_none_or(|m| n >= m) && schema["maximum"].as_i64().is_none_or(|m| n <= m)
        }),
        Some("boolean") => value.is_boolean(),
        Some("array") => value.as_array().is_some_and(|a| {
            schema["maxItems"].as_u64().is_none_or(|m| a.len() as u64 <= m) && a.iter().all(|v| valid(v, &schema["items"]))
        }),
        _ => true,
    }
}

/// A JSON reply validates against its schema (every string and array
/// bounded, so the grammar completes it within the limit whatever the
/// model picks); cut by the token limit, it says so.
#[test]
fn json_replies_validate_or_say_why_not() {
    let mut s = Server::start(&[ONE_THREAD]);
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "alive": {"type": "boolean"}},
        "required": ["name", "age", "tags", "alive"], "additionalProperties": false});
    for temperature in [0.0, 1.0] {
        let out = s
            .tool("generate", json!({"messages": user("Describe a person."), "max_tokens": 200, "temperature": temperature,
                "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}}))
            .ok();
        assert!(out.get("parse_error").is_none(), "{out}");
        let value: Value = serde_json::from_str(out["content"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert!(valid(&value, &schema), "{value} does not validate against {schema}");
    }
    let object = s.tool("generate", json!({"messages": user("Anything."), "max_tokens": 200, "temperature": 0,
        "response_format": {"type": "json_object"}})).ok();
    if object["finish_reason"] == "stop" {
        let value: Value = serde_json::from_str(object["content"].as_str().unwrap()).unwrap();
        assert!(value.is_object(), "{object}");
    } else {
        assert!(object["parse_error"].as_str().unwrap().contains("token limit"), "{object}");
    }
    let cut = s.tool("generate", json!({"messages": user("Describe a person."), "max_tokens": 3, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})).ok();
    assert_eq!(cut["finish_reason"], "length", "{cut}");
    assert!(cut["parse_error"].as_str().unwrap().contains("hit the token limit (3 tokens)"), "{cut}");
    s.shutdown();
}

/// Bad values get a clear error naming them, and change nothing.
#[test]
fn bad_controls_are_refused_and_change_nothing() {
    let mut s = Server::start(&[ONE_THREAD]);
    let cases = [
        (json!({"stop": [""]}), "stop[0] is empty"),
        (json!({"stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}), "at most 8"),
        (json!({"presence_penalty": -0.5}), "presence_penalty"),
        (json!({"frequency_penalty": 7}), "frequency_penalty"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_k": -2}), "top_k"),
        (json!({"seed": -1}), "seed"),
        (json!({"top_p": "high"}), "top_p"),
        (json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 7}}}), "must be a JSON schema object"),
        (json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": true}}}}), "uniqueItems"),
        (json!({"response_format": {"type": "xml"}}), "response_format"),
        (json!({"prediction": {"content": "x"}}), "prediction"),
        (json!({"top_logprobs": 99}), "top_logprobs"),
        (json!({"tool_choice": "required"}), "tool_choice needs tools"),
    ];
    for (extra, word) in cases {
        let mut args = json!({"messages": user("x"), "max_tokens": 4});
        args.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        for tool in ["generate", "generate_stream_start"] {
            let err = s.tool(tool, args.clone()).err();
            assert!(err.contains(word), "{tool} {extra}: {err}");
        }
    }
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert_eq!((caps["active_streams"].clone(), caps["active_generations"].clone(), caps["queued_generations"].clone()), (json!(0), json!(0), json!(0)));
    let read = s.call("resources/read", json!({"uri": "elpis://metrics"}));
    let metrics: Value = serde_json::from_str(read["contents"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(metrics["generations"], 0, "refused requests are never queued: {metrics}");
    s.shutdown();
}

/// Timings add up, and the metrics count what ran.
#[test]
fn timings_add_up_and_metrics_count() {
    let mut s = Server::start(&[ONE_THREAD]);
    let out = s.tool("generate", greedy_args("Tell me about rivers.", 16)).ok();
    let t = &out["timings"];
    let f = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("no {k}: {t}"));
    assert!((f("queue_ms") + f("prompt_ms") + f("reply_ms") - f("total_ms")).abs() < 1e-6, "{t}");
    assert!((f("queue_ms") + f("prompt_ms") - f("time_to_first_token_ms")).abs() < 1e-6, "{t}");
    let usage = &out["usage"];
    assert_eq!(t["reply_tokens"], usage["completion_tokens"]);
    assert_eq!(
        t["prompt_computed_tokens"].as_u64().unwrap() + t["prompt_cached_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap(),
        "{out}"
    );
    let stream = s.tool("generate_stream_start", greedy_args("Name two birds.", 8)).ok();
    let (_, last) = poll_stream(&mut s, stream["stream_id"].as_str().unwrap(), Duration::from_millis(20));
    assert!(last["timings"]["total_ms"].as_f64().unwrap() >= last["timings"]["reply_ms"].as_f64().unwrap(), "{last}");
    let read = s.call("resources/read", json!({"uri": "elpis://metrics"}));
    assert_eq!(read["contents"][0]["mimeType"], "application/json");
    let m: Value = serde_json::from_str(read["contents"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!((m["generations"].clone(), m["finished"].clone()), (json!(2), json!(2)), "{m}");
    let tokens = usage["completion_tokens"].as_u64().unwrap() + last["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(m["completion_tokens"], tokens, "{m}");
    assert_eq!(m["busy_slots"], 0, "{m}");
    assert!(m["kv_cells_in_use"].as_u64().unwrap() > 0, "{m}");
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert!(caps["resources"].as_array().unwrap().contains(&json!("elpis://metrics")), "{caps}");
    s.shutdown();
}

/// On the instruct model, a stream given tools streams its words and
/// never the call's markup; the completing read carries the calls as
/// function_call returns them.
#[test]
fn tool_calls_from_a_stream_on_the_instruct_model() {
    let qwen = instruct_model_path("qwen");
    let mut s = Server::start(&[ONE_THREAD, ("ELPIS_MODEL_PATH", qwen.as_str())]);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}}]);
    let args = json!({"messages": user("What's the weather in Paris?"), "max_tokens": 120, "temperature": 0,
        "tools": tools, "tool_choice": "required"});
    let start = s.tool("generate_stream_start", args.clone()).ok();
    let (streamed, last) = poll_stream(&mut s, start["stream_id"].as_str().unwrap(), Duration::from_millis(20));
    assert_eq!(last["full_content"].as_str().unwrap(), streamed);
    for marker in ["<tool_call>", "\"name\"", "get_weather", "{"] {
        assert!(!streamed.contains(marker), "call markup streamed as text: {streamed:?}");
    }
    let calls = last["tool_calls"].as_array().unwrap_or_else(|| panic!("no tool_calls: {last}"));
    assert_eq!(calls.len(), 1, "{last}");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let arguments: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    // function_call reads calls the same way (its shape is the same).
    let fc = s.tool("function_call", json!({"messages": user("What's the weather in Paris?"), "tools": tools,
        "tool_choice": "required", "temperature": 0})).ok();
    assert_eq!(fc["tool_calls"][0]["function"]["name"], calls[0]["function"]["name"], "{fc}");
    assert_eq!(fc["tool_calls"][0]["type"], calls[0]["type"], "{fc}");
    // generate with tools: the same reading, and progress without the markup.
    let (out, pieces) = generate_with_progress(&mut s, args, "tools");
    assert_eq!(out["tool_calls"][0]["function"]["name"], "get_weather", "{out}");
    assert!(!pieces.concat().contains("<tool_call>"), "{pieces:?}");
    s.shutdown();
}
