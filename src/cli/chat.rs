//! The commands a person runs in a terminal (they print to stdout, unlike
//! the server): `chat "message"` streams a reply through the same engine and
//! inference path the server uses, then prints the emotional state;
//! `replay` and `soak` drive a spawned server and print their reports.

use std::io::Write;

use tokio_util::sync::CancellationToken;

use crate::engine::Message;
use crate::inference::Inference;
use crate::wire::GenerateArgs;

pub async fn chat(
    inference: &Inference,
    message: String,
    system: Option<String>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
) -> anyhow::Result<()> {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(Message { role: "system".into(), content: system });
    }
    messages.push(Message { role: "user".into(), content: message });
    let args = GenerateArgs { messages, max_tokens, temperature, emotional_modulation: Some(true) };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<crate::inference::Progress>();
    let printer = tokio::spawn(async move {
        let mut out = std::io::stdout();
        while let Some((_, text)) = rx.recv().await {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    });
    let result = inference.generate(args, CancellationToken::new(), Some(tx)).await;
    let _ = printer.await;
    let result = result.map_err(|e| anyhow::anyhow!(e.0))?;
    let summary = format!(
        "\n\nfinish: {}  usage: {}\nsampling: {}\nemotional state: {}\n",
        result["finish_reason"],
        result["usage"],
        result["modulated_params"],
        serde_json::to_string_pretty(&result["emotional_state"])?
    );
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(summary.as_bytes());
    Ok(())
}

/// `elpis-server replay FILE...`: play each session against a fresh server
/// (this same binary), print a report per session; fail if any broke a rule.
pub async fn replay_files(files: &[std::path::PathBuf], speed: f64, as_json: bool) -> anyhow::Result<()> {
    let options = crate::replay::ReplayOptions {
        binary: std::env::current_exe()?,
        env: Vec::new(),
        speed,
        stderr_to: None,
    };
    let mut failed = 0;
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
        let steps = crate::replay::parse_session(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let name = file.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let report = crate::replay::replay(&name, &steps, &options).await;
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
    let report = crate::soak::soak(std::env::current_exe()?, seconds, seed).await;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.violations.is_empty() {
        anyhow::bail!("soak failed: {}", report.violations.join("; "));
    }
    Ok(())
}
