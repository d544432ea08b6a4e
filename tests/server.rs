//! Every tool and resource of wire.md, against the real `elpis-server` binary
//! and the real test model, over stdio as Psyche speaks it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn assert_emotional_state(v: &Value) {
    for key in ["valence", "arousal", "quadrant", "last_update", "update_count", "baseline", "steering_coefficients", "trajectory"] {
        assert!(v.get(key).is_some(), "emotional state lacks {key}: {v}");
    }
    let valence = v["valence"].as_f64().unwrap();
    assert!((-1.0..=1.0).contains(&valence));
    assert!(["excited", "frustrated", "calm", "depleted"].contains(&v["quadrant"].as_str().unwrap()));
}

#[test]
fn tools_list_has_all_nine_with_schemas() {
    let mut s = Server::start(&[]);
    let result = s.call("tools/list", json!({}));
    let tools = result["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    for name in TOOL_NAMES {
        assert!(names.contains(&name), "missing tool {name}: {names:?}");
    }
    assert_eq!(tools.len(), 9);
    for t in tools {
        assert_eq!(t["inputSchema"]["type"], "object", "{t}");
    }
    let generate = tools.iter().find(|t| t["name"] == "generate").unwrap();
    assert_eq!(generate["inputSchema"]["required"], json!(["messages"]));
    // Schemas a model can fill: plain types, defaults and ranges stated.
    let props = &generate["inputSchema"]["properties"];
    assert_eq!(props["max_tokens"]["type"], "integer", "{props}");
    assert_eq!((props["max_tokens"]["default"].clone(), props["max_tokens"]["minimum"].clone()), (json!(2048), json!(1)));
    assert_eq!((props["temperature"]["minimum"].as_f64(), props["temperature"]["maximum"].as_f64()), (Some(0.0), Some(2.0)));
    assert_eq!(props["emotional_modulation"]["default"], true);
    let text = result.to_string();
    assert!(!text.contains("\"null\"") && !text.contains("int64") && !text.contains("\"default\":null"), "{text}");
    let update = tools.iter().find(|t| t["name"] == "update_emotion").unwrap();
    let intensity = &update["inputSchema"]["properties"]["intensity"];
    assert_eq!((intensity["minimum"].as_f64(), intensity["maximum"].as_f64(), intensity["default"].as_f64()), (Some(0.0), Some(2.0), Some(1.0)));
    assert!(update["inputSchema"]["properties"]["event_type"]["examples"].as_array().unwrap().contains(&json!("success")));
    // Titles, annotations and an output schema on every tool.
    for t in tools {
        assert!(t["title"].is_string(), "{t}");
        assert_eq!(t["outputSchema"]["type"], "object", "{t}");
        let read_only = ["get_emotion", "get_capabilities", "generate_stream_read"].contains(&t["name"].as_str().unwrap());
        assert_eq!(t["annotations"]["readOnlyHint"], read_only, "{t}");
    }
    // Structured content: the same object as the text block.
    let id = s.request_tool("get_emotion", json!({}));
    let response = s.wait(&id);
    let text: Value = serde_json::from_str(response["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(response["result"]["structuredContent"], text);
    s.shutdown();
}

#[test]
fn capabilities_describe_the_model() {
    let mut s = Server::start(&[]);
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["backend"], "llama-cpp");
    assert_eq!(caps["context_length"], 4096);
    assert_eq!(caps["max_tokens"], 2048);
    assert!(caps["model_path"].as_str().unwrap().ends_with(".gguf"));
    assert_eq!(caps["temperature"], 0.7);
    assert_eq!(caps["top_p"], 0.9);
    assert_eq!(caps["architecture"], "gemma3");
    assert_eq!(caps["chat_format"], "gemma");
    // The CPU features the loaded ggml uses (issue 30: a native build).
    let features: Vec<&str> = caps["cpu_features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(!features.is_empty(), "{caps}");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        assert!(features.contains(&"AVX2"), "a build for this CPU uses its AVX2: {features:?}");
    }
    assert_eq!(caps["active_streams"], 0);
    s.shutdown();
}

/// Q5_0 matrices held as Q8_0 (`model.wide_weights`, on by default where
/// every layer is on the CPU) are the same weights: greedy replies agree
/// with the file's own types token for token, or part only at a near-tie
/// (the two kernels add in different orders).
#[test]
fn wide_weights_answer_as_the_file_does() {
    let ask = |s: &mut Server, text: &str| {
        s.tool("generate", compared_args(user(text), 24)).ok()
    };
    let prompts = ["The capital of France is", "def fibonacci(n):"];
    let mut wide = Server::start(&[]);
    let matrices = wide.tool("get_capabilities", json!({})).ok()["wide_weights"].as_u64().unwrap();
    let widened: Vec<Value> = prompts.iter().map(|p| ask(&mut wide, p)).collect();
    wide.shutdown();
    let mut plain = Server::start(&[("ELPIS_MODEL_WIDE_WEIGHTS", "false")]);
    assert_eq!(plain.tool("get_capabilities", json!({})).ok()["wide_weights"], 0, "off: the file's own types");
    let own: Vec<Value> = prompts.iter().map(|p| ask(&mut plain, p)).collect();
    plain.shutdown();
    if matrices == 0 {
        // The copy needs disk (and memory) to spare; without it the file is
        // loaded as it is, which the server logs.
        eprintln!("no room for the widened copy on this machine: both servers read the file's own types");
    } else {
        assert_eq!(matrices, 81, "Gemma 3 270M Q4_K_M: its Q5_0 matrices, not the token embeddings");
    }
    for (a, b) in own.iter().zip(&widened) {
        agree_or_near_tie(a, b);
    }
}

/// Weights read into memory advised for 2 MiB pages (`model.huge_pages`, on
/// by default where every layer is on the CPU and the kernel offers
/// transparent huge pages) are the weights the mapped file holds: greedy
/// replies agree (or part only at a near-tie: drafts are sized by measured
/// step times, so the two servers may batch differently), and only the
/// server that maps its weights has a model file among its mappings.
#[cfg(target_os = "linux")]
#[test]
fn weights_in_huge_pages_answer_as_the_mapped_file_does() {
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let offered = thp.contains("[always]") || thp.contains("[madvise]");
    let ask = |s: &mut Server, text: &str| s.tool("generate", compared_args(user(text), 24)).ok();
    let prompts = ["The capital of France is", "def fibonacci(n):"];
    let mapped_weights = |maps: &str| maps.lines().any(|l| l.trim_end().ends_with(".gguf"));

    let mut huge = Server::start(&[]);
    let caps = huge.tool("get_capabilities", json!({})).ok();
    let advised = caps["huge_pages"]["advised_bytes"].as_u64().unwrap();
    if offered {
        let size = caps["model_size_bytes"].as_u64().unwrap();
        assert!(advised >= size / 10 * 9, "the weights' buffers are advised: {advised} of {size} bytes");
        assert!(!mapped_weights(&huge.maps()), "the weights are read, not mapped:\n{}", huge.maps());
    } else {
        eprintln!("this kernel offers no transparent huge pages ({thp:?}): both servers map the file");
        assert_eq!(advised, 0);
    }
    let in_huge_pages: Vec<Value> = prompts.iter().map(|p| ask(&mut huge, p)).collect();
    huge.shutdown();

    let mut plain = Server::start(&[("ELPIS_MODEL_HUGE_PAGES", "false")]);
    let caps = plain.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["huge_pages"]["advised_bytes"], 0, "off: {caps}");
    assert!(mapped_weights(&plain.maps()), "off: the weights are mapped from the file");
    let mapped: Vec<Value> = prompts.iter().map(|p| ask(&mut plain, p)).collect();
    plain.shutdown();
    for (a, b) in mapped.iter().zip(&in_huge_pages) {
        agree_or_near_tie(a, b);
    }
}

/// Compute threads held one to a CPU: with `on`, two threads are each held
/// on their own CPU of those the server may use (one CPU twice where there
/// is one) and `get_capabilities` names them; with `off`, none is held.
#[cfg(target_os = "linux")]
#[test]
fn compute_threads_are_held_one_to_a_cpu() {
    // The server inherits this process's CPUs.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = cpu_list(status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim());
    let threads = [("ELPIS_MODEL_N_THREADS", "2")];
    let mut on = Server::start(&[threads[0], ("ELPIS_MODEL_PIN_THREADS", "on")]);
    let expected = vec![allowed[0], allowed[1 % allowed.len()]];
    let caps = on.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["pinned_cpus"], json!(expected), "{caps}");
    // ggml makes and holds its threads at the first step.
    on.tool("generate", greedy_args("Hello", 4)).ok();
    let lists: Vec<Vec<usize>> = on.thread_cpu_lists().iter().map(|l| cpu_list(l)).collect();
    for cpu in &expected {
        assert!(lists.contains(&vec![*cpu]), "no thread held on CPU {cpu} alone: {lists:?}");
    }
    on.shutdown();
    let mut off = Server::start(&[threads[0], ("ELPIS_MODEL_PIN_THREADS", "off")]);
    assert_eq!(off.tool("get_capabilities", json!({})).ok()["pinned_cpus"], json!([]));
    off.tool("generate", greedy_args("Hello", 4)).ok();
    for list in off.thread_cpu_lists() {
        assert_eq!(cpu_list(&list), allowed, "off: every thread may run on every CPU");
    }
    off.shutdown();
}

#[test]
fn emotion_tools_and_resources() {
    let mut s = Server::start(&[]);
    let state = s.tool("get_emotion", json!({})).ok();
    assert_emotional_state(&state);
    assert_eq!(state["update_count"], 0);

    let after = s.tool("update_emotion", json!({"event_type": "success", "intensity": 1.0, "context": "test"})).ok();
    assert_emotional_state(&after);
    assert_eq!(after["update_count"], 1);
    assert!(after["valence"].as_f64().unwrap() > 0.15, "{after}");
    assert_eq!(after["quadrant"], "excited");

    let blocked = s.tool("update_emotion", json!({"event_type": "blocked", "intensity": 5})).ok();
    assert!(blocked["valence"].as_f64().unwrap() < 0.0, "intensity clamps to 2: {blocked}");
    let unknown = s.tool("update_emotion", json!({"event_type": "mystery"})).ok();
    assert_eq!(unknown["update_count"], 3);

    let reset = s.tool("reset_emotion", json!({})).ok();
    assert_eq!((reset["valence"].as_f64(), reset["arousal"].as_f64()), (Some(0.0), Some(0.0)));
    assert_eq!(reset["update_count"], 3);

    let err = s.tool("update_emotion", json!({"intensity": 1.0})).err();
    assert!(err.contains("event_type"), "{err}");
    let err = s.tool("update_emotion", json!({"event_type": "success", "intensity": "NaN"})).err();
    assert!(err.contains("intensity"), "{err}");

    let list = s.call("resources/list", json!({}));
    let uris: Vec<&str> = list["resources"].as_array().unwrap().iter().map(|r| r["uri"].as_str().unwrap()).collect();
    assert_eq!(uris, vec!["emotion://state", "emotion://events", "elpis://metrics"]);
    let read = s.call("resources/read", json!({"uri": "emotion://state"}));
    let contents = &read["contents"][0];
    assert_eq!(contents["mimeType"], "application/json");
    assert_emotional_state(&serde_json::from_str(contents["text"].as_str().unwrap()).unwrap());
    let events = s.call("resources/read", json!({"uri": "emotion://events"}));
    let events: Value = serde_json::from_str(events["contents"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(events.as_object().unwrap().len(), 15);
    assert_eq!(events["blocked"], json!([-0.2, 0.3]));
    let id = s.request("resources/read", json!({"uri": "emotion://nothing"}));
    let response = s.wait(&id);
    assert!(response["error"]["message"].as_str().unwrap().contains("emotion://nothing"), "{response}");
    s.shutdown();
}

#[test]
fn generate_returns_content_state_and_params() {
    let mut s = Server::start(&[]);
    let out = s.tool("generate", json!({"messages": user("Write one short sentence about the sea."), "max_tokens": 24})).ok();
    assert!(out["content"].is_string());
    assert_emotional_state(&out["emotional_state"]);
    // Modulated from a neutral mood: temperature 0.7, top_p 0.9 (and the
    // rest of the sampling it used, from the config).
    let used = |out: &Value| (out["modulated_params"]["temperature"].clone(), out["modulated_params"]["top_p"].clone());
    assert_eq!(used(&out), (json!(0.7), json!(0.9)), "{out}");
    assert_eq!((out["modulated_params"]["top_k"].clone(), out["modulated_params"]["presence_penalty"].clone()), (json!(40), json!(0.0)));
    let usage = &out["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 24);
    assert!(["stop", "length"].contains(&out["finish_reason"].as_str().unwrap()));

    let explicit = s.tool("generate", json!({"messages": user("Hi"), "max_tokens": 4, "temperature": 0.3})).ok();
    assert_eq!(used(&explicit), (json!(0.3), json!(0.9)));
    let unmodulated = s
        .tool("generate", json!({"messages": user("Hi"), "max_tokens": 4, "emotional_modulation": false}))
        .ok();
    assert_eq!(used(&unmodulated), (json!(0.7), json!(0.9)));
    s.shutdown();
}

#[test]
fn greedy_generate_is_deterministic() {
    // Two fresh servers read the same short prompt in one chunk: same answer.
    let args = json!({"messages": user("List three colours."), "max_tokens": 32, "temperature": 0});
    let mut one = Server::start(&[]);
    let a = one.tool("generate", args.clone()).ok();
    assert!(!a["content"].as_str().unwrap().is_empty(), "{a}");
    // From the cache (the same state twice): the same answer again.
    let b = one.tool("generate", args.clone()).ok();
    let c = one.tool("generate", args.clone()).ok();
    assert!(b["usage"]["cached_tokens"].as_u64().unwrap() > 0, "{b}");
    assert_eq!(b["content"], c["content"]);
    one.shutdown();
    let mut two = Server::start(&[]);
    let d = two.tool("generate", args).ok();
    assert_eq!(a["content"], d["content"]);
    two.shutdown();
}

#[test]
fn generate_rejects_bad_arguments_and_keeps_serving() {
    let mut s = Server::start(&[]);
    let cases = [
        (json!({"messages": []}), "messages"),
        (json!({}), "messages"),
        (json!({"messages": "hello"}), "messages"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}), "role"),
        (json!({"messages": [{"role": "user", "content": 5}]}), "content"),
        (json!({"messages": user("x"), "max_tokens": -5}), "max_tokens"),
        (json!({"messages": user("x"), "max_tokens": 0}), "max_tokens"),
        (json!({"messages": user("x"), "max_tokens": "ten"}), "max_tokens"),
        (json!({"messages": user("x"), "temperature": 9.5}), "temperature"),
        (json!({"messages": user("x"), "temperature": "hot"}), "temperature"),
        (json!({"messages": user("x"), "emotional_modulation": "yes"}), "emotional_modulation"),
    ];
    for (args, word) in cases {
        for tool in ["generate", "generate_stream_start"] {
            let err = s.tool(tool, args.clone()).err();
            assert!(err.contains(word), "{tool} {args}: error {err:?} should name {word}");
        }
    }
    let err = s.tool("no_such_tool", json!({})).err();
    assert!(err.contains("unknown tool"), "{err}");
    // Still serving, nothing left behind.
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["active_streams"], 0);
    assert_eq!(s.tool("generate", json!({"messages": user("Hi"), "max_tokens": 2})).ok()["usage"]["completion_tokens"].as_u64().unwrap() <= 2, true);
    s.shutdown();
}

#[test]
fn prompt_longer_than_context_is_a_clear_error() {
    let mut s = Server::start(&[("ELPIS_MODEL_CONTEXT_LENGTH", "512"), ("ELPIS_MODEL_MAX_TOKENS", "256")]);
    let long = "word ".repeat(3000);
    let err = s.tool("generate", json!({"messages": user(&long)})).err();
    assert!(err.contains("context"), "{err}");
    // 10 MB of content: refused quickly, server fine.
    let huge = "x".repeat(10 * 1024 * 1024);
    let started = Instant::now();
    let err = s.tool("generate", json!({"messages": user(&huge)})).err();
    assert!(err.contains("prompt"), "{err}");
    eprintln!("10 MB prompt refused in {:?}", started.elapsed());
    let ok = s.tool("get_emotion", json!({})).ok();
    assert_emotional_state(&ok);
    s.shutdown();
}

#[test]
fn truncate_overflow_drops_old_turns() {
    let mut s = Server::start(&[
        ("ELPIS_MODEL_CONTEXT_LENGTH", "512"),
        ("ELPIS_MODEL_MAX_TOKENS", "256"),
        ("ELPIS_MODEL_OVERFLOW", "truncate"),
    ]);
    let filler = "old news ".repeat(60);
    let mut messages = vec![json!({"role": "system", "content": "You are terse."})];
    for _ in 0..6 {
        messages.push(json!({"role": "user", "content": filler}));
        messages.push(json!({"role": "assistant", "content": "ok"}));
    }
    messages.push(json!({"role": "user", "content": "Say hi."}));
    let out = s.tool("generate", json!({"messages": messages, "max_tokens": 8})).ok();
    assert_eq!(out["truncated"], true, "{out}");
    assert!(out["usage"]["prompt_tokens"].as_u64().unwrap() < 512);
    s.shutdown();
}

#[test]
fn stream_reads_concatenate_to_full_content() {
    let mut s = Server::start(&[]);
    let start = s
        .tool("generate_stream_start", greedy_args("Tell a short story about a fox.", 48))
        .ok();
    assert_eq!(start["status"], "started");
    assert_emotional_state(&start["emotional_state"]);
    let id = start["stream_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "stream_id is a UUID: {id}");
    let (text, last) = poll_stream(&mut s, &id, Duration::from_millis(50));
    assert_eq!(last["full_content"].as_str().unwrap(), text);
    assert!(last["total_tokens"].as_u64().unwrap() >= 1);
    assert!(last["total_tokens"].as_u64().unwrap() <= 48);
    assert_emotional_state(&last["emotional_state"]);
    let err = s.tool("generate_stream_read", json!({"stream_id": id})).err();
    assert!(err.contains("unknown stream_id"), "{err}");
    s.shutdown();
}

#[test]
fn stream_cancel_mid_generation_and_unknown_ids() {
    let mut s = Server::start(&[]);
    // Wait for some text, then cancel halfway; a stream that ended before
    // (a fast machine) is tried again, longer.
    let mut id = String::new();
    for max_tokens in [400, 1000, 2000] {
        let start = s
            .tool("generate_stream_start", json!({"messages": user("Count from one to one hundred."), "max_tokens": max_tokens, "temperature": 0.0}))
            .ok();
        id = start["stream_id"].as_str().unwrap().to_string();
        let deadline = Instant::now() + TIMEOUT;
        let read = loop {
            let read = s.tool("generate_stream_read", json!({"stream_id": id})).ok();
            if read["total_tokens"].as_u64().unwrap() >= 5 || read["is_complete"] == true {
                break read;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(30));
        };
        if read["is_complete"] == false {
            break;
        }
        eprintln!("the stream finished before it could be cancelled: {read}");
    }
    let cancelled = s.tool("generate_stream_cancel", json!({"stream_id": id})).ok();
    assert_eq!(cancelled, json!({"status": "cancelled", "stream_id": id}));
    assert!(s.tool("generate_stream_read", json!({"stream_id": id})).err().contains("unknown stream_id"));
    assert!(s.tool("generate_stream_cancel", json!({"stream_id": id})).err().contains("unknown stream_id"));
    assert!(s.tool("generate_stream_read", json!({"stream_id": "not-a-stream"})).err().contains("not-a-stream"));
    let err = s.tool("generate_stream_read", json!({})).err();
    assert!(err.contains("stream_id"), "{err}");
    // The engine is free again at once: a new generation completes.
    let out = s.tool("generate", json!({"messages": user("Hi"), "max_tokens": 4})).ok();
    assert!(out["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert_eq!((caps["active_streams"].as_u64(), caps["active_generations"].as_u64()), (Some(0), Some(0)));
    s.shutdown();
}

/// A quick call is answered while a stream decodes: shown when the stream
/// is still running after the answer came. A stream that ended first (a
/// fast machine) shows nothing, so the next try asks for a longer one.
#[test]
fn get_emotion_is_answered_while_a_stream_decodes() {
    let mut s = Server::start(&[]);
    let mut latencies = Vec::new();
    let mut answered_before_end = 0;
    for max_tokens in [200, 800, 2000] {
        let start = s.tool("generate_stream_start", greedy_args("Write a long essay about rivers.", max_tokens)).ok();
        let id = start["stream_id"].as_str().unwrap().to_string();
        std::thread::sleep(Duration::from_millis(200));
        for _ in 0..10 {
            let sent = Instant::now();
            let req = s.request_tool("get_emotion", json!({}));
            let (response, at) = s.wait_timed(&req, TIMEOUT);
            latencies.push((at - sent).as_secs_f64() * 1000.0);
            assert_emotional_state(&parse_tool_response(&response).ok());
            let caps = s.tool("get_capabilities", json!({})).ok();
            if caps["active_generations"] == 1 {
                answered_before_end += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (text, last) = poll_stream(&mut s, &id, Duration::from_millis(50));
        assert_eq!(last["full_content"].as_str().unwrap(), text);
        if answered_before_end > 0 {
            break;
        }
    }
    let (p50, p99) = percentiles(latencies.clone());
    eprintln!("get_emotion during a stream: p50 {p50:.1} ms, p99 {p99:.1} ms over {} calls", latencies.len());
    assert!(answered_before_end > 0, "no get_emotion answered while the stream was still decoding");
}

#[test]
fn overlapping_generations_all_complete() {
    let mut s = Server::start(&[]);
    let ids: Vec<Value> = (0..3).map(|i| s.request_tool("generate", greedy_args(&format!("Say the number {i}."), 16))).collect();
    let stream = s.tool("generate_stream_start", greedy_args("Say hello.", 16)).ok();
    let stream_id = stream["stream_id"].as_str().unwrap().to_string();
    let fc = s.request_tool(
        "function_call",
        json!({"messages": user("What's the weather in Paris?"), "tool_choice": "required", "temperature": 0, "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}}]}),
    );
    for id in &ids {
        let out = parse_tool_response(&s.wait(id)).ok();
        assert!(out["content"].is_string());
    }
    let (text, last) = poll_stream(&mut s, &stream_id, Duration::from_millis(50));
    assert_eq!(last["full_content"].as_str().unwrap(), text);
    let calls = parse_tool_response(&s.wait(&fc)).ok();
    assert_eq!(calls["tool_calls"][0]["function"]["name"], "get_weather", "{calls}");
    s.shutdown();
}

/// Check a value against the tiny subset of JSON schema used below.
fn schema_valid(value: &Value, schema: &Value) -> bool {
    match schema["type"].as_str() {
        Some("object") => {
            let Some(obj) = value.as_object() else { return false };
            let required = schema["required"].as_array().cloned().unwrap_or_default();
            required.iter().all(|k| obj.contains_key(k.as_str().unwrap()))
                && obj.iter().all(|(k, v)| schema["properties"].get(k).map_or(true, |s| schema_valid(v, s)))
        }
        Some("string") => {
            value.is_string()
                && schema.get("enum").map_or(true, |e| e.as_array().unwrap().contains(value))
        }
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some("array") => value.as_array().is_some_and(|a| a.iter().all(|v| schema_valid(v, &schema["items"]))),
        _ => true,
    }
}

/// Greedy, and every string and array bounded: the grammar then guarantees a
/// complete call within the token limit whatever the model picks (an
/// unbounded array once let a sampled reply count up to the limit).
#[test]
fn function_call_returns_schema_valid_calls() {
    let mut s = Server::start(&[]);
    let cases = [
        (
            "What is the weather in Oslo?",
            json!({"name": "get_weather", "description": "Current weather for a city",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}),
        ),
        (
            "Add 2 and 3.",
            json!({"name": "add", "description": "Add two integers",
                   "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}),
        ),
        (
            "Remind me to buy milk, urgently.",
            json!({"name": "create_reminder", "description": "Create a reminder",
                   "parameters": {"type": "object", "properties": {"text": {"type": "string", "maxLength": 60}, "urgent": {"type": "boolean"},
                                  "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}}, "required": ["text", "urgent"]}}),
        ),
    ];
    for (prompt, function) in &cases {
        let tools = json!([{"type": "function", "function": function}]);
        let out = s
            .tool("function_call", json!({"messages": user(prompt), "tools": tools, "tool_choice": "required", "temperature": 0}))
            .ok();
        assert!(out.get("parse_error").is_none(), "{out}");
        assert_emotional_state(&out["emotional_state"]);
        let calls = out["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty(), "{out}");
        for call in calls {
            assert!(call["id"].as_str().unwrap().starts_with("call_"));
            assert_eq!(call["type"], "function");
            assert_eq!(call["function"]["name"], function["name"]);
            let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert!(schema_valid(&arguments, &function["parameters"]), "{arguments} vs {}", function["parameters"]);
        }
    }
    // Two tools, auto choice: a list (possibly empty), every call to a given tool.
    let tools: Vec<Value> = cases.iter().map(|(_, f)| json!({"type": "function", "function": f})).collect();
    let out = s.tool("function_call", json!({"messages": user("Add 40 and 2."), "tools": tools, "temperature": 0})).ok();
    for call in out["tool_calls"].as_array().unwrap() {
        let name = call["function"]["name"].as_str().unwrap();
        assert!(["get_weather", "add", "create_reminder"].contains(&name));
    }
    let err = s.tool("function_call", json!({"messages": user("x"), "tools": []})).err();
    assert!(err.contains("tools"), "{err}");
    let err = s.tool("function_call", json!({"messages": user("x")})).err();
    assert!(err.contains("tools"), "{err}");
    s.shutdown();
}

/// A constrained reply that runs out of tokens inside a call is a runaway:
/// `finish_reason: "length"`, no calls, and a parse_error that says so. With
/// an 8-token limit no call to this tool can be complete, whatever the model
/// picks (the grammar forces the call's opening and requires one call).
#[test]
fn function_call_cut_by_the_token_limit_is_a_runaway() {
    let mut s = Server::start(&[("ELPIS_MODEL_MAX_TOKENS", "8")]);
    let tools = json!([{"type": "function", "function": {"name": "create_reminder",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]);
    let out = s
        .tool("function_call", json!({"messages": user("Remind me to buy milk."), "tools": tools, "tool_choice": "required", "temperature": 0}))
        .ok();
    assert_eq!(out["finish_reason"], "length", "{out}");
    assert_eq!(out["tool_calls"], json!([]), "{out}");
    assert_eq!(out["usage"]["completion_tokens"], 8, "{out}");
    let error = out["parse_error"].as_str().unwrap_or_else(|| panic!("no parse_error: {out}"));
    assert!(error.contains("hit the token limit (8 tokens) inside a call"), "{error}");
    let raw: String = out["raw_content"].as_str().unwrap().split_whitespace().collect();
    assert!(raw.starts_with("[{"), "the grammar opens a call: {out}");
    s.shutdown();
}

#[test]
fn progress_notifications_stream_generate_text() {
    let mut s = Server::start(&[]);
    let id = s.request(
        "tools/call",
        json!({"name": "generate", "arguments": {"messages": user("Describe a forest."), "max_tokens": 24, "temperature": 0},
               "_meta": {"progressToken": "tok-1"}}),
    );
    let out = parse_tool_response(&s.wait(&id)).ok();
    let progress: Vec<Value> = s
        .notifications()
        .into_iter()
        .filter(|n| n["method"] == "notifications/progress" && n["params"]["progressToken"] == "tok-1")
        .collect();
    assert!(!progress.is_empty(), "no progress notifications");
    let streamed: String = progress.iter().map(|n| n["params"]["message"].as_str().unwrap_or("")).collect();
    assert_eq!(streamed, out["content"].as_str().unwrap());
    let values: Vec<f64> = progress.iter().map(|n| n["params"]["progress"].as_f64().unwrap()).collect();
    assert!(values.windows(2).all(|w| w[1] > w[0]), "progress must increase: {values:?}");
    // Without a token: none.
    let before = s.notifications().len();
    s.tool("generate", json!({"messages": user("Hi"), "max_tokens": 4})).ok();
    assert_eq!(s.notifications().len(), before);
    s.shutdown();
}

#[test]
fn cancelled_notification_stops_an_inflight_generate() {
    let mut s = Server::start(&[]);
    let id = s.request_tool("generate", greedy_args("Write a very long poem.", 2000));
    std::thread::sleep(Duration::from_millis(400));
    s.notify("notifications/cancelled", json!({"requestId": id, "reason": "user typed"}));
    let sent = Instant::now();
    let quick = s.tool("get_emotion", json!({})).ok();
    assert_emotional_state(&quick);
    // The engine is free again: a short generate finishes quickly, not after 2000 tokens.
    let out = s.tool("generate", json!({"messages": user("Hi"), "max_tokens": 4})).ok();
    assert!(out["content"].is_string());
    eprintln!("generate after cancel answered in {:?}", sent.elapsed());
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["active_generations"], 0, "{caps}");
    s.shutdown();
}

#[test]
fn malformed_lines_get_errors_and_serving_continues() {
    let mut s = Server::start(&[]);
    s.send_line("{this is not json");
    s.send_line("[1, 2, 3]");
    s.send_line(r#"{"jsonrpc": "2.0", "id": 900, "method": "no/such/method"}"#);
    s.send_line(r#"{"jsonrpc": "2.0", "id": 901, "method": "tools/call", "params": {"name": 5}}"#);
    s.send_line(r#"{"id": 902, "hello": "world"}"#);
    let response = s.wait(&json!(900));
    assert!(response.get("error").is_some(), "{response}");
    let response = s.wait(&json!(901));
    assert!(response.get("error").is_some() || response["result"]["isError"] == true, "{response}");
    let state = s.tool("get_emotion", json!({})).ok();
    assert_emotional_state(&state);
    s.shutdown();
}

#[test]
fn stdin_closed_mid_generate_exits_zero_promptly() {
    let mut s = Server::start(&[]);
    let _id = s.request_tool("generate", greedy_args("Write a long story.", 2000));
    std::thread::sleep(Duration::from_millis(500));
    let closed = Instant::now();
    s.close_stdin();
    let status = s.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "{status:?}\n{}", s.stderr());
    eprintln!("exited {:?} after stdin closed mid-generate", closed.elapsed());
}

#[test]
fn sigterm_mid_stream_exits_zero() {
    let mut s = Server::start(&[]);
    s.tool("generate_stream_start", greedy_args("Write a long story.", 2000)).ok();
    std::thread::sleep(Duration::from_millis(300));
    s.kill_signal("TERM");
    let status = s.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "{status:?}\n{}", s.stderr());
}

#[test]
fn bad_model_paths_exit_one_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("elpis-bad-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let truncated = dir.join("truncated.gguf");
    let model = std::fs::read(model_path()).unwrap();
    std::fs::write(&truncated, &model[..model.len() / 3]).unwrap();
    let not_gguf = dir.join("notes.gguf");
    std::fs::write(&not_gguf, b"hello, I am not a model").unwrap();
    let cases = [
        ("/no/such/model.gguf".to_string(), "model file not found"),
        (dir.display().to_string(), "is a directory"),
        (not_gguf.display().to_string(), "not a GGUF file"),
        (truncated.display().to_string(), "could not load"),
    ];
    for (path, message) in cases {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_elpis-server"))
            .env("ELPIS_MODEL_PATH", &path)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{path}: {stderr}");
        assert!(stderr.contains(message), "{path}: expected {message:?} in:\n{stderr}");
        assert!(output.stdout.is_empty(), "stdout must stay clean: {:?}", String::from_utf8_lossy(&output.stdout));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_config_exits_one_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("elpis-bad-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("[model]\ncontext_length = \"huge\"\n", "context_length"),
        ("[model]\nbackend = \"transformers\"\n", "transformers"),
        ("[emotion]\ndecay_rate = -1.0\n", "emotion.decay_rate"),
    ];
    for (i, (text, message)) in cases.iter().enumerate() {
        let path = dir.join(format!("c{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_elpis-server"))
            .arg("--config")
            .arg(&path)
            .env("ELPIS_MODEL_PATH", model_path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{text}: {stderr}");
        assert!(stderr.contains(message), "expected {message:?} in:\n{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quiet_mode_logs_to_file_and_keeps_stderr_clean() {
    let home = std::env::temp_dir().join(format!("elpis-quiet-home-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let home_str = home.display().to_string();
    let mut s = Server::start(&[("ELPIS_QUIET", "1"), ("HOME", &home_str)]);
    s.tool("get_emotion", json!({})).ok();
    let stderr = s.stderr();
    s.shutdown();
    assert!(stderr.trim().is_empty(), "stderr should be empty in quiet mode: {stderr}");
    let log = std::fs::read_to_string(home.join(".elpis/elpis-server.log")).unwrap();
    assert!(log.contains("model loaded"), "{log}");
    let _ = std::fs::remove_dir_all(&home);
}

/// MCP's logging capability: nothing is sent until the client sets a level;
/// then log events at that level come as notifications/message.
#[test]
fn log_messages_reach_the_client_at_the_level_it_sets() {
    let mut s = Server::spawn_raw(&[], &[]);
    let init = s.initialize();
    assert!(init["capabilities"].get("logging").is_some(), "{init}");
    let log_messages = |s: &Server| s.notifications().into_iter().filter(|n| n["method"] == "notifications/message").collect::<Vec<_>>();
    s.tool("update_emotion", json!({"event_type": "success", "context": "before setLevel"})).ok();
    assert!(log_messages(&s).is_empty(), "{:?}", log_messages(&s));
    s.call("logging/setLevel", json!({"level": "info"}));
    s.tool("update_emotion", json!({"event_type": "success", "context": "after setLevel"})).ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = log_messages(&s).into_iter().find(|n| n["params"]["data"].as_str().is_some_and(|d| d.contains("after setLevel")));
        if let Some(n) = found {
            assert_eq!(n["params"]["level"], "info", "{n}");
            break;
        }
        assert!(Instant::now() < deadline, "no log message reached the client: {:?}", log_messages(&s));
        std::thread::sleep(Duration::from_millis(20));
    }
    s.call("logging/setLevel", json!({"level": "error"}));
    let before = log_messages(&s).len();
    s.tool("update_emotion", json!({"event_type": "success", "context": "at error level"})).ok();
    s.tool("get_emotion", json!({})).ok();
    assert!(log_messages(&s).iter().skip(before).all(|n| n["params"]["level"] != "info"));
    s.shutdown();
}
