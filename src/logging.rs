//! Logging through `tracing`. Logs always go to stderr, or, when
//! ELPIS_QUIET=1 (Psyche's TUI owns the terminal), to
//! `~/.elpis/elpis-server.log`; `logging.output_file` adds a second sink,
//! its folder created and the file rotated by size, as the Python
//! predecessor did. Never stdout: stdout is the protocol channel. llama.cpp's
//! own log lines are routed into the same subscriber by the engine.
//!
//! Nothing here refuses to serve: a level nobody can read or a log file
//! that cannot be written is a warning, and logging goes on without it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tokio::sync::mpsc;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::LoggingConfig;

/// A log file is rotated once it passes this size...
const ROTATE_BYTES: usize = 10 * 1024 * 1024;
/// ...keeping this many old files (`elpis.log.1` is the newest).
const ROTATED_FILES: usize = 5;

/// Events queued for the MCP client at most (beyond, they are dropped:
/// a client that does not read must not grow memory).
const CLIENT_LOG_QUEUE: usize = 256;

/// A line said on stderr whatever the logs do (where a launcher learns a
/// port, why the process ends), prefixed `elpis-server: `, in one write:
/// stderr is unbuffered and `eprintln!` writes a line in pieces, so a
/// reader of the file could see half of it.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("elpis-server: {line}\n").as_bytes());
}

type Subscriber = Layered<EnvFilter, Registry>;

/// A log event for the MCP client, sent as `notifications/message`.
#[derive(Debug, Clone)]
pub struct ClientLogEvent {
    pub level: tracing::Level,
    pub target: String,
    pub message: String,
}

/// The client's `logging/setLevel` choice and where its events go. Until a
/// client sets a level nothing is sent (and never on stdout otherwise).
struct ClientLog {
    /// 0: none; else the most verbose level wanted (1 error .. 5 trace).
    max_verbosity: AtomicU8,
    events: Mutex<Option<mpsc::Sender<ClientLogEvent>>>,
}

static CLIENT_LOG: ClientLog = ClientLog { max_verbosity: AtomicU8::new(0), events: Mutex::new(None) };

fn verbosity(level: &tracing::Level) -> u8 {
    match *level {
        tracing::Level::ERROR => 1,
        tracing::Level::WARN => 2,
        tracing::Level::INFO => 3,
        tracing::Level::DEBUG => 4,
        tracing::Level::TRACE => 5,
    }
}

/// The client wants events at `level` and above (within what the server's
/// own filter lets through).
pub fn set_client_level(level: tracing::Level) {
    CLIENT_LOG.max_verbosity.store(verbosity(&level), Ordering::Relaxed);
}

/// Events for the client arrive on the returned channel from now on.
pub fn client_log_events() -> mpsc::Receiver<ClientLogEvent> {
    let (tx, rx) = mpsc::channel(CLIENT_LOG_QUEUE);
    *CLIENT_LOG.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    rx
}

/// Hands events the client asked for to the server's channel.
struct ClientLogLayer;

impl<S: tracing::Subscriber> Layer<S> for ClientLogLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        let wanted = CLIENT_LOG.max_verbosity.load(Ordering::Relaxed);
        let meta = event.metadata();
        // rmcp's own events come from sending these: never feed them back.
        if wanted == 0 || verbosity(meta.level()) > wanted || meta.target().starts_with("rmcp") {
            return;
        }
        let guard = CLIENT_LOG.events.lock().unwrap_or_else(|p| p.into_inner());
        let Some(events) = guard.as_ref() else { return };
        let mut message = MessageText(String::new());
        event.record(&mut message);
        let _ = events.try_send(ClientLogEvent { level: *meta.level(), target: meta.target().to_string(), message: message.0 });
    }
}

/// An event's message and fields as one line of text.
struct MessageText(String);

impl tracing::field::Visit for MessageText {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if field.name() == "message" {
            self.0.push_str(&format!("{value:?}"));
        } else {
            self.0.push_str(&format!("{}={value:?}", field.name()));
        }
    }
}
type Sink = Box<dyn Layer<Subscriber> + Send + Sync>;

/// Whether ELPIS_QUIET asks for a silent terminal.
pub fn quiet() -> bool {
    std::env::var("ELPIS_QUIET").is_ok_and(|v| !v.is_empty() && v != "0" && v.to_ascii_lowercase() != "false")
}

/// The log file used with ELPIS_QUIET=1.
pub fn default_log_file() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".elpis").join("elpis-server.log")
}

/// `logging.level` as a tracing filter: tracing's level names and Python's
/// (`WARNING`, `CRITICAL`, `NOTSET`...), in any case, or a tracing filter
/// directive (`info,elpis=debug`). None when it is neither.
pub fn level_filter(level: &str) -> Option<String> {
    let trimmed = level.trim();
    let lower = trimmed.to_ascii_lowercase();
    let name = match lower.as_str() {
        "" | "info" => "info",
        "trace" | "notset" => "trace",
        "debug" => "debug",
        "warn" | "warning" => "warn",
        "error" | "critical" | "fatal" => "error",
        "off" => "off",
        // A directive names targets: keep its case.
        _ if trimmed.contains('=') || trimmed.contains(',') => {
            return EnvFilter::try_new(trimmed).is_ok().then(|| trimmed.to_string());
        }
        _ => return None,
    };
    Some(name.to_string())
}

/// Install the global subscriber. Returns warnings to log once it is up.
pub fn init(config: &LoggingConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    let level = level_filter(&config.level).unwrap_or_else(|| {
        warnings.push(format!(
            "logging.level = {:?} is not a level: using info (levels: trace, debug, info, warning, error, \
             critical, in any case)",
            config.level
        ));
        "info".to_string()
    });
    let mut filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives).unwrap_or_else(|_| {
            warnings.push(format!("RUST_LOG = {directives:?} is not a tracing filter: using logging.level"));
            EnvFilter::new(&level)
        }),
        _ => EnvFilter::new(&level),
    };
    // llama.cpp narrates every load at info level: keep it to warnings
    // unless debugging (and quieter still when the level is).
    let llama = match level.as_str() {
        "info" => Some("warn"),
        "warn" | "error" | "off" => Some(level.as_str()),
        _ => None,
    };
    if let Some(d) = llama.and_then(|l| format!("llama-cpp-2={l}").parse().ok()) {
        filter = filter.add_directive(d);
    }
    let json = config.format == "json";
    let mut sinks: Vec<Sink> = Vec::new();
    let quiet_file = quiet().then(default_log_file);
    match &quiet_file {
        Some(path) => match open_rotating(path) {
            Ok(file) => sinks.push(sink(Mutex::new(file), false, json)),
            // Nowhere to say it in quiet mode but the extra file, if any.
            Err(e) => warnings.push(format!("cannot write the quiet-mode log file {}: {e}", path.display())),
        },
        None => sinks.push(sink(std::io::stderr, std::io::stderr().is_terminal(), json)),
    }
    let extra = config.output_file.trim();
    if !extra.is_empty() {
        let path = absolute(Path::new(extra));
        if quiet_file.as_ref().is_some_and(|q| absolute(q) == path) {
            // Already the quiet-mode sink.
        } else {
            match open_rotating(&path) {
                Ok(file) => sinks.push(sink(Mutex::new(file), false, json)),
                Err(e) => warnings.push(format!(
                    "logging.output_file = {extra:?} cannot be written ({e}): logging to {} only",
                    if quiet_file.is_some() { "the quiet-mode file" } else { "stderr" }
                )),
            }
        }
    }
    let _ = tracing_subscriber::registry().with(filter).with(sinks).with(ClientLogLayer).try_init();
    warnings
}

/// One formatting layer over `writer`.
fn sink<W>(writer: W, ansi: bool, json: bool) -> Sink
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi);
    if json {
        layer.json().boxed()
    } else {
        layer.boxed()
    }
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    }
}

/// A size-rotated log file at `path`, its folder created. Checked here
/// first, because the rotating writer panics on a folder it cannot create.
fn open_rotating(path: &Path) -> std::io::Result<FileRotate<AppendCount>> {
    let path = absolute(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    Ok(FileRotate::new(
        path,
        AppendCount::new(ROTATED_FILES),
        ContentLimit::BytesSurpassed(ROTATE_BYTES),
        Compression::None,
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_level_names_in_any_case() {
        for (given, wanted) in [
            ("WARNING", "warn"),
            ("warning", "warn"),
            ("CRITICAL", "error"),
            ("Error", "error"),
            ("DEBUG", "debug"),
            ("INFO", "info"),
            ("NOTSET", "trace"),
            ("", "info"),
            (" warn ", "warn"),
        ] {
            assert_eq!(level_filter(given).as_deref(), Some(wanted), "{given}");
        }
        assert_eq!(level_filter("info,elpis=debug").as_deref(), Some("info,elpis=debug"));
        assert_eq!(level_filter("loud"), None);
    }

    #[test]
    fn a_rotating_file_is_created_with_its_folder_and_rotates() {
        let dir = std::env::temp_dir().join(format!("elpis-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("nested/elpis.log");
        let mut file = open_rotating(&path).unwrap();
        use std::io::Write;
        let line = vec![b'x'; 1024];
        for _ in 0..(ROTATE_BYTES / 1024 + 2) {
            file.write_all(&line).unwrap();
        }
        file.flush().unwrap();
        assert!(path.exists() && dir.join("nested/elpis.log.1").exists());
        assert!(open_rotating(Path::new("/proc/elpis-cannot-write/x.log")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
