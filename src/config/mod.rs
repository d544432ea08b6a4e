//! Configuration: a TOML file (`configs/elpis.toml` by default) overridden by
//! environment variables, validated into [`Config`].
//!
//! Loading happens in two stages, as in ripgrep: the raw layers (file table,
//! then `ELPIS_SECTION_KEY` / `ELPIS_SECTION__KEY` variables on top) are merged
//! into one TOML table, which serde turns into typed settings; then
//! [`Config::validate`] checks every range. Errors name the key (or the
//! variable) and the fix.
//!
//! Configs written for the Python predecessor keep working: its documented
//! values are accepted (mapped where they mean something here, else warned
//! about once, naming what happens instead: [`legacy`]), variable names
//! match in any case as its settings did ([`env`]), and cross-field
//! conflicts it tolerated are clamped with a warning instead of refusing to
//! start.

mod env;
mod legacy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::emotion::EmotionParams;
use crate::engine::{EngineSettings, GpuLayers, KvType, PinThreads, Speculation, SteeringSettings};
use crate::prompt::ChatFormat;

use env::apply_env;
use legacy::{hardware_backend_meaning, HARDWARE_BACKENDS, TRANSFORMERS_KEYS};

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "configs/elpis.toml";

/// The file name `scripts/fetch-model.sh qwen` stores the default model
/// (Qwen2.5-Coder-0.5B-Instruct, an instruction-tuned model with native
/// tool calls) under.
pub const DEFAULT_MODEL_FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("bad configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub model: ModelConfig,
    pub emotion: EmotionParams,
    pub logging: LoggingConfig,
    pub server: ServerConfig,
}

/// Limits of the MCP server itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Streams that may exist at once.
    pub max_streams: usize,
    /// A stream older than this is stopped and removed when the next starts.
    pub stream_max_age_s: f64,
    /// A stream nobody read for this long stops generating (its text so far
    /// stays readable, ending with `finish_reason: "abandoned"`).
    pub stream_idle_s: f64,
    /// Generations that may wait for a slot; more are refused as busy.
    pub max_queued: usize,
    /// Longest input line; a longer one is discarded as it streams in and
    /// refused with a JSON-RPC error.
    pub max_line_bytes: usize,
    /// Prompt prefixes kept in host memory when a slot is given to another
    /// conversation, in MiB (0: none).
    pub prompt_cache_ram_mib: usize,
    /// Prompt prefixes kept on disk across restarts, in MiB (0: none).
    pub prompt_cache_disk_mib: usize,
    /// Serve MCP over streamable HTTP at this address (`host:port`) instead
    /// of stdio; empty: stdio. The command line's `--http` wins.
    pub http: String,
    /// Bearer token HTTP clients must send (required off loopback).
    pub http_token: String,
    /// PEM certificate chain and key for HTTPS.
    pub http_tls_cert: String,
    pub http_tls_key: String,
    /// Browser origins allowed to call (`https://app.example:443`); any
    /// other `Origin` header gets 403.
    pub http_allowed_origins: Vec<String>,
    /// Host names accepted in the `Host` header besides loopback and the
    /// address listened on.
    pub http_allowed_hosts: Vec<String>,
    /// HTTP sessions open at once.
    pub max_sessions: usize,
    /// An HTTP session idle this long ends.
    pub http_session_idle_s: f64,
    /// Relay stdio to a remote Elpis at this URL (`https://host:port/mcp`);
    /// empty: serve here. The command line's `--remote` wins.
    pub remote: String,
    /// A PEM certificate the bridge trusts for the remote's HTTPS, besides
    /// the system's roots (for a self-signed remote).
    pub remote_ca: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_streams: 100,
            stream_max_age_s: 600.0,
            stream_idle_s: 10.0,
            max_queued: 64,
            max_line_bytes: 16 * 1024 * 1024,
            prompt_cache_ram_mib: 512,
            prompt_cache_disk_mib: 1024,
            http: String::new(),
            http_token: String::new(),
            http_tls_cert: String::new(),
            http_tls_key: String::new(),
            http_allowed_origins: Vec::new(),
            http_allowed_hosts: Vec::new(),
            max_sessions: 16,
            http_session_idle_s: 300.0,
            remote: String::new(),
            remote_ca: String::new(),
        }
    }
}

/// What to do with a prompt longer than the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Refuse it with a clear error.
    Error,
    /// Keep the system message and the most recent turns, drop the oldest.
    Truncate,
}

/// How `function_call` asks the model for calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolFormat {
    /// The model's own format when its template renders tools (Hermes/Qwen,
    /// Llama 3.x, Mistral), else the generic one.
    Auto,
    /// Always the generic JSON-array prompt and grammar.
    Generic,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// GGUF file. Empty means the cached default model of `scripts/fetch-model.sh`.
    pub path: String,
    /// Tokens of context each generation may use (prompt + reply).
    pub context_length: u32,
    /// Layers offloaded to the GPU (a `cuda` or `vulkan` build) or to
    /// `rpc_servers`: a count (0: CPU only), `auto` (all that fit in free
    /// device memory; none without a GPU) or `all`.
    pub gpu_layers: GpuLayers,
    /// llama.cpp compute threads; 0 = one per available core.
    pub n_threads: u32,
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: u32,
    /// `cpu`, `cuda` or `auto`; informational apart from validation.
    pub hardware_backend: String,
    /// `auto` (the GGUF's Jinja template, else inferred from the
    /// architecture), `jinja` (the template, required), or a built-in format:
    /// `gemma`, `chatml`, `llama-3`, `mistral`, `phi-3`, ..., `raw`.
    pub chat_format: String,
    /// `auto` (native tool calls where the model has them) or `generic`.
    pub tool_format: ToolFormat,
    pub top_k: u32,
    pub min_p: f64,
    pub repeat_penalty: f64,
    /// Sampling seed; unset means a fresh random seed per generation.
    pub seed: Option<u32>,
    /// Generations decoded together (KV sequences / slots).
    pub parallel: u32,
    /// Target duration of one decode step; prompt chunks adapt to it.
    pub max_step_ms: u32,
    /// Keep full-size sliding-window caches so cached prompt prefixes can be
    /// reused on models with sliding-window attention (costs memory).
    pub swa_full: bool,
    pub overflow: Overflow,
    /// ggml RPC workers (`host:port`) the model's layers go to (with
    /// `gpu_layers`); env: comma-separated.
    pub rpc_servers: Vec<String>,
    /// `f16` (default), `q8_0` or `q4_0`: the KV cache's type (quantized
    /// halves or quarters its memory; flash attention is turned on for it).
    pub kv_cache_type: String,
    /// `auto` (speculative decoding from the text where it pays), `off`, or
    /// `always` (draft whenever a draft is found: for tests and measurements).
    pub speculative: String,
    /// Q5_0 weights held as Q8_0 where every layer is on the CPU: the same
    /// values, faster kernels, more memory (a copy of the model file in the
    /// cache folder, made once).
    pub wide_weights: bool,
    /// Weights read into memory held in 2 MiB pages (where every layer is
    /// on the CPU and the kernel offers transparent huge pages), not mapped
    /// from the file.
    pub huge_pages: bool,
    /// `auto` (hold the compute threads one to a CPU where they are as many
    /// as the CPUs the process may use and every layer is on the CPU), `on`
    /// or `off`.
    pub pin_threads: String,
    /// Backend of the predecessor; only `llama-cpp` is served.
    pub backend: String,
    /// The predecessor's steering keys (its transformers backend read them
    /// here): now mean `emotion.vectors_path` and a single steered layer.
    pub emotion_vectors_dir: String,
    pub steering_layer: Option<u32>,
    /// Anything else in `[model]`: warned about and ignored.
    #[serde(flatten)]
    pub ignored: BTreeMap<String, toml::Value>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            path: String::new(),
            context_length: 4096,
            gpu_layers: GpuLayers::Auto,
            n_threads: 0,
            temperature: 0.7,
            top_p: 0.9,
            max_tokens: 2048,
            hardware_backend: "auto".into(),
            chat_format: "auto".into(),
            tool_format: ToolFormat::Auto,
            top_k: 40,
            min_p: 0.05,
            repeat_penalty: 1.1,
            seed: None,
            parallel: 2,
            max_step_ms: 50,
            swa_full: true,
            overflow: Overflow::Error,
            speculative: "auto".into(),
            wide_weights: true,
            huge_pages: true,
            pin_threads: "auto".into(),
            kv_cache_type: "f16".into(),
            rpc_servers: Vec::new(),
            backend: "llama-cpp".into(),
            emotion_vectors_dir: String::new(),
            steering_layer: None,
            ignored: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// `trace`, `debug`, `info`, `warn` or `error` (or a tracing filter).
    pub level: String,
    /// Log file; empty means stderr (or `~/.elpis/elpis-server.log` with ELPIS_QUIET=1).
    pub output_file: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { level: "info".into(), output_file: String::new(), format: "text".into() }
    }
}

/// Where the default model lives: the cache of `scripts/fetch-model.sh`.
pub fn default_model_path() -> PathBuf {
    cache_dir().join(DEFAULT_MODEL_FILE)
}

/// The cache: `ELPIS_CACHE_DIR`, else `~/.cache/elpis` (models, vectors).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("ELPIS_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/elpis")))
        .unwrap_or_else(|| PathBuf::from(".cache/elpis"))
}

impl Config {
    /// Load from `path` (or the default path, which may be absent), apply the
    /// process environment, validate. Returns the config and warnings to log
    /// once logging is up.
    pub fn load(path: Option<&Path>) -> Result<(Config, Vec<String>), ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    /// [`Config::load`] with an explicit environment (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let (file_path, must_exist) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let (mut table, file_read) = match std::fs::read_to_string(&file_path) {
            Ok(text) => {
                let table = text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
                    path: file_path.clone(),
                    message: e.to_string(),
                })?;
                (table, true)
            }
            Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => (toml::Table::new(), false),
            Err(source) => return Err(ConfigError::Read { path: file_path, source }),
        };
        let mut warnings = apply_env(&mut table, env)?;
        // Variables are checked against each key's type above, so what fails
        // here came from the file: name it (and only when there is one).
        let mut config: Config = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
            if file_read {
                ConfigError::Invalid(format!("{e} (in {})", file_path.display()))
            } else {
                ConfigError::Invalid(e.to_string())
            }
        })?;
        warnings.extend(config.validate()?);
        Ok((config, warnings))
    }

    /// Check every value. Conflicts between two keys that the predecessor
    /// tolerated are clamped here; returns warnings (ignored keys, values
    /// mapped or clamped) to log once logging is up.
    pub fn validate(&mut self) -> Result<Vec<String>, ConfigError> {
        let mut warnings = Vec::new();
        let m = &mut self.model;
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        match m.backend.as_str() {
            "llama-cpp" | "llama_cpp" | "llamacpp" | "" => {}
            "transformers" => {
                return bad("model.backend = \"transformers\" is not supported: Elpis serves GGUF models \
                     through llama.cpp only; set model.backend = \"llama-cpp\" and model.path to a .gguf file"
                    .into())
            }
            other => return bad(format!("model.backend = {other:?} is unknown: the only backend is \"llama-cpp\"")),
        }
        if !(256..=1_048_576).contains(&m.context_length) {
            return bad(format!("model.context_length = {} is out of range: expected 256 to 1048576", m.context_length));
        }
        if m.max_tokens == 0 {
            return bad("model.max_tokens = 0 is out of range: expected at least 1".into());
        }
        if m.max_tokens > m.context_length {
            warnings.push(format!(
                "model.max_tokens = {} is larger than model.context_length ({}): using {}",
                m.max_tokens, m.context_length, m.context_length
            ));
            m.max_tokens = m.context_length;
        }
        if m.n_threads > 512 {
            return bad(format!("model.n_threads = {} is out of range: expected 0 (auto) to 512", m.n_threads));
        }
        // u32::MAX is `all`.
        if let GpuLayers::Count(n @ 100_001..=0xFFFF_FFFE) = m.gpu_layers {
            return bad(format!("model.gpu_layers = {n} is out of range: expected 0 to 100000, \"auto\" or \"all\""));
        }
        let in_range = |key: &str, v: f64, lo: f64, hi: f64| -> Result<(), ConfigError> {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Invalid(format!("model.{key} = {v} is out of range: expected {lo} to {hi}")))
            }
        };
        in_range("temperature", m.temperature, 0.0, 2.0)?;
        in_range("top_p", m.top_p, 0.0, 1.0)?;
        in_range("min_p", m.min_p, 0.0, 1.0)?;
        in_range("repeat_penalty", m.repeat_penalty, 0.5, 2.0)?;
        if !(1..=64).contains(&m.parallel) {
            return bad(format!("model.parallel = {} is out of range: expected 1 to 64", m.parallel));
        }
        if !(5..=10_000).contains(&m.max_step_ms) {
            return bad(format!("model.max_step_ms = {} is out of range: expected 5 to 10000", m.max_step_ms));
        }
        m.speculative = m.speculative.trim().to_ascii_lowercase();
        if !["auto", "off", "always"].contains(&m.speculative.as_str()) {
            return bad(format!("model.speculative = {:?} is unknown: expected \"auto\", \"off\" or \"always\"", m.speculative));
        }
        m.pin_threads = m.pin_threads.trim().to_ascii_lowercase();
        if PinThreads::parse(&m.pin_threads).is_none() {
            return bad(format!("model.pin_threads = {:?} is unknown: expected \"auto\", \"on\" or \"off\"", m.pin_threads));
        }
        if KvType::parse(&m.kv_cache_type).is_none() {
            return bad(format!("model.kv_cache_type = {:?} is unknown: expected \"f16\", \"q8_0\" or \"q4_0\"", m.kv_cache_type));
        }
        m.hardware_backend = m.hardware_backend.trim().to_ascii_lowercase();
        if !HARDWARE_BACKENDS.contains(&m.hardware_backend.as_str()) {
            return bad(format!(
                "model.hardware_backend = {:?} is unknown: expected one of {}",
                m.hardware_backend,
                HARDWARE_BACKENDS.join(", ")
            ));
        }
        if let Some(warning) = hardware_backend_meaning(m) {
            warnings.push(warning);
        }
        if ChatFormat::parse(&m.chat_format).is_none() {
            if ChatFormat::is_foreign(&m.chat_format) {
                warnings.push(format!(
                    "model.chat_format = {:?} (a llama-cpp-python format) has no equivalent here: \
                     using auto (the model's own template, else one chosen by its architecture)",
                    m.chat_format
                ));
            } else {
                return bad(format!(
                    "model.chat_format = {:?} is unknown: expected one of {}",
                    m.chat_format,
                    ChatFormat::NAMES.join(", ")
                ));
            }
        }
        warnings.extend(self.emotion.validate().map_err(ConfigError::Invalid)?);
        let m = &self.model;
        if !(1..=100_000).contains(&self.server.max_streams) {
            return bad(format!("server.max_streams = {} is out of range: expected 1 to 100000", self.server.max_streams));
        }
        let age = self.server.stream_max_age_s;
        if !age.is_finite() || !(0.001..=31_536_000.0).contains(&age) {
            return bad(format!("server.stream_max_age_s = {age} is out of range: expected 0.001 to 31536000"));
        }
        let idle = self.server.stream_idle_s;
        if !idle.is_finite() || !(0.05..=31_536_000.0).contains(&idle) {
            return bad(format!("server.stream_idle_s = {idle} is out of range: expected 0.05 to 31536000"));
        }
        if !(1..=100_000).contains(&self.server.max_queued) {
            return bad(format!("server.max_queued = {} is out of range: expected 1 to 100000", self.server.max_queued));
        }
        if !(1..=10_000).contains(&self.server.max_sessions) {
            return bad(format!("server.max_sessions = {} is out of range: expected 1 to 10000", self.server.max_sessions));
        }
        let idle = self.server.http_session_idle_s;
        if !idle.is_finite() || !(1.0..=31_536_000.0).contains(&idle) {
            return bad(format!("server.http_session_idle_s = {idle} is out of range: expected 1 to 31536000"));
        }
        for (key, mib) in [("prompt_cache_ram_mib", self.server.prompt_cache_ram_mib), ("prompt_cache_disk_mib", self.server.prompt_cache_disk_mib)] {
            if mib > 1 << 24 {
                return bad(format!("server.{key} = {mib} is out of range: expected 0 to 16777216"));
            }
        }
        for (i, worker) in self.model.rpc_servers.iter().enumerate() {
            if worker.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()) {
                return bad(format!("model.rpc_servers[{i}] = {worker:?} is not host:port"));
            }
        }
        if !(1024..=1 << 30).contains(&self.server.max_line_bytes) {
            return bad(format!(
                "server.max_line_bytes = {} is out of range: expected 1024 to 1073741824",
                self.server.max_line_bytes
            ));
        }
        if !["text", "json"].contains(&self.logging.format.as_str()) {
            return bad(format!("logging.format = {:?} is unknown: expected \"text\" or \"json\"", self.logging.format));
        }
        warnings.extend(m.ignored.keys().map(|key| {
            if TRANSFORMERS_KEYS.contains(&key.as_str()) {
                format!("model.{key} belongs to the old transformers backend and is ignored")
            } else {
                format!("model.{key} is not a known setting and is ignored")
            }
        }));
        Ok(warnings)
    }

    /// The model file to load: `model.path`, else the fetched default.
    pub fn model_path(&self) -> PathBuf {
        if self.model.path.is_empty() {
            default_model_path()
        } else {
            PathBuf::from(&self.model.path)
        }
    }

    /// What the engine needs of this config to load the model and schedule.
    pub fn engine_settings(&self) -> EngineSettings {
        let m = &self.model;
        EngineSettings {
            model_path: self.model_path(),
            context_length: m.context_length,
            gpu_layers: m.gpu_layers,
            n_threads: m.n_threads,
            chat_format: ChatFormat::parse(&m.chat_format).unwrap_or(ChatFormat::Auto),
            parallel: m.parallel,
            max_step_ms: m.max_step_ms,
            swa_full: m.swa_full,
            truncate_overflow: m.overflow == Overflow::Truncate,
            speculative: match m.speculative.as_str() {
                "off" => Speculation::Off,
                "always" => Speculation::Always,
                _ => Speculation::Auto,
            },
            steering: self.steering_settings(),
            cache_dir: cache_dir(),
            prompt_cache_ram_mib: self.server.prompt_cache_ram_mib,
            prompt_cache_disk_mib: self.server.prompt_cache_disk_mib,
            kv_cache_type: KvType::parse(&m.kv_cache_type).unwrap_or(KvType::F16),
            rpc_servers: m.rpc_servers.clone(),
            wide_weights: m.wide_weights,
            huge_pages: m.huge_pages,
            pin_threads: PinThreads::parse(&m.pin_threads).unwrap_or_default(),
        }
    }

    /// Settings for a one-shot measurement or `vectors` run: steering on
    /// whatever `emotion.steering` says, and missing vectors not computed in
    /// the background (those commands compute them themselves).
    pub fn measurement_settings(&self) -> EngineSettings {
        let mut settings = self.engine_settings();
        settings.steering.enabled = true;
        settings.steering.compute_missing = false;
        settings
    }

    /// `[emotion]` steering, with the predecessor's `[model]` keys honoured.
    pub fn steering_settings(&self) -> SteeringSettings {
        let e = &self.emotion;
        let m = &self.model;
        let path = [&e.vectors_path, &e.emotion_vectors_dir, &m.emotion_vectors_dir]
            .into_iter()
            .find(|p| !p.trim().is_empty())
            .map(PathBuf::from);
        let layers = e.layer_range().or(m.steering_layer.map(|l| (l as usize, l as usize)));
        SteeringSettings {
            enabled: e.steering == "auto",
            vectors_path: path,
            cache_dir: cache_dir(),
            layers,
            compute_missing: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn write_config(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::with_contents(text)
    }

    /// A minimal temporary file helper (no extra crate).
    mod tempfile_path {
        use super::*;
        pub struct TempPath(pub PathBuf);
        impl TempPath {
            pub fn with_contents(text: &str) -> Self {
                static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = std::env::temp_dir().join(format!("elpis-config-{}-{n}.toml", std::process::id()));
                let mut f = std::fs::File::create(&path).unwrap();
                f.write_all(text.as_bytes()).unwrap();
                TempPath(path)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn defaults_without_a_file() {
        let (c, warnings) = Config::load_with_env(None, &[]).unwrap();
        assert_eq!(c.model.context_length, 4096);
        assert_eq!(c.emotion, EmotionParams::default());
        assert!(warnings.is_empty());
    }

    #[test]
    fn file_then_env_both_spellings() {
        let f = write_config("[model]\npath = \"/from/file.gguf\"\nn_threads = 3\n[emotion]\ndecay_rate = 0.2\n");
        let e = env(&[("ELPIS_MODEL_PATH", "/from/env.gguf"), ("ELPIS_EMOTION__DECAY_RATE", "0.5"), ("ELPIS_QUIET", "1")]);
        let (c, _) = Config::load_with_env(Some(&f.0), &e).unwrap();
        assert_eq!(c.model.path, "/from/env.gguf");
        assert_eq!(c.model.n_threads, 3);
        assert_eq!(c.emotion.decay_rate, 0.5);
        let e = env(&[("ELPIS_MODEL__PATH", "/double.gguf"), ("ELPIS_LOGGING_LEVEL", "debug")]);
        let (c, _) = Config::load_with_env(Some(&f.0), &e).unwrap();
        assert_eq!(c.model.path, "/double.gguf");
        assert_eq!(c.logging.level, "debug");
    }

    #[test]
    fn transformers_keys_are_ignored_with_a_warning() {
        let f = write_config("[model]\ntorch_dtype = \"float16\"\nload_in_8bit = true\n");
        let (_, warnings) = Config::load_with_env(Some(&f.0), &[]).unwrap();
        assert_eq!(warnings.len(), 2);
        assert!(warnings.iter().any(|w| w.contains("model.torch_dtype") && w.contains("transformers")));
    }

    #[test]
    fn the_old_steering_keys_mean_the_vectors_folder_and_one_layer() {
        let f = write_config("[model]\nemotion_vectors_dir = \"/old/vectors\"\nsteering_layer = 12\n");
        let (c, warnings) = Config::load_with_env(Some(&f.0), &[]).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let s = c.steering_settings();
        assert_eq!((s.vectors_path, s.layers, s.enabled), (Some(PathBuf::from("/old/vectors")), Some((12, 12)), true));
        let f = write_config("[emotion]\nsteering = \"OFF\"\nvectors_path = \"/v\"\nsteering_layers = \"8-15\"\n");
        let (c, _) = Config::load_with_env(Some(&f.0), &[]).unwrap();
        let s = c.steering_settings();
        assert_eq!((s.vectors_path, s.layers, s.enabled), (Some(PathBuf::from("/v")), Some((8, 15)), false));
        let f = write_config("[emotion]\nsteering = \"sometimes\"\n");
        assert!(Config::load_with_env(Some(&f.0), &[]).unwrap_err().to_string().contains("emotion.steering"));
        let f = write_config("[emotion]\nsteering_layers = \"high\"\n");
        assert!(Config::load_with_env(Some(&f.0), &[]).unwrap_err().to_string().contains("emotion.steering_layers"));
    }

    #[test]
    fn transformers_backend_is_refused() {
        let f = write_config("[model]\nbackend = \"transformers\"\n");
        let err = Config::load_with_env(Some(&f.0), &[]).unwrap_err().to_string();
        assert!(err.contains("transformers") && err.contains("not supported"), "{err}");
    }

    #[test]
    fn wrong_types_and_ranges_name_the_key() {
        let f = write_config("[model]\ncontext_length = \"big\"\n");
        let err = Config::load_with_env(Some(&f.0), &[]).unwrap_err().to_string();
        assert!(err.contains("context_length"), "{err}");
        let err = Config::load_with_env(None, &env(&[("ELPIS_MODEL_TOP_P", "1.5")])).unwrap_err().to_string();
        assert!(err.contains("model.top_p") && err.contains("0 to 1"), "{err}");
        let err = Config::load_with_env(None, &env(&[("ELPIS_EMOTION_STEERING_STRENGTH", "9")])).unwrap_err().to_string();
        assert!(err.contains("emotion.steering_strength"), "{err}");
        let err = Config::load_with_env(None, &env(&[("ELPIS_MODEL_CHAT_FORMAT", "klingon")])).unwrap_err().to_string();
        assert!(err.contains("model.chat_format"), "{err}");
        let f = write_config("[emotion]\nbogus = 1\n");
        let err = Config::load_with_env(Some(&f.0), &[]).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn the_predecessors_documented_values_are_accepted() {
        let f = write_config("[model]\nhardware_backend = \"ROCm\"\ngpu_layers = 20\nchat_format = \"llama-2\"\n");
        let (c, warnings) = Config::load_with_env(Some(&f.0), &[]).unwrap();
        let rocm_layers = if cfg!(feature = "vulkan") { 20 } else { 0 };
        assert_eq!(c.model.gpu_layers, GpuLayers::Count(rocm_layers), "AMD cards go through the Vulkan build");
        assert_eq!(c.engine_settings().chat_format, ChatFormat::Llama2);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("hardware_backend = \"rocm\""), "{warnings:?}");
        for (format, expected) in [("alpaca", ChatFormat::Alpaca), ("vicuna", ChatFormat::Vicuna), ("zephyr", ChatFormat::Zephyr)] {
            let (c, w) = Config::load_with_env(None, &env(&[("ELPIS_MODEL_CHAT_FORMAT", format)])).unwrap();
            assert_eq!((c.engine_settings().chat_format, w.len()), (expected, 0));
        }
        let (c, w) = Config::load_with_env(None, &env(&[("ELPIS_MODEL_CHAT_FORMAT", "saiga")])).unwrap();
        assert_eq!(c.engine_settings().chat_format, ChatFormat::Auto);
        assert!(w[0].contains("saiga") && w[0].contains("auto"), "{w:?}");
        let (c, w) = Config::load_with_env(None, &env(&[("ELPIS_MODEL_HARDWARE_BACKEND", "cpu"), ("ELPIS_MODEL_GPU_LAYERS", "99")])).unwrap();
        assert_eq!(c.model.gpu_layers, GpuLayers::Count(0));
        assert!(w[0].contains("gpu_layers = 99"), "{w:?}");
        for (raw, expected) in [("auto", GpuLayers::Auto), ("35", GpuLayers::Count(35)), ("all", GpuLayers::Count(u32::MAX))] {
            let (c, _) = Config::load_with_env(None, &env(&[("ELPIS_MODEL_GPU_LAYERS", raw)])).unwrap();
            assert_eq!(c.model.gpu_layers, expected);
        }
        assert!(Config::load_with_env(None, &env(&[("ELPIS_MODEL_GPU_LAYERS", "lots")])).is_err());
        assert!(Config::load_with_env(None, &env(&[("ELPIS_MODEL_GPU_LAYERS", "200000")])).is_err());
    }

    #[test]
    fn cross_field_conflicts_are_clamped_with_warnings() {
        let f = write_config("[model]\ncontext_length = 1024\nmax_tokens = 4096\n[emotion]\ntrajectory_history_size = 4\n");
        let (c, warnings) = Config::load_with_env(Some(&f.0), &[]).unwrap();
        assert_eq!(c.model.max_tokens, 1024);
        assert_eq!(c.emotion.spiral_history_count, 4);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("model.max_tokens = 4096") && warnings[0].contains("using 1024"), "{warnings:?}");
    }

    #[test]
    fn missing_explicit_file_and_bad_toml() {
        let err = Config::load_with_env(Some(Path::new("/no/such/elpis.toml")), &[]).unwrap_err().to_string();
        assert!(err.contains("/no/such/elpis.toml"), "{err}");
        let f = write_config("[model\npath=");
        let err = Config::load_with_env(Some(&f.0), &[]).unwrap_err().to_string();
        assert!(err.contains("not valid TOML"), "{err}");
    }
}
