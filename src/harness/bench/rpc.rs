//! The bench's RPC row: decode speed with every layer on one ggml RPC
//! worker over loopback (`elpis-server rpc-worker` on 127.0.0.1), against
//! the same model served locally, with the same thread count: what a split
//! costs before any network does.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::{generate_timed, messages, tps_between_marks};
use crate::harness::client::McpClient;

#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct RpcRow {
    pub local_tps: f64,
    pub worker_tps: f64,
    pub ratio: f64,
    /// 1 when the greedy replies were the same text.
    pub same_text: f64,
}

pub async fn row(binary: &Path, env: &[(String, String)], threads: u32) -> anyhow::Result<RpcRow> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let mut worker = tokio::process::Command::new(binary)
        .args(["rpc-worker", "--listen", &addr, "--threads", &threads.max(1).to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut ready = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::ensure!(ready, "the RPC worker at {addr} did not start");
    let story = json!({"messages": messages("You are a storyteller.", "Write a long story about a lighthouse keeper."),
                       "max_tokens": 96, "temperature": 0});
    let mut out = Vec::new();
    for split in [false, true] {
        let mut env = env.to_vec();
        env.push(("ELPIS_SERVER_PROMPT_CACHE_DISK_MIB".into(), "0".into()));
        env.push(("ELPIS_MODEL_SPECULATIVE".into(), "off".into()));
        if split {
            env.push(("ELPIS_MODEL_RPC_SERVERS".into(), addr.clone()));
            env.push(("ELPIS_MODEL_GPU_LAYERS".into(), "999".into()));
        }
        let mut client = McpClient::spawn(binary, &[], &env, None)?;
        client.initialize(Duration::from_secs(120)).await.map_err(anyhow::Error::msg)?;
        let (reply, _, marks) = generate_timed(&mut client, story.clone(), if split { "rpc" } else { "local" }).await?;
        out.push((tps_between_marks(&marks), reply["content"].clone()));
        client.close_stdin();
        client.wait_exit(Duration::from_secs(60)).await;
    }
    let _ = worker.kill().await;
    Ok(RpcRow {
        local_tps: out[0].0,
        worker_tps: out[1].0,
        ratio: out[1].0 / out[0].0.max(1e-9),
        same_text: f64::from(u8::from(out[0].1 == out[1].1)),
    })
}
