//! Logging through `tracing`: stderr by default, a file when ELPIS_QUIET=1
//! (Psyche's TUI owns the terminal) or when `logging.output_file` is set.
//! Never stdout: stdout is the protocol channel. llama.cpp's own log lines
//! are routed into the same subscriber by the engine.

use std::path::PathBuf;
use std::sync::Arc;

use tracing_subscriber::EnvFilter;

use crate::config::LoggingConfig;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("logging.level = {0:?} is not a valid level: use trace, debug, info, warn or error")]
    Level(String),
    #[error("cannot open log file {path}: {source}: set logging.output_file to a writable path")]
    File { path: PathBuf, source: std::io::Error },
}

/// Whether ELPIS_QUIET asks for a silent terminal.
pub fn quiet() -> bool {
    std::env::var("ELPIS_QUIET").is_ok_and(|v| !v.is_empty() && v != "0" && v.to_ascii_lowercase() != "false")
}

/// The log file used with ELPIS_QUIET=1 when none is configured.
pub fn default_log_file() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".elpis").join("elpis-server.log")
}

/// Install the global subscriber.
pub fn init(config: &LoggingConfig) -> Result<(), LogError> {
    let level = config.level.trim().to_ascii_lowercase();
    let mut filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.is_empty() => EnvFilter::try_new(directives),
        _ => EnvFilter::try_new(&level),
    }
    .map_err(|_| LogError::Level(config.level.clone()))?;
    // llama.cpp narrates every load at info level: keep it to warnings
    // unless debugging.
    if !matches!(level.as_str(), "debug" | "trace") {
        if let Ok(d) = "llama-cpp-2=warn".parse() {
            filter = filter.add_directive(d);
        }
    }
    let file = if !config.output_file.is_empty() {
        Some(PathBuf::from(&config.output_file))
    } else if quiet() {
        Some(default_log_file())
    } else {
        None
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| LogError::File { path: path.clone(), source })?;
            let builder = builder.with_ansi(false).with_writer(Arc::new(file));
            if config.format == "json" {
                builder.json().init();
            } else {
                builder.init();
            }
        }
        None => {
            let builder = builder.with_writer(std::io::stderr);
            if config.format == "json" {
                builder.json().init();
            } else {
                builder.init();
            }
        }
    }
    Ok(())
}
