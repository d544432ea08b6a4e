//! `elpis-server soak`: thousands of mixed operations with random
//! interleavings against a spawned server for a set time, then the checks:
//! no crash, every request answered, no stream or generation left, memory
//! growth after warm-up under 5 %.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::harness::client::{tool_result_object, McpClient, Response};

const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Most generations in flight at once.
const MAX_IN_FLIGHT: usize = 6;

/// A small deterministic PRNG (xorshift64*), so a failing run can be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Default, Serialize)]
pub struct SoakReport {
    pub seconds: f64,
    pub seed: u64,
    pub operations: u64,
    pub requests: u64,
    pub answers: u64,
    pub streams_started: u64,
    pub streams_completed: u64,
    pub streams_cancelled: u64,
    pub generates: u64,
    pub generates_cancelled: u64,
    pub emotion_calls: u64,
    pub rss_after_warmup_kib: u64,
    pub rss_end_kib: u64,
    pub rss_growth_percent: f64,
    pub streams_left: u64,
    pub generations_left: u64,
    pub exit_code: Option<i32>,
    pub violations: Vec<String>,
}

struct InFlight {
    rx: oneshot::Receiver<Response>,
    cancelled: bool,
}

pub async fn soak(binary: PathBuf, seconds: f64, seed: u64) -> SoakReport {
    let mut report = SoakReport { seed, ..SoakReport::default() };
    let env = vec![("ELPIS_LOGGING_LEVEL".to_string(), "info".to_string())];
    let stderr_path = std::env::temp_dir().join(format!("elpis-soak-{}.log", std::process::id()));
    eprintln!("soak: server log at {}", stderr_path.display());
    let mut client = match McpClient::spawn(&binary, &[], &env, Some(&stderr_path)) {
        Ok(c) => c,
        Err(e) => {
            report.violations.push(format!("cannot spawn server: {e}"));
            return report;
        }
    };
    if let Err(e) = client.initialize(Duration::from_secs(60)).await {
        report.violations.push(e);
        return report;
    }
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let warmup = Duration::from_secs_f64(seconds * 0.2);
    let mut open_streams: Vec<String> = Vec::new();
    let mut in_flight: Vec<InFlight> = Vec::new();
    let prompts = ["Say something kind.", "Count to five.", "Name a colour.", "Describe rain in one line.", "Hello!"];
    while started.elapsed().as_secs_f64() < seconds {
        if report.rss_after_warmup_kib == 0 && started.elapsed() >= warmup {
            report.rss_after_warmup_kib = client.rss_kib().unwrap_or(0);
        }
        report.operations += 1;
        if report.operations % 200 == 0 {
            eprintln!(
                "soak: {:.0} s, {} operations, {} open streams, {} generates in flight",
                started.elapsed().as_secs_f64(),
                report.operations,
                open_streams.len(),
                in_flight.len()
            );
        }
        let prompt = prompts[rng.below(prompts.len() as u64) as usize];
        let max_tokens = 4 + rng.below(40);
        let result = match rng.below(10) {
            0 | 1 if open_streams.len() < 20 => {
                report.streams_started += 1;
                let args = json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens});
                call(&mut client, &mut report, "generate_stream_start", args).await.map(|v| {
                    if let Some(id) = v["stream_id"].as_str() {
                        open_streams.push(id.to_string());
                    }
                })
            }
            2 | 3 if !open_streams.is_empty() => {
                let i = rng.below(open_streams.len() as u64) as usize;
                let id = open_streams[i].clone();
                call(&mut client, &mut report, "generate_stream_read", json!({"stream_id": id})).await.map(|v| {
                    if v["is_complete"] == true {
                        open_streams.swap_remove(i);
                        report.streams_completed += 1;
                    }
                })
            }
            4 if !open_streams.is_empty() => {
                let i = rng.below(open_streams.len() as u64) as usize;
                let id = open_streams.swap_remove(i);
                report.streams_cancelled += 1;
                call(&mut client, &mut report, "generate_stream_cancel", json!({"stream_id": id})).await.map(|_| ())
            }
            5 if in_flight.len() < MAX_IN_FLIGHT => {
                report.generates += 1;
                let args = json!({"name": "generate", "arguments": {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}});
                match client.request("tools/call", args).await {
                    Ok((id, rx)) => {
                        report.requests += 1;
                        let cancel = rng.below(3) == 0;
                        if cancel {
                            report.generates_cancelled += 1;
                            tokio::time::sleep(Duration::from_millis(rng.below(200))).await;
                            let note = json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": id}});
                            let _ = client.send(&note).await;
                        }
                        in_flight.push(InFlight { rx, cancelled: cancel });
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            6 => {
                report.emotion_calls += 1;
                let events = ["success", "failure", "insight", "idle", "frustration", "novelty"];
                let event = events[rng.below(events.len() as u64) as usize];
                let args = json!({"event_type": event, "intensity": rng.below(20) as f64 / 10.0});
                call(&mut client, &mut report, "update_emotion", args).await.map(|_| ())
            }
            7 => {
                report.emotion_calls += 1;
                call(&mut client, &mut report, "reset_emotion", json!({})).await.map(|_| ())
            }
            8 => call(&mut client, &mut report, "get_capabilities", json!({})).await.map(|_| ()),
            _ => {
                report.emotion_calls += 1;
                call(&mut client, &mut report, "get_emotion", json!({})).await.map(|_| ())
            }
        };
        if let Err(e) = result {
            report.violations.push(e);
            break;
        }
        collect_finished(&mut in_flight, &mut report, false).await;
        tokio::time::sleep(Duration::from_millis(rng.below(30))).await;
    }
    // Wind down: every outstanding answer, every stream read to its end.
    eprintln!("soak: winding down: {} generates in flight, {} open streams", in_flight.len(), open_streams.len());
    collect_finished(&mut in_flight, &mut report, true).await;
    for id in std::mem::take(&mut open_streams) {
        loop {
            match call(&mut client, &mut report, "generate_stream_read", json!({"stream_id": id})).await {
                Ok(v) if v["is_complete"] == true => {
                    report.streams_completed += 1;
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => {
                    report.violations.push(e);
                    break;
                }
            }
        }
    }
    // Pump tasks finish a moment after the engine: give them that moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    match call(&mut client, &mut report, "get_capabilities", json!({})).await {
        Ok(caps) => {
            report.streams_left = caps["active_streams"].as_u64().unwrap_or(u64::MAX);
            report.generations_left = caps["active_generations"].as_u64().unwrap_or(u64::MAX)
                + caps["queued_generations"].as_u64().unwrap_or(u64::MAX);
        }
        Err(e) => report.violations.push(e),
    }
    report.rss_end_kib = client.rss_kib().unwrap_or(0);
    if report.rss_after_warmup_kib > 0 {
        report.rss_growth_percent =
            (report.rss_end_kib as f64 - report.rss_after_warmup_kib as f64) * 100.0 / report.rss_after_warmup_kib as f64;
    }
    if !client.garbage().is_empty() {
        report.violations.push(format!("non-protocol output on stdout: {:?}", client.garbage()));
    }
    client.close_stdin();
    let status = client.wait_exit(Duration::from_secs(10)).await;
    report.exit_code = status.and_then(|s| s.code());
    if report.exit_code != Some(0) {
        report.violations.push(format!("server exit: {status:?}"));
    }
    if report.streams_left != 0 || report.generations_left != 0 {
        report.violations.push(format!(
            "left behind: {} streams, {} generations",
            report.streams_left, report.generations_left
        ));
    }
    if report.rss_growth_percent >= 5.0 {
        report.violations.push(format!("RSS grew {:.1} % after warm-up", report.rss_growth_percent));
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

async fn call(client: &mut McpClient, report: &mut SoakReport, tool: &str, args: Value) -> Result<Value, String> {
    report.requests += 1;
    let result = client.call("tools/call", json!({"name": tool, "arguments": args}), CALL_TIMEOUT).await?;
    report.answers += 1;
    let value = tool_result_object(&result)?;
    if let Some(e) = value.get("error") {
        if value.get("is_complete").is_none() {
            return Err(format!("{tool} failed: {e}"));
        }
    }
    Ok(value)
}

async fn collect_finished(in_flight: &mut Vec<InFlight>, report: &mut SoakReport, wait_all: bool) {
    let mut still = Vec::new();
    for mut f in in_flight.drain(..) {
        let outcome = if wait_all {
            // A cancelled request may never be answered: wait briefly for those.
            let limit = if f.cancelled { Duration::from_secs(2) } else { CALL_TIMEOUT };
            match tokio::time::timeout(limit, &mut f.rx).await {
                Ok(r) => Some(r.ok()),
                Err(_) => Some(None),
            }
        } else {
            match f.rx.try_recv() {
                Ok(r) => Some(Some(r)),
                Err(oneshot::error::TryRecvError::Empty) => None,
                Err(oneshot::error::TryRecvError::Closed) => Some(None),
            }
        };
        match outcome {
            None => still.push(f),
            Some(Some((response, _))) => {
                report.answers += 1;
                let ok = tool_result_object(&response["result"]).is_ok() || response.get("error").is_some();
                if !ok {
                    report.violations.push(format!("malformed generate answer: {response}"));
                }
            }
            // A cancelled request may go unanswered.
            Some(None) if f.cancelled => {}
            Some(None) => report.violations.push("a generate was never answered".into()),
        }
    }
    *in_flight = still;
}
