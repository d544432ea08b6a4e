//! `elpis-server bench`: the numbers behind the scheduler's targets, measured
//! in one run on one machine and the configured model (the default model
//! unless ELPIS_MODEL_PATH says otherwise): the raw llama-cpp-2 floor against
//! the server over stdio, quick-call latency while decoding and during a long
//! prefill, a prompt read beside a decoding stream, cold vs grown-prompt time
//! to first token, aggregate throughput with 1, 2 and 4 streams, a user's
//! first minutes ([`startup`]: the first stream after start, a first launch
//! that computes the vectors), and memory. Prints a table, writes JSON.

mod cache;
mod rpc;
mod speculation;
mod startup;

pub use cache::CacheRows;
pub use speculation::SpecRow;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::harness::client::{percentiles, tool_result_object, McpClient};
use crate::config::Config;
use crate::emotion::SteeringCoefficients;
use crate::engine::{raw_speed, Engine, EngineSettings, PinThreads, RawSpeed};
use crate::prompt::Message;

const TIMEOUT: Duration = Duration::from_secs(300);

/// Options of a benchmark run.
pub struct BenchOptions {
    pub runs: usize,
    pub out: PathBuf,
    /// Extra environment for the server (e.g. ELPIS_MODEL_PARALLEL=4).
    pub env: Vec<(String, String)>,
}

/// One run's numbers (all f64 so medians are taken field by field).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct BenchRun {
    pub raw_prompt_tps: f64,
    pub raw_decode_tps: f64,
    pub server_prompt_tps: f64,
    pub server_decode_tps: f64,
    pub decode_ratio: f64,
    pub prompt_ratio: f64,
    pub step_ms: f64,
    pub decoding_quick_p50_ms: f64,
    pub decoding_quick_p99_ms: f64,
    pub decoding_p99_over_step: f64,
    pub prefill_quick_p50_ms: f64,
    pub prefill_quick_p99_ms: f64,
    pub prefill_p99_over_max_step: f64,
    pub prefill_prompt_tokens: f64,
    pub ttft_cold_ms: f64,
    pub ttft_grown_ms: f64,
    pub ttft_ratio: f64,
    pub grown_cached_tokens: f64,
    pub aggregate_tps_1: f64,
    pub aggregate_tps_2: f64,
    pub aggregate_tps_4: f64,
    pub aggregate_ratio_4: f64,
    /// The user's `generate` alone, and right after two streams were started,
    /// read once and left (Psyche's interrupted idle thoughts); the ratio is
    /// per reply token, since the two greedy replies may differ in length
    /// (a batch's logits differ slightly from one row's).
    pub user_generate_alone_ms: f64,
    pub user_generate_after_abandoned_ms: f64,
    pub user_generate_alone_tokens: f64,
    pub user_generate_after_abandoned_tokens: f64,
    pub abandoned_ratio: f64,
    /// RSS after start and after each kind of request (settled: the engine
    /// returns freed heap pages when it goes idle).
    pub rss_start_mib: f64,
    pub rss_generate_mib: f64,
    pub rss_function_call_mib: f64,
    pub rss_long_prompt_mib: f64,
    pub rss_streams_mib: f64,
    pub peak_rss_mib: f64,
    pub model_file_mib: f64,
    pub rss_over_model: f64,
    /// Greedy decode, one sequence, without and with the mood's control
    /// vectors set (0 when the model has no vectors yet).
    pub steering_off_tps: f64,
    pub steering_on_tps: f64,
    pub steering_ratio: f64,
    /// A ~2,000-token prompt read while a stream decodes beside it: the
    /// prompt's tokens/s, and the stream's tokens/s meanwhile (against
    /// each alone).
    pub prefill_beside_stream_tps: f64,
    pub prefill_beside_ratio: f64,
    pub stream_beside_prefill_tps: f64,
    pub stream_beside_ratio: f64,
    /// Quick calls during the first stream of a fresh server (steering on,
    /// vectors cached), and that stream's step.
    pub first_stream_quick_p50_ms: f64,
    pub first_stream_quick_p99_ms: f64,
    pub first_stream_p99_over_step: f64,
    /// A first launch: decode while the model is identified and its
    /// vectors computed, against the same reply once they are done.
    pub first_launch_tps: f64,
    pub first_launch_settled_tps: f64,
    pub first_launch_ratio: f64,
    pub first_launch_vectors_s: f64,
    /// Speculation off against on, same run, greedy: a reply grounded in
    /// its input (a code edit), a tool call echoing its input, free chat.
    pub spec_grounded: SpecRow,
    pub spec_echo_call: SpecRow,
    pub spec_free_chat: SpecRow,
    /// The prompt cache: restart, a returning conversation, q8_0 against f16.
    pub cache: CacheRows,
    /// Decode with every layer on one loopback RPC worker, against local.
    pub rpc: rpc::RpcRow,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub machine_cores: usize,
    pub threads: u32,
    pub slots: u32,
    pub max_step_ms: u32,
    pub runs: Vec<BenchRun>,
    pub median: BenchRun,
}

/// A long, unique prompt (~2,000 tokens): the idle-thinking system prompt's size.
fn long_prompt(nonce: u64) -> String {
    let mut text = format!("Session {nonce}. You are Psyche, a reflective assistant. ");
    for i in 0..110 {
        text.push_str(&format!(
            "Note {i}: the user mentioned their garden, a parser bug and a book about stars on day {}. ",
            i % 30
        ));
    }
    text
}

fn messages(system: &str, user: &str) -> Value {
    json!([{"role": "system", "content": system}, {"role": "user", "content": user}])
}

pub async fn bench(config: &Config, options: &BenchOptions) -> anyhow::Result<BenchReport> {
    let settings = in_process(config.engine_settings());
    let binary = std::env::current_exe()?;
    eprintln!("bench: model {}", config.model_path().display());
    let vectors = prepare_vectors(config)?;
    let mut runs = Vec::new();
    let mut info = (0, 0, 0);
    // The server rows run without steering (the raw loop has none); its own
    // rows measure it.
    let mut env = options.env.clone();
    env.push(("ELPIS_EMOTION_STEERING".into(), "off".into()));
    for run in 0..options.runs.max(1) {
        eprintln!("bench: run {} of {}", run + 1, options.runs.max(1));
        let short = [Message::new("system", "You are a storyteller."), Message::new("user", "Write a long story about a lighthouse keeper.")];
        let raw = raw_speed(&settings, &long_prompt(run as u64 + 1000), &short, 128)?;
        let (mut r, i) = bench_server(&binary, &env, raw, run as u64, &config.model_path()).await?;
        if vectors {
            (r.steering_off_tps, r.steering_on_tps) = steering_speed(config)?;
            r.steering_ratio = r.steering_on_tps / r.steering_off_tps;
            let (p50, p99, step) = startup::first_stream(&binary, &options.env).await?;
            (r.first_stream_quick_p50_ms, r.first_stream_quick_p99_ms, r.first_stream_p99_over_step) = (p50, p99, p99 / step);
        }
        r.cache = cache::rows(&binary, &env, &config.model_path(), &crate::config::cache_dir()).await?;
        r.rpc = rpc::row(&binary, &env, i.0).await?;
        let (computing, settled, vectors_s) = startup::first_launch(&binary, &options.env, &config.model_path()).await?;
        (r.first_launch_tps, r.first_launch_settled_tps, r.first_launch_vectors_s) = (computing, settled, vectors_s);
        r.first_launch_ratio = computing / settled;
        info = i;
        runs.push(r);
    }
    let median = median_run(&runs);
    let report = BenchReport {
        machine_cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        threads: info.0,
        slots: info.1,
        max_step_ms: info.2,
        runs,
        median,
    };
    std::fs::write(&options.out, serde_json::to_string_pretty(&report)?)?;
    print_table(&report);
    println!("JSON written to {}", options.out.display());
    Ok(report)
}

/// Settings for an engine in the bench's own process: its threads are left
/// where the kernel puts them (`model.pin_threads = off`), since the servers
/// this process starts would inherit a held thread's one CPU and measure
/// with one thread.
fn in_process(mut settings: EngineSettings) -> EngineSettings {
    settings.pin_threads = PinThreads::Off;
    settings
}

/// Make sure the model has its vectors (computing them now, once, when
/// missing): the steering rows and the first stream need them. False when
/// steering is unavailable.
fn prepare_vectors(config: &Config) -> anyhow::Result<bool> {
    let (mut engine, _handle) = Engine::load(&in_process(config.measurement_settings()), None)?;
    let mut probe = engine.probe();
    probe.settle_steering();
    if probe.steering_report().enabled {
        return Ok(true);
    }
    eprintln!("bench: computing this model's emotion vectors first (once)");
    match probe.compute_vectors(|_, _| {}) {
        Ok(_) => Ok(true),
        Err(e) => {
            eprintln!("bench: no steering rows: {e}");
            Ok(false)
        }
    }
}

/// Decode speed without and with steering (a positive mood at strength 1),
/// greedy, one sequence, best of three interleaved runs of 128 tokens, on an
/// engine of this process; zeros when the model has no vectors.
pub fn steering_speed(config: &Config) -> anyhow::Result<(f64, f64)> {
    let (mut engine, _handle) = Engine::load(&in_process(config.measurement_settings()), None)?;
    let mut engine = engine.probe();
    engine.settle_steering();
    if !engine.steering_report().enabled {
        eprintln!("bench: no emotion vectors for this model (elpis-server vectors computes them): no steering row");
        return Ok((0.0, 0.0));
    }
    let mood = SteeringCoefficients::of(0.9, 0.5, 1.0).as_array();
    let (mut off, mut on) = (0.0f64, 0.0f64);
    for _ in 0..3 {
        engine.set_steering(None).map_err(anyhow::Error::msg)?;
        off = off.max(engine.decode_speed("Once upon a time", 128).map_err(anyhow::Error::msg)?);
        engine.set_steering(Some(mood)).map_err(anyhow::Error::msg)?;
        on = on.max(engine.decode_speed("Once upon a time", 128).map_err(anyhow::Error::msg)?);
    }
    Ok((off, on))
}

/// Tokens per second between the first and the last progress notification.
fn tps_between_marks(marks: &[(f64, Instant)]) -> f64 {
    match (marks.first(), marks.last()) {
        (Some(first), Some(last)) if last.1 > first.1 => (last.0 - first.0) / (last.1 - first.1).as_secs_f64(),
        _ => 0.0,
    }
}

async fn tool(client: &mut McpClient, name: &str, args: Value) -> anyhow::Result<Value> {
    let v = client.tool(name, args, TIMEOUT).await.map_err(anyhow::Error::msg)?;
    if let Some(e) = v.get("error") {
        anyhow::bail!("{name} failed: {e}");
    }
    Ok(v)
}

/// Run a generate with a progress token; returns (result, time to first
/// token, (progress, time) of each notification).
async fn generate_timed(client: &mut McpClient, args: Value, token: &str) -> anyhow::Result<(Value, f64, Vec<(f64, Instant)>)> {
    let before = client.notifications().len();
    let sent = Instant::now();
    let (_, rx) = client
        .request("tools/call", json!({"name": "generate", "arguments": args, "_meta": {"progressToken": token}}))
        .await?;
    let (response, _) = tokio::time::timeout(TIMEOUT, rx).await??;
    let result = tool_result_object(&response["result"]).map_err(anyhow::Error::msg)?;
    let marks: Vec<(f64, Instant)> = client.notifications()[before..]
        .iter()
        .filter(|(n, _)| n["params"]["progressToken"] == token)
        .map(|(n, at)| (n["params"]["progress"].as_f64().unwrap_or(0.0), *at))
        .collect();
    let ttft = marks.first().map_or(f64::NAN, |(_, at)| (*at - sent).as_secs_f64() * 1000.0);
    Ok((result, ttft, marks))
}

async fn bench_server(
    binary: &Path,
    env: &[(String, String)],
    raw: RawSpeed,
    run: u64,
    model_path: &Path,
) -> anyhow::Result<(BenchRun, (u32, u32, u32))> {
    let mut env = env.to_vec();
    env.push(("ELPIS_LOGGING_LEVEL".into(), "warn".into()));
    // Cold means cold: no prompt saved by an earlier bench comes back from disk.
    env.push(("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB".into(), "0".into()));
    let mut client = McpClient::spawn(binary, &[], &env, None)?;
    client.initialize(Duration::from_secs(60)).await.map_err(anyhow::Error::msg)?;
    let caps = tool(&mut client, "get_capabilities", json!({})).await?;
    let max_step_ms = caps["max_step_ms"].as_f64().unwrap_or(50.0);
    let info = (
        caps["threads"].as_u64().unwrap_or(0) as u32,
        caps["slots"].as_u64().unwrap_or(0) as u32,
        max_step_ms as u32,
    );
    let mut r = BenchRun { raw_prompt_tps: raw.prompt_tokens_per_s, raw_decode_tps: raw.decode_tokens_per_s, ..Default::default() };
    r.rss_start_mib = settled_rss_mib(&client).await;
    tool(&mut client, "generate", json!({"messages": messages("Warm up.", "Hi"), "max_tokens": 8})).await?;
    r.rss_generate_mib = settled_rss_mib(&client).await;
    let weather = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}]);
    for city in ["Oslo", "Rome", "Lima"] {
        let args = json!({"messages": messages("You call tools.", &format!("Weather in {city}?")), "tools": weather, "tool_choice": "required"});
        tool(&mut client, "function_call", args).await?;
    }
    r.rss_function_call_mib = settled_rss_mib(&client).await;

    // Decode speed: tokens between the first and the last progress notification.
    let args = json!({"messages": messages("You are a storyteller.", "Write a long story about a lighthouse keeper."),
                      "max_tokens": 128, "temperature": 0});
    let (_, _, marks) = generate_timed(&mut client, args, "decode").await?;
    r.server_decode_tps = tps_between_marks(&marks);
    r.decode_ratio = r.server_decode_tps / r.raw_decode_tps;
    r.step_ms = 1000.0 / r.server_decode_tps;

    // A cold ~2,000-token prompt, with get_emotion every 10 ms during its prefill.
    let system = long_prompt(run * 7 + 1);
    let cold_args = json!({"messages": messages(&system, "What do you remember?"), "max_tokens": 1, "temperature": 0});
    let sent = Instant::now();
    let (_, rx) = client
        .request("tools/call", json!({"name": "generate", "arguments": cold_args, "_meta": {"progressToken": "cold"}}))
        .await?;
    let mut prefill_latencies = Vec::new();
    let mut rx = rx;
    let cold = loop {
        if let Ok(done) = rx.try_recv() {
            break done;
        }
        let t = Instant::now();
        tool(&mut client, "get_emotion", json!({})).await?;
        prefill_latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let cold_ms = sent.elapsed().as_secs_f64() * 1000.0;
    let cold_result = tool_result_object(&cold.0["result"]).map_err(anyhow::Error::msg)?;
    let prompt_tokens = cold_result["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    r.prefill_prompt_tokens = prompt_tokens as f64;
    r.ttft_cold_ms = cold_ms;
    r.server_prompt_tps = prompt_tokens as f64 / (cold_ms / 1000.0);
    r.prompt_ratio = r.server_prompt_tps / r.raw_prompt_tps;
    (r.prefill_quick_p50_ms, r.prefill_quick_p99_ms) = percentiles(&prefill_latencies);
    r.prefill_p99_over_max_step = r.prefill_quick_p99_ms / max_step_ms;
    r.rss_long_prompt_mib = settled_rss_mib(&client).await;


    // The same conversation, grown by a turn (the idle-react pattern).
    let grown = json!([
        {"role": "system", "content": system},
        {"role": "user", "content": "What do you remember?"},
        {"role": "assistant", "content": "The garden and the parser bug."},
        {"role": "user", "content": "Tell me more about the parser bug."}
    ]);
    let (grown_result, ttft_grown, _) =
        generate_timed(&mut client, json!({"messages": grown, "max_tokens": 1, "temperature": 0}), "grown").await?;
    r.ttft_grown_ms = ttft_grown;
    r.grown_cached_tokens = grown_result["usage"]["cached_tokens"].as_f64().unwrap_or(0.0);
    r.ttft_ratio = r.ttft_grown_ms / r.ttft_cold_ms;

    // A prompt of the same size read while a stream decodes beside it.
    (r.prefill_beside_stream_tps, r.stream_beside_prefill_tps) = prefill_beside_stream(&mut client, run).await?;
    r.prefill_beside_ratio = r.prefill_beside_stream_tps / r.server_prompt_tps;
    r.stream_beside_ratio = r.stream_beside_prefill_tps / r.server_decode_tps;

    // Quick calls while a stream decodes.
    let start = tool(
        &mut client,
        "generate_stream_start",
        json!({"messages": messages("You are a storyteller.", "Tell a long tale of the sea."), "max_tokens": 200, "temperature": 0.8}),
    )
    .await?;
    let id = start["stream_id"].as_str().unwrap_or_default().to_string();
    let mut decoding_latencies = Vec::new();
    loop {
        let t = Instant::now();
        tool(&mut client, "get_emotion", json!({})).await?;
        decoding_latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let read = tool(&mut client, "generate_stream_read", json!({"stream_id": id})).await?;
        decoding_latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        if read["is_complete"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (r.decoding_quick_p50_ms, r.decoding_quick_p99_ms) = percentiles(&decoding_latencies);
    r.decoding_p99_over_step = r.decoding_quick_p99_ms / r.step_ms;

    // Aggregate throughput with 1, 2 and 4 concurrent streams.
    for k in [1usize, 2, 4] {
        let began = Instant::now();
        let mut ids = Vec::new();
        for i in 0..k {
            let args = json!({"messages": messages("You are a storyteller.", &format!("Tell story number {i} about a fox.")),
                              "max_tokens": 64, "temperature": 0.8});
            let s = tool(&mut client, "generate_stream_start", args).await?;
            ids.push(s["stream_id"].as_str().unwrap_or_default().to_string());
        }
        let mut tokens = 0;
        while !ids.is_empty() {
            let mut open = Vec::new();
            for id in ids {
                let read = tool(&mut client, "generate_stream_read", json!({"stream_id": id})).await?;
                if read["is_complete"] == true {
                    tokens += read["total_tokens"].as_u64().unwrap_or(0);
                } else {
                    open.push(id);
                }
            }
            ids = open;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let tps = tokens as f64 / began.elapsed().as_secs_f64();
        match k {
            1 => r.aggregate_tps_1 = tps,
            2 => r.aggregate_tps_2 = tps,
            _ => r.aggregate_tps_4 = tps,
        }
    }
    r.aggregate_ratio_4 = r.aggregate_tps_4 / r.aggregate_tps_1;
    r.rss_streams_mib = settled_rss_mib(&client).await;

    [r.spec_grounded, r.spec_echo_call, r.spec_free_chat] = speculation::rows(&mut client).await?;

    // The user's turn after two idle-thought streams nobody reads any more.
    let user_turn = json!({"messages": messages("You are Psyche.", "I'm back. Tell me in three sentences what you thought about while I was away."),
                           "max_tokens": 64, "temperature": 0});
    tool(&mut client, "generate", user_turn.clone()).await?;
    let t = Instant::now();
    let alone = tool(&mut client, "generate", user_turn.clone()).await?;
    r.user_generate_alone_ms = t.elapsed().as_secs_f64() * 1000.0;
    r.user_generate_alone_tokens = alone["usage"]["completion_tokens"].as_f64().unwrap_or(0.0);
    let mut abandoned = Vec::new();
    for topic in ["the sea", "a mountain"] {
        let args = json!({"messages": messages("You are Psyche, thinking on your own.", &format!("Reflect at length on {topic}.")),
                          "max_tokens": 2000, "temperature": 0});
        let s = tool(&mut client, "generate_stream_start", args).await?;
        let id = s["stream_id"].as_str().unwrap_or_default().to_string();
        tool(&mut client, "generate_stream_read", json!({"stream_id": id})).await?;
        abandoned.push(id);
    }
    let t = Instant::now();
    let after = tool(&mut client, "generate", user_turn).await?;
    r.user_generate_after_abandoned_ms = t.elapsed().as_secs_f64() * 1000.0;
    r.user_generate_after_abandoned_tokens = after["usage"]["completion_tokens"].as_f64().unwrap_or(0.0);
    r.abandoned_ratio = (r.user_generate_after_abandoned_ms / r.user_generate_after_abandoned_tokens.max(1.0))
        / (r.user_generate_alone_ms / r.user_generate_alone_tokens.max(1.0));
    for id in abandoned {
        tool(&mut client, "generate_stream_cancel", json!({"stream_id": id})).await?;
    }

    r.peak_rss_mib = client.peak_rss_kib().unwrap_or(0) as f64 / 1024.0;
    r.model_file_mib = std::fs::metadata(model_path).map(|m| m.len()).unwrap_or(0) as f64 / (1024.0 * 1024.0);
    r.rss_over_model = r.peak_rss_mib / r.model_file_mib;
    client.close_stdin();
    client.wait_exit(Duration::from_secs(10)).await;
    Ok((r, info))
}

/// Start a stream, and once it decodes, a cold ~2,000-token prompt: over
/// ten seconds, the prompt's tokens/s (the slots' cells grow by the stream's
/// tokens and the prompt's) and the stream's. Both are stopped after.
async fn prefill_beside_stream(client: &mut McpClient, run: u64) -> anyhow::Result<(f64, f64)> {
    const WINDOW: Duration = Duration::from_secs(10);
    let args = json!({"messages": messages("You are a storyteller.", "Write a long story about a lighthouse keeper."),
                      "max_tokens": 2000, "temperature": 0});
    let start = tool(client, "generate_stream_start", args).await?;
    let id = start["stream_id"].as_str().unwrap_or_default().to_string();
    // Read it as Psyche does (every 50 ms) until it decodes.
    let mut read = tool(client, "generate_stream_read", json!({"stream_id": id})).await?;
    while read["total_tokens"].as_u64().unwrap_or(0) < 2 && read["is_complete"] == false {
        tokio::time::sleep(Duration::from_millis(50)).await;
        read = tool(client, "generate_stream_read", json!({"stream_id": id})).await?;
    }
    let cells = |caps: &Value| -> f64 {
        caps["slot_states"].as_array().map_or(0.0, |slots| slots.iter().filter_map(|s| s["tokens"].as_f64()).sum())
    };
    let system = long_prompt(run * 7 + 3);
    let cold = json!({"messages": messages(&system, "What do you remember?"), "max_tokens": 1, "temperature": 0});
    let (cold_id, _) = client.request("tools/call", json!({"name": "generate", "arguments": cold})).await?;
    // The window opens once the prompt is being read.
    let (began, cells_before, stream_before) = loop {
        let caps = tool(client, "get_capabilities", json!({})).await?;
        let r = tool(client, "generate_stream_read", json!({"stream_id": id})).await?;
        if caps["active_generations"] == 2 || r["is_complete"] == true {
            break (Instant::now(), cells(&caps), r["total_tokens"].as_f64().unwrap_or(0.0));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (mut cells_now, mut stream_now) = (cells_before, stream_before);
    let mut last_caps = Instant::now();
    while began.elapsed() < WINDOW {
        let r = tool(client, "generate_stream_read", json!({"stream_id": id})).await?;
        stream_now = r["total_tokens"].as_f64().unwrap_or(stream_now);
        if r["is_complete"] == true {
            break;
        }
        if last_caps.elapsed() >= Duration::from_millis(500) {
            let caps = tool(client, "get_capabilities", json!({})).await?;
            if caps["active_generations"] != 2 {
                break;
            }
            cells_now = cells(&caps);
            last_caps = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The last look at both at once.
    let caps = tool(client, "get_capabilities", json!({})).await?;
    let r = tool(client, "generate_stream_read", json!({"stream_id": id})).await?;
    if caps["active_generations"] == 2 {
        cells_now = cells(&caps);
        stream_now = r["total_tokens"].as_f64().unwrap_or(stream_now);
    }
    let secs = began.elapsed().as_secs_f64();
    client.send(&json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": cold_id}})).await?;
    let _ = tool(client, "generate_stream_cancel", json!({"stream_id": id})).await;
    let stream_tokens = stream_now - stream_before;
    Ok(((cells_now - cells_before - stream_tokens).max(0.0) / secs, stream_tokens / secs))
}

/// The server's RSS once the engine had a moment to go idle.
async fn settled_rss_mib(client: &McpClient) -> f64 {
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.rss_kib().unwrap_or(0) as f64 / 1024.0
}

fn median_run(runs: &[BenchRun]) -> BenchRun {
    let values: Vec<Value> = runs.iter().filter_map(|r| serde_json::to_value(r).ok()).collect();
    let median_of = |pick: &dyn Fn(&Value) -> Option<f64>| {
        let mut xs: Vec<f64> = values.iter().filter_map(pick).collect();
        xs.sort_by(|a, b| a.total_cmp(b));
        if xs.is_empty() { 0.0 } else { xs[xs.len() / 2] }
    };
    let mut out = serde_json::Map::new();
    if let Some(Value::Object(first)) = values.first() {
        for (key, value) in first {
            // Field by field, one level into rows of figures.
            let median = match value {
                Value::Object(inner) => Value::Object(
                    inner.keys().map(|k| (k.clone(), json!(median_of(&|v: &Value| v[key][k].as_f64())))).collect(),
                ),
                _ => json!(median_of(&|v: &Value| v[key].as_f64())),
            };
            out.insert(key.clone(), median);
        }
    }
    serde_json::from_value(Value::Object(out)).unwrap_or_default()
}

fn spec_text(r: &SpecRow) -> String {
    format!(
        "{:.1} / {:.1} tok/s = {:.2}x, {:.0} drafts {:.0} % accepted, text {}",
        r.off_tps,
        r.on_tps,
        r.ratio,
        r.draft_tokens,
        100.0 * r.acceptance,
        if r.same_text >= 1.0 { "same" } else { "DIFFERS" }
    )
}

fn print_table(report: &BenchReport) {
    let m = &report.median;
    println!(
        "elpis bench: {} cores, {} threads, {} slots, max_step_ms {}, median of {} runs",
        report.machine_cores,
        report.threads,
        report.slots,
        report.max_step_ms,
        report.runs.len()
    );
    let rows: Vec<(&str, String, &str)> = vec![
        ("decode tok/s: raw / server", format!("{:.1} / {:.1} = {:.2}x", m.raw_decode_tps, m.server_decode_tps, m.decode_ratio), "target >= 0.95x"),
        ("prompt tok/s: raw / server", format!("{:.0} / {:.0} = {:.2}x", m.raw_prompt_tps, m.server_prompt_tps, m.prompt_ratio), "small chunks cost speed"),
        ("quick calls while decoding p50 / p99", format!("{:.1} / {:.1} ms = {:.2} steps", m.decoding_quick_p50_ms, m.decoding_quick_p99_ms, m.decoding_p99_over_step), "target p99 <= 2 steps"),
        ("quick calls during prefill p50 / p99", format!("{:.1} / {:.1} ms = {:.2} x max_step_ms", m.prefill_quick_p50_ms, m.prefill_quick_p99_ms, m.prefill_p99_over_max_step), "target <= 2x"),
        ("TTFT cold / grown prompt", format!("{:.0} / {:.0} ms = {:.3}x ({} prompt tokens, {} cached)", m.ttft_cold_ms, m.ttft_grown_ms, m.ttft_ratio, m.prefill_prompt_tokens, m.grown_cached_tokens), "target <= 0.25x"),
        ("aggregate tok/s 1 / 2 / 4 streams", format!("{:.1} / {:.1} / {:.1} = {:.2}x", m.aggregate_tps_1, m.aggregate_tps_2, m.aggregate_tps_4, m.aggregate_ratio_4), "target 4 >= 1.5x 1"),
        ("user generate after 2 abandoned streams", format!("{:.0} / {:.0} ms alone ({:.0} / {:.0} tokens) = {:.2}x per token", m.user_generate_after_abandoned_ms, m.user_generate_alone_ms, m.user_generate_after_abandoned_tokens, m.user_generate_alone_tokens, m.abandoned_ratio), "target <= 1.2x"),
        ("RSS MiB: start / generate / function_call", format!("{:.0} / {:.0} / {:.0}", m.rss_start_mib, m.rss_generate_mib, m.rss_function_call_mib), "target <= model + KV + 64"),
        ("RSS MiB: long prompt / streams", format!("{:.0} / {:.0}", m.rss_long_prompt_mib, m.rss_streams_mib), "target <= model + KV + 64"),
        ("decode tok/s steering off / on", format!("{:.1} / {:.1} = {:.3}x", m.steering_off_tps, m.steering_on_tps, m.steering_ratio), "target >= 0.97x"),
        ("prompt tok/s beside a decoding stream", format!("{:.0} = {:.2}x alone", m.prefill_beside_stream_tps, m.prefill_beside_ratio), ""),
        ("stream tok/s while a prompt is read", format!("{:.1} = {:.2}x alone", m.stream_beside_prefill_tps, m.stream_beside_ratio), "target >= 0.8x"),
        ("quick calls in the first stream p50 / p99", format!("{:.1} / {:.1} ms = {:.2} steps", m.first_stream_quick_p50_ms, m.first_stream_quick_p99_ms, m.first_stream_p99_over_step), "target p99 <= 2 steps"),
        ("first launch: decode computing / settled", format!("{:.1} / {:.1} tok/s = {:.2}x (vectors in {:.0} s)", m.first_launch_tps, m.first_launch_settled_tps, m.first_launch_ratio, m.first_launch_vectors_s), "target >= 0.9x"),
        ("speculation: grounded edit off / on", spec_text(&m.spec_grounded), "target >= 1.5x"),
        ("speculation: tool call echoing input", spec_text(&m.spec_echo_call), ""),
        ("speculation: free chat", spec_text(&m.spec_free_chat), "target >= 0.98x"),
        ("TTFT after a restart / cold (cache removed)", format!("{:.0} / {:.0} ms = {:.3}x ({} prompt tokens)", m.cache.restart_warm_ms, m.cache.restart_cold_ms, m.cache.restart_ratio, m.cache.restart_prompt_tokens), "target <= 0.1x"),
        ("TTFT of a returning conversation / cold", format!("{:.0} / {:.0} ms = {:.3}x (3 conversations, 2 slots)", m.cache.returning_ms, m.cache.returning_cold_ms, m.cache.returning_ratio), "target <= 0.1x"),
        ("KV MiB of one prompt f16 / q8_0 (saved)", format!("{:.1} / {:.1} = {:.2}x", m.cache.kv_f16_mib, m.cache.kv_q8_mib, m.cache.kv_ratio), "target <= 0.55x"),
        ("decode tok/s f16 / q8_0", format!("{:.1} / {:.1} = {:.2}x, greedy text {}", m.cache.decode_f16_tps, m.cache.decode_q8_tps, m.cache.decode_q8_ratio, if m.cache.q8_same_text >= 1.0 { "same" } else { "differs" }), "target >= 0.95x"),
        ("decode tok/s local / on one RPC worker", format!("{:.1} / {:.1} = {:.2}x, greedy text {}", m.rpc.local_tps, m.rpc.worker_tps, m.rpc.ratio, if m.rpc.same_text >= 1.0 { "same" } else { "differs" }), "loopback, all layers"),
        ("peak RSS / model file", format!("{:.0} / {:.0} MiB = {:.2}x", m.peak_rss_mib, m.model_file_mib, m.rss_over_model), ""),
    ];
    for (name, value, target) in rows {
        println!("  {name:<40} {value:<56} {target}");
    }
}
