//! Replays every recorded session in tests/sessions/ against the real binary
//! and model (`elpis-server replay`), which checks the rules of
//! shared/docs/sessions.md; this test fails on any violation and prints the
//! quick-call latency of each session.

mod common;

use std::path::PathBuf;

use serde_json::Value;

fn sessions() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sessions");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_named_session_is_recorded() {
    let names: Vec<String> = sessions().iter().map(|p| p.file_stem().unwrap().to_string_lossy().to_string()).collect();
    for required in [
        "connect-and-idle",
        "idle-react",
        "interrupt-then-stream-cancel",
        "interrupt-then-stream-abandon",
        "idle-thought-abandoned",
        "stream-timeout-cancel",
        "mood-polling",
        "rapid-streams",
        "shutdown-mid-stream",
        "shutdown-mid-generate",
        "dreaming",
    ] {
        assert!(names.iter().any(|n| n == required), "missing session {required}");
    }
}

#[test]
fn all_sessions_replay_cleanly() {
    let files = sessions();
    // Two replays at a time, one decode thread each: the machine has two cores.
    let halves: Vec<Vec<PathBuf>> = vec![
        files.iter().step_by(2).cloned().collect(),
        files.iter().skip(1).step_by(2).cloned().collect(),
    ];
    let children: Vec<_> = halves
        .iter()
        .map(|group| {
            // The replayed servers inherit the test settings.
            common::server_command()
                .arg("replay")
                .arg("--json")
                // Only a hang fails the test: latency is the bench's business.
                .args(["--stall-s", "60"])
                .args(group)
                .env("ELPIS_LOGGING_LEVEL", "warn")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn replay")
        })
        .collect();
    let mut reports = Vec::new();
    for child in children {
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
            let report: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("bad report line ({e}): {line}"));
            reports.push(report);
        }
        if !output.status.success() {
            eprintln!("replay stderr:\n{}", String::from_utf8_lossy(&output.stderr));
        }
    }
    assert_eq!(reports.len(), files.len(), "one report per session");
    let mut failures = Vec::new();
    let (mut requests, mut answers) = (0, 0);
    for r in &reports {
        eprintln!(
            "{:<30} requests {:>4} answers {:>4} streams {:>2} quick p50 {:>7.1} ms p99 {:>7.1} ms max {:>7.1} ms exit {} {:>6.1} s",
            r["session"].as_str().unwrap(),
            r["requests"],
            r["responses"],
            r["streams"],
            r["quick_p50_ms"].as_f64().unwrap(),
            r["quick_p99_ms"].as_f64().unwrap(),
            r["quick_max_ms"].as_f64().unwrap(),
            r["exit_code"],
            r["duration_s"].as_f64().unwrap(),
        );
        requests += r["requests"].as_u64().unwrap();
        answers += r["responses"].as_u64().unwrap();
        for v in r["violations"].as_array().unwrap() {
            failures.push(format!("{}: {}", r["session"], v));
        }
        assert_eq!(r["exit_code"], 0, "{r}");
    }
    eprintln!("{} sessions, {requests} requests, {answers} answers", reports.len());
    assert!(failures.is_empty(), "violations:\n{}", failures.join("\n"));
}

#[test]
fn a_recorded_session_replays() {
    // Record a small live session with ELPIS_RECORD, then replay the file.
    let path = std::env::temp_dir().join(format!("elpis-recorded-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let path_str = path.display().to_string();
    let mut s = common::Server::start(&[("ELPIS_RECORD", &path_str), ("ELPIS_MODEL_N_THREADS", "1")]);
    let start = s
        .tool("generate_stream_start", serde_json::json!({"messages": common::user("Hello there"), "max_tokens": 12}))
        .ok();
    let id = start["stream_id"].as_str().unwrap().to_string();
    common::poll_stream(&mut s, &id, std::time::Duration::from_millis(50));
    s.tool("update_emotion", serde_json::json!({"event_type": "success"})).ok();
    s.shutdown();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"stream\""), "the recording notes the stream id:\n{text}");
    assert!(text.contains("\"close\":true"), "the recording ends with the close:\n{text}");
    let output = common::server_command()
        .arg("replay")
        .arg("--json")
        .args(["--stall-s", "60"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert!(output.status.success(), "{report}");
    assert_eq!(report["violations"], serde_json::json!([]));
    assert!(report["requests"].as_u64().unwrap() >= 4, "{report}");
}
