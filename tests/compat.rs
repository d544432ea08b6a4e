//! Drop-in for existing Psyche setups, through the real binary: the Python
//! predecessor's config values, log levels and log file, its environment
//! habits, and the mood's edges as Psyche reads them.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("elpis-compat-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn full_stderr(s: &Server) -> String {
    s.stderr_all()
}

#[test]
fn an_old_config_file_serves_with_warnings_and_logs_to_stderr_and_its_file() {
    let dir = temp_dir("old-config");
    let log = dir.join("logs/elpis.log");
    let config = dir.join("elpis.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\nhardware_backend = \"rocm\"\ngpu_layers = 35\nchat_format = \"llama-2\"\n\
             context_length = 2048\nmax_tokens = 4096\ntorch_dtype = \"bfloat16\"\n\
             [emotion]\ntrajectory_history_size = 4\nspiral_history_count = 5\n\
             [logging]\nlevel = \"WARNING\"\noutput_file = \"{}\"\nformat = \"text\"\n",
            log.display()
        ),
    )
    .unwrap();
    let config_str = config.display().to_string();
    let mut s = Server::spawn_raw(&[("ELPIS_LOGGING_LEVEL", "WARNING")], &["--config", &config_str]);
    s.initialize();
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["chat_format"], "llama-2", "{caps}");
    assert_eq!(caps["max_tokens"], 2048, "max_tokens clamped to the context: {caps}");
    assert_eq!(caps["gpu_layers"], 0, "{caps}");
    let stderr = full_stderr(&s);
    s.shutdown();
    for expected in ["hardware_backend = \"rocm\"", "model.max_tokens = 4096", "spiral_history_count = 5", "torch_dtype"] {
        assert!(stderr.contains(expected), "stderr lacks {expected:?}:\n{stderr}");
    }
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(!stderr.contains(" INFO "), "level WARNING keeps info out:\n{stderr}");
    assert!(!stderr.contains('\u{1b}'), "no colour codes when stderr is not a terminal:\n{stderr}");
    let file = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    assert!(file.contains("hardware_backend = \"rocm\""), "the log file gets the same lines:\n{file}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn critical_keeps_warnings_and_info_out() {
    let mut s = Server::start(&[("ELPIS_LOGGING_LEVEL", "CRITICAL"), ("ELPIS_MODEL_HARDWARE_BACKEND", "metal")]);
    s.tool("get_emotion", json!({})).ok();
    let stderr = full_stderr(&s);
    s.shutdown();
    assert!(!stderr.contains("WARN") && !stderr.contains("INFO"), "{stderr}");
}

#[test]
fn an_unwritable_log_file_is_a_warning_not_a_refusal() {
    let mut s = Server::start(&[("ELPIS_LOGGING_OUTPUT_FILE", "/proc/elpis-nowhere/elpis.log")]);
    let state = s.tool("get_emotion", json!({})).ok();
    assert!(state.get("valence").is_some());
    let stderr = full_stderr(&s);
    s.shutdown();
    assert!(stderr.contains("/proc/elpis-nowhere/elpis.log") && stderr.contains("cannot be written"), "{stderr}");
    assert!(stderr.contains("serving MCP on stdio"), "stderr still gets the logs:\n{stderr}");
}

#[test]
fn environment_values_and_names_as_the_predecessor_read_them() {
    // Names in any case; number spellings; a text key takes digits.
    let mut s = Server::start(&[("elpis_model_context_length", "1.024e3"), ("ELPIS_SOMETHING_ELSE", "1")]);
    let caps = s.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["context_length"], 1024, "{caps}");
    assert_eq!(caps["max_tokens"], 1024, "{caps}");
    let stderr = full_stderr(&s);
    s.shutdown();
    assert!(stderr.contains("ELPIS_SOMETHING_ELSE names no setting"), "{stderr}");
    assert!(!stderr.contains("ELPIS_QUIET") && !stderr.contains("ELPIS_MODEL_SEED"), "{stderr}");

    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_elpis-server"));
        cmd.env("ELPIS_MODEL_PATH", model_path()).env("ELPIS_QUIET", "0").env("ELPIS_EMOTION_STEERING", "off").stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string(), out.stdout)
    };
    // A model path of digits is a path, not a type error blaming a config file.
    let (code, stderr, stdout) = run(&[("ELPIS_MODEL_PATH", "12345")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("model file not found at 12345"), "{stderr}");
    assert!(!stderr.contains("configs/elpis.toml") && !stderr.contains("invalid type"), "{stderr}");
    assert!(stdout.is_empty());
    // A value that does not fit its key names the variable.
    let (code, stderr, _) = run(&[("ELPIS_MODEL_CONTEXT_LENGTH", "lots")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("ELPIS_MODEL_CONTEXT_LENGTH") && stderr.contains("whole number"), "{stderr}");
}

#[test]
fn the_moods_edges_as_psyche_reads_them() {
    let mut s = Server::start(&[("ELPIS_EMOTION_DECAY_RATE", "40")]);
    // One sample: the neutral trajectory, no time in a quadrant.
    std::thread::sleep(Duration::from_millis(300));
    let state = s.tool("get_emotion", json!({})).ok();
    assert_eq!(state["trajectory"]["time_in_quadrant"], 0.0, "{state}");
    // The empty event is an unknown event: (0, +0.05).
    let empty = s.tool("update_emotion", json!({"event_type": ""})).ok();
    assert_eq!((empty["valence"].as_f64(), empty["arousal"].as_f64()), (Some(0.0), Some(0.05)), "{empty}");
    assert_eq!(empty["trajectory"]["time_in_quadrant"], 0.0, "{empty}");
    // A failure decays (rate 40/s) to (-0.000, 0.000) within a second: that
    // is the baseline's quadrant, not frustrated.
    let hurt = s.tool("update_emotion", json!({"event_type": "failure", "intensity": 2.0})).ok();
    assert_eq!(hurt["quadrant"], "frustrated", "{hurt}");
    std::thread::sleep(Duration::from_millis(1000));
    let calm = s.tool("get_emotion", json!({})).ok();
    assert_eq!((calm["valence"].as_f64(), calm["arousal"].as_f64()), (Some(0.0), Some(0.0)), "{calm}");
    assert_eq!(calm["quadrant"], "excited", "{calm}");
    s.shutdown();
}
