//! The bench's rows for a user's first minutes: quick calls while the first
//! stream after start decodes (steering on, vectors cached), and a first
//! launch, when the model's vectors are computed while the user already
//! generates (against the same generation once they are done).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use super::{generate_timed, messages, tool, tps_between_marks};
use crate::harness::client::{percentiles, McpClient};

/// Quick calls (get_emotion every 10 ms) during the first stream of a
/// freshly started server: p50, p99 and the stream's step in ms.
pub async fn first_stream(binary: &Path, env: &[(String, String)]) -> anyhow::Result<(f64, f64, f64)> {
    let mut env = env.to_vec();
    env.push(("ELPIS_EMOTION_STEERING".into(), "auto".into()));
    let mut client = McpClient::spawn(binary, &[], &env, None)?;
    client.initialize(Duration::from_secs(120)).await.map_err(anyhow::Error::msg)?;
    let args = json!({"messages": messages("You are Psyche.", "Tell me about your morning."), "max_tokens": 64, "temperature": 0});
    let start = tool(&mut client, "generate_stream_start", args).await?;
    let id = start["stream_id"].as_str().unwrap_or_default().to_string();
    let began = Instant::now();
    let mut latencies = Vec::new();
    let tokens = loop {
        let t = Instant::now();
        tool(&mut client, "get_emotion", json!({})).await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        let read = tool(&mut client, "generate_stream_read", json!({"stream_id": id})).await?;
        if read["is_complete"] == true {
            break read["total_tokens"].as_f64().unwrap_or(0.0);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let step_ms = began.elapsed().as_secs_f64() * 1000.0 / tokens.max(1.0);
    client.close_stdin();
    client.wait_exit(Duration::from_secs(60)).await;
    let (p50, p99) = percentiles(&latencies);
    Ok((p50, p99, step_ms))
}

/// A first launch: a server with an empty cache (the model is identified
/// and its vectors computed in the background) decodes a reply; once the
/// vectors are done (the server idle), the same reply again. Tokens per
/// second of each, and the seconds the vectors took.
pub async fn first_launch(binary: &Path, env: &[(String, String)], model: &Path) -> anyhow::Result<(f64, f64, f64)> {
    let cache = std::env::temp_dir().join(format!("elpis-bench-first-launch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let mut env = env.to_vec();
    env.push(("ELPIS_EMOTION_STEERING".into(), "auto".into()));
    env.push(("ELPIS_CACHE_DIR".into(), cache.display().to_string()));
    env.push(("ELPIS_MODEL_PATH".into(), model.display().to_string()));
    let mut client = McpClient::spawn(binary, &[], &env, None)?;
    let started = Instant::now();
    client.initialize(Duration::from_secs(120)).await.map_err(anyhow::Error::msg)?;
    let args = json!({"messages": messages("You are a storyteller.", "Write a long story about a lighthouse keeper."),
                      "max_tokens": 160, "temperature": 0});
    let (_, _, marks) = generate_timed(&mut client, args.clone(), "first").await?;
    let computing = tps_between_marks(&marks);
    let caps = tool(&mut client, "get_capabilities", json!({})).await?;
    if caps["steering"]["state"] == "on" {
        eprintln!("bench: the vectors were done before the first reply was: the first-launch row measured little");
    }
    // Idle now: the computation finishes.
    let deadline = Instant::now() + Duration::from_secs(900);
    let vectors_s = loop {
        let caps = tool(&mut client, "get_capabilities", json!({})).await?;
        let state = caps["steering"]["state"].as_str().unwrap_or("off").to_string();
        if state == "on" || state == "off" {
            break started.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            anyhow::bail!("the vectors were not done within 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (_, _, marks) = generate_timed(&mut client, args, "settled").await?;
    let settled = tps_between_marks(&marks);
    client.close_stdin();
    client.wait_exit(Duration::from_secs(60)).await;
    let _ = std::fs::remove_dir_all(&cache);
    Ok((computing, settled, vectors_s))
}
