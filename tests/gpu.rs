//! The GPU path on a real device backend: a `--features vulkan` build on
//! Mesa's lavapipe (a Vulkan device that runs on the CPU, which ggml uses
//! only when `GGML_VK_VISIBLE_DEVICES` names it), every layer offloaded.
//! ggml's device path runs for real: device buffers, host-device copies,
//! the KV cache and control vectors on the device, and a backend that never
//! calls the abort callback (requests are answered between steps only).
//!
//! lavapipe is slow (SmolLM2 reads a few tokens a second there), so replies
//! are a few tokens long. `scripts/test.sh` builds the Vulkan feature and
//! runs these on lavapipe from Mesa 25 (`scripts/lavapipe.sh`: Debian 12's
//! Mesa 22.3 crashes now and then inside its own queue thread, a double
//! free there while the engine waits on a fence). On a CPU build this file
//! compiles to nothing.

#![cfg(feature = "vulkan")]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{agree_or_near_tie, compared_args, instruct_model_path, poll_stream, top_two, user, Server};
use serde_json::{json, Value};

/// What every server here runs with: SmolLM2 (the smallest test model),
/// lavapipe visible, two threads (the host side of a device step).
fn gpu_env(model: &str, layers: &str) -> Vec<(String, String)> {
    [
        ("ELPIS_MODEL_PATH", model),
        ("GGML_VK_VISIBLE_DEVICES", "0"),
        ("ELPIS_MODEL_GPU_LAYERS", layers),
        ("ELPIS_MODEL_N_THREADS", "2"),
        ("ELPIS_MODEL_PARALLEL", "2"),
        ("ELPIS_MODEL_CONTEXT_LENGTH", "1024"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn start(extra: &[(&str, &str)], layers: &str) -> Server {
    let model = instruct_model_path("smollm2");
    let mut env = gpu_env(&model, layers);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start(&env)
}

fn greedy(server: &mut Server, text: &str, max_tokens: u32) -> Value {
    server
        .tool("generate", compared_args(user(text), max_tokens))
        .ok()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("elpis-gpu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every item on one device server, for lavapipe compiles its shaders
/// again in every process (half a minute): the layers and devices
/// reported, a greedy reply (compared with the CPU's at the end), streams
/// with quick calls and a cancel, a function call, speculative decoding,
/// and a prompt cache saved there and restored by the next server.
/// (Steering has its own test.)
#[test]
fn the_device_path_serves_everything_psyche_uses() {
    let cache = temp_dir("cache");
    let cache_s = cache.display().to_string();
    let env = [
        ("ELPIS_CACHE_DIR", cache_s.as_str()),
        ("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB", "64"),
        // Always: whether a draft pays depends on the device's cost curve
        // (lavapipe 25 priced them all out); that drafts verify on it does not.
        ("ELPIS_MODEL_SPECULATIVE", "always"),
    ];
    let mut s = start(&env, "auto");

    // Layers and devices.
    let caps = s.tool("get_capabilities", json!({})).ok();
    let g = &caps["gpu"];
    assert_eq!(g["backend"], "Vulkan", "{caps}");
    let device = &g["devices"][0];
    assert!(device["name"].as_str().unwrap().starts_with("Vulkan"), "{g}");
    assert!(device["total_bytes"].as_u64().unwrap() > 0 && device["kind"].is_string(), "{g}");
    // SmolLM2-135M: 30 blocks and the output layer, all on the device.
    assert_eq!((g["offloaded_layers"].as_u64(), g["total_layers"].as_u64()), (Some(31), Some(31)), "{g}");
    assert_eq!((caps["gpu_layers"].as_u64(), caps["gpu_offload_supported"].as_bool()), (Some(31), Some(true)), "{caps}");
    let question = "What is the capital of France?";
    let on_device = greedy(&mut s, question, 4);

    streams_with_quick_calls_and_a_cancel(&mut s);
    a_function_call(&mut s);
    speculative_decoding_writes_the_reply_without_drafts(&mut s);
    let system: String = (0..12).map(|i| format!("Rule {i}: answer kindly and briefly. ")).collect();
    let ask = |s: &mut Server, text: &str| {
        let messages = json!([{"role": "system", "content": system}, {"role": "user", "content": text}]);
        s.tool("generate", json!({"messages": messages, "max_tokens": 1, "temperature": 0})).ok()
    };
    // Cold: at most the template's opening is shared with earlier requests.
    let cold = ask(&mut s, "Hello.");
    assert!(cold["usage"]["cached_tokens"].as_u64().unwrap() < cold["usage"]["prompt_tokens"].as_u64().unwrap() / 2, "{cold}");
    s.shutdown();

    // The saved prompt, read from disk into the device's KV cache.
    let mut again = start(&env, "auto");
    let warm = ask(&mut again, "Good morning.");
    let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(warm["usage"]["cached_tokens"].as_u64().unwrap() > prompt / 2, "the system prompt came from disk: {warm}");
    again.shutdown();

    // The same build with every layer on the CPU: the same greedy reply,
    // but where the two best tokens were a near-tie.
    let mut cpu = start(&env, "0");
    let caps = cpu.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["gpu"]["offloaded_layers"], 0, "{caps}");
    let on_cpu = greedy(&mut cpu, question, 4);
    cpu.shutdown();
    agree_or_near_tie(&on_cpu, &on_device);
    let _ = std::fs::remove_dir_all(&cache);
}

fn streams_with_quick_calls_and_a_cancel(s: &mut Server) {
    // Two streams at once on two slots; quick calls between their steps.
    let a = s.tool("generate_stream_start", json!({"messages": user("Count to five."), "max_tokens": 3, "temperature": 0})).ok();
    let b = s.tool("generate_stream_start", json!({"messages": user("Name a colour."), "max_tokens": 200, "temperature": 0})).ok();
    let (a_id, b_id) = (a["stream_id"].as_str().unwrap().to_string(), b["stream_id"].as_str().unwrap().to_string());
    for _ in 0..3 {
        let mood = s.tool("get_emotion", json!({})).ok();
        assert!(mood["valence"].is_number(), "{mood}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The long one is cancelled once it has written something.
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while std::time::Instant::now() < deadline {
        let read = s.tool("generate_stream_read", json!({"stream_id": b_id})).ok();
        seen.push_str(read["new_content"].as_str().unwrap_or(""));
        assert_ne!(read["is_complete"], true, "200 tokens before a cancel: {read}");
        if !seen.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!seen.is_empty(), "the stream wrote nothing in five minutes");
    let cancelled = s.tool("generate_stream_cancel", json!({"stream_id": b_id})).ok();
    assert!(cancelled.get("error").is_none(), "{cancelled}");
    let (text, last) = poll_stream(s, &a_id, Duration::from_millis(100));
    assert_eq!(last["is_complete"], true, "{last}");
    assert!(!text.is_empty(), "{last}");
}

fn a_function_call(s: &mut Server) {
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}]);
    let out = s
        .tool("function_call", json!({"messages": user("What is the weather in Paris?"), "tools": tools, "temperature": 0}))
        .ok();
    let calls = out["tool_calls"].as_array().unwrap_or_else(|| panic!("{out}"));
    assert!(!calls.is_empty(), "{out}");
    assert_eq!(calls[0]["function"]["name"], "get_weather", "{out}");
    let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{out}");
}

/// Control vectors on the device move the model's next-token distribution.
/// A four-token greedy reply may read the same under both moods (its words
/// a near-tie apart, which the device's rounding can tip), so what is
/// compared is the first token's log-probability: opposite moods move it
/// by 0.3 here, on the CPU and on lavapipe alike, while the device's
/// rounding moves it by 0.02 and no mood change at all by nothing.
#[test]
fn steering_on_the_device_moves_the_reply() {
    // The vectors are the model's, whatever runs it: computed on the CPU.
    let model = instruct_model_path("smollm2");
    let vectors = temp_dir("vectors");
    let out = common::server_command()
        .arg("vectors")
        .env("ELPIS_MODEL_PATH", &model)
        .env("ELPIS_EMOTION_VECTORS_PATH", &vectors)
        .env("ELPIS_MODEL_N_THREADS", "2")
        .env("ELPIS_MODEL_GPU_LAYERS", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "vectors failed: {}", String::from_utf8_lossy(&out.stderr));
    let vectors_s = vectors.display().to_string();
    let mut s = start(&[("ELPIS_EMOTION_STEERING", "auto"), ("ELPIS_EMOTION_VECTORS_PATH", vectors_s.as_str())], "auto");
    assert_eq!(s.tool("get_capabilities", json!({})).ok()["steering"]["state"], "on");
    let prompt = "Describe your morning.";
    for _ in 0..3 {
        s.tool("update_emotion", json!({"event_type": "frustration", "intensity": 2.0})).ok();
    }
    let low = greedy(&mut s, prompt, 1);
    s.tool("reset_emotion", json!({})).ok();
    for _ in 0..3 {
        s.tool("update_emotion", json!({"event_type": "insight", "intensity": 2.0})).ok();
    }
    let high = greedy(&mut s, prompt, 1);
    let (a, b) = (top_two(&low)[0].clone(), top_two(&high)[0].clone());
    eprintln!("first token: {a:?} under frustration, {b:?} under insight");
    assert!(a.0 != b.0 || (a.1 - b.1).abs() > 0.1, "the mood did not move the reply on the device: {low}\n{high}");
    s.shutdown();
    let _ = std::fs::remove_dir_all(&vectors);
}

fn speculative_decoding_writes_the_reply_without_drafts(s: &mut Server) {
    let text = "alpha beta gamma delta epsilon zeta eta theta";
    let messages = user(&format!("Repeat exactly: {text}"));
    let args = |speculative: bool| {
        let mut a = compared_args(messages.clone(), 8);
        a["speculative"] = json!(speculative);
        a["prediction"] = json!({"type": "content", "content": text});
        a
    };
    let plain = s.tool("generate", args(false)).ok();
    let drafted = s.tool("generate", args(true)).ok();
    agree_or_near_tie(&plain, &drafted);
    let usage = &drafted["usage"];
    let (d, a) = (usage["draft_tokens"].as_u64().unwrap(), usage["accepted_tokens"].as_u64().unwrap());
    assert!(d > 0 && a <= d, "drafts were decoded on the device: {usage}");
}

#[test]
fn a_count_that_cannot_fit_is_a_clear_error_and_all_is_every_layer() {
    // More layers than the model has: every layer (llama.cpp's own rule).
    let mut all = start(&[], "all");
    let caps = all.tool("get_capabilities", json!({})).ok();
    let g = &caps["gpu"];
    assert_eq!((g["backend"].as_str(), g["devices"][0]["name"].as_str()), (Some("Vulkan"), Some("Vulkan0")), "{caps}");
    // SmolLM2-135M: 30 blocks and the output layer, all on the device.
    assert_eq!((g["offloaded_layers"].as_u64(), g["total_layers"].as_u64()), (Some(31), Some(31)), "{g}");
    assert_eq!((caps["gpu_layers"].as_u64(), caps["gpu_offload_supported"].as_bool()), (Some(31), Some(true)), "{caps}");
    all.shutdown();
    // Counts from what the device reports (lavapipe reports 2 GiB in Mesa
    // 22.3, the host's memory in Mesa 25): a KV cache twice the device's
    // free memory with a fixed count, a clear error at start naming the
    // sizes and the layers that would fit; and one whose single layer's keys
    // are twice what the device holds (or the most the settings allow). Never
    // an abort (llama.cpp's own fit aborts on a layer that no device buffer
    // takes: Vulkan's storage-buffer range is 128 MiB on lavapipe).
    let device = &g["devices"][0];
    let (free, total) = (device["free_bytes"].as_f64().unwrap(), device["total_bytes"].as_f64().unwrap());
    let per_token = caps["kv_bytes"].as_f64().unwrap() / (1024.0 * 2.0);
    // Keys and values for each block (the output layer holds none).
    let one_layer_keys = per_token / (2.0 * (g["total_layers"].as_f64().unwrap() - 1.0));
    let model = instruct_model_path("smollm2");
    for (tokens, expected) in [(2.0 * free / per_token, "layers would fit"), (2.0 * total / one_layer_keys, "no layers would fit")] {
        let (context, parallel) = count_of((tokens as u64).min(1 << 26));
        eprintln!("{context} tokens x {parallel}: expecting {expected:?}");
        let mut env = gpu_env(&model, "31");
        env.retain(|(k, _)| k != "ELPIS_MODEL_CONTEXT_LENGTH" && k != "ELPIS_MODEL_PARALLEL");
        env.push(("ELPIS_MODEL_CONTEXT_LENGTH".into(), context.to_string()));
        env.push(("ELPIS_MODEL_PARALLEL".into(), parallel.to_string()));
        let out = common::server_command().envs(env).args(["chat", "hi"]).stdin(std::process::Stdio::null()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.code().is_some_and(|c| c != 0), "not a clean failure (an abort?): {:?}\n{stderr}", out.status);
        assert!(stderr.contains("model.gpu_layers = 31 does not fit") && stderr.contains(expected), "{stderr}");
        assert!(stderr.contains("MiB"), "the sizes are named: {stderr}");
    }
}

/// A context length and slot count the settings accept (at most 1,048,576
/// tokens a slot, 64 slots) holding at least `tokens` tokens.
fn count_of(tokens: u64) -> (u64, u64) {
    let parallel = tokens.div_ceil(1 << 20).clamp(2, 64);
    (tokens.div_ceil(parallel).clamp(256, 1 << 20), parallel)
}

#[test]
fn the_idle_thinking_sessions_replay_on_the_device() {
    // Psyche's idle life (thoughts, interrupts, streams, mood polls), with
    // prompts and replies cut short for lavapipe's speed: the rules of
    // sessions.md hold, and every quick call is answered.
    let model = instruct_model_path("smollm2");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sessions");
    let sessions: Vec<PathBuf> = ["idle-react", "interrupt-then-stream-cancel", "mood-polling"]
        .iter()
        .map(|n| dir.join(format!("{n}.jsonl")))
        .collect();
    let out = common::server_command()
        .envs(gpu_env(&model, "auto"))
        .env("ELPIS_LOGGING_LEVEL", "warn")
        .arg("replay")
        .arg("--json")
        .args(["--max-tokens", "3", "--clip-chars", "60", "--stall-s", "240"])
        .args(&sessions)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reports: Vec<Value> = stdout.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reports.len(), sessions.len(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for r in &reports {
        eprintln!("{}: quick p99 {} ms, {} s", r["session"], r["quick_p99_ms"], r["duration_s"]);
        assert_eq!(r["violations"], json!([]), "{r}");
    }
    assert!(out.status.success());
}
