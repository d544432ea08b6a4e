//! The harness's commands, as a person runs them: each drives a spawned
//! server through [`crate::harness`] and prints the report on stdout.

use std::path::PathBuf;

use crate::config::Config;
use crate::harness::{bench, replay, soak};
use crate::session::parse_session;

/// `elpis-server replay FILE...`: play each session against a fresh server
/// (this same binary), print a report per session; fail if any broke a rule.
pub async fn replay_files(
    files: &[PathBuf],
    speed: f64,
    stall_s: f64,
    (max_tokens, clip_chars): (Option<u64>, Option<usize>),
    as_json: bool,
) -> anyhow::Result<()> {
    let options = replay::ReplayOptions {
        binary: std::env::current_exe()?,
        env: Vec::new(),
        speed,
        stall: std::time::Duration::from_secs_f64(stall_s.max(0.001)),
        stderr_to: None,
        max_tokens,
        clip_chars,
    };
    let mut failed = 0;
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
        let steps = parse_session(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let name = file.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let report = replay::replay(&name, &steps, &options).await;
        if as_json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "{:<28} {:>5} requests {:>5} answers {:>3} streams  quick p50 {:>6.1} ms p99 {:>6.1} ms  exit {:?}  {:.1} s  {}",
                report.session,
                report.requests,
                report.responses,
                report.streams,
                report.quick_p50_ms,
                report.quick_p99_ms,
                report.exit_code,
                report.duration_s,
                if report.violations.is_empty() { "ok".to_string() } else { format!("FAILED: {}", report.violations.join("; ")) }
            );
        }
        if !report.violations.is_empty() {
            failed += 1;
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} sessions failed", files.len());
    }
    Ok(())
}

/// `elpis-server soak`: random mixed operations, then the checks.
pub async fn soak(seconds: f64, seed: u64) -> anyhow::Result<()> {
    let report = soak::soak(std::env::current_exe()?, seconds, seed).await;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.violations.is_empty() {
        anyhow::bail!("soak failed: {}", report.violations.join("; "));
    }
    Ok(())
}

/// `elpis-server bench`: the raw llama.cpp floor against the server; the
/// harness prints the table and writes the JSON.
pub async fn bench(config: &Config, runs: usize, out: PathBuf) -> anyhow::Result<()> {
    let options = bench::BenchOptions { runs, out, env: Vec::new() };
    bench::bench(config, &options).await.map(|_| ())
}
