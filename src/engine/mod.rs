//! The engine: the one owner of llama.cpp (model, context, batches,
//! samplers) and the scheduler that steps generations on the runtime's only
//! thread.
//!
//! Everything here that touches llama.cpp lives in [`Engine`], which is
//! `!Send`: it cannot be moved to another thread, so the crash of the Python
//! predecessor (a context used from two threads) cannot be written. The rest
//! of the program talks to it through [`EngineHandle`] (cheap to clone, `Send`),
//! which queues [`GenerationRequest`]s and hands back a [`Generation`]: a
//! channel of [`GenerationEvent`]s plus a cancellation token.
//!
//! The engine loop performs one `decode` per step (one token for every
//! generating slot plus a chunk of pending prompt tokens) and then yields to
//! the runtime, so MCP requests are answered between tokens.

mod chat_format;
mod native_tools;
mod prompt;
mod raw;
mod scheduler;
mod steering;
mod sys;
mod template;
mod text;
mod tool_calls;
mod vectors;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use chat_format::{ChatFormat, Message, ROLES};
pub use native_tools::{call_schema, reply_grammar, template_tools, triggers, NativeReply};
pub use prompt::Segment;
pub use raw::{raw_speed, RawSpeed};
pub use template::{ChatTemplate, NativeToolFormat};
pub use scheduler::{route_llama_logs, Engine};
pub use steering::{default_layers, SteeringReport, SteeringSettings};
pub use vectors::{read_gguf, write_gguf, DirectionSet, Reduction, QUADRANTS};
pub use text::TextDecoder;
pub use tool_calls::{apply_tool_choice, openai_call, parse_reply, parse_tools, reply_schema, tools_prompt, ToolSpec};

/// Settings the engine is built from (the `[model]` section, resolved).
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub model_path: PathBuf,
    pub context_length: u32,
    pub gpu_layers: u32,
    /// 0 = one per available core.
    pub n_threads: u32,
    pub chat_format: ChatFormat,
    pub parallel: u32,
    pub max_step_ms: u32,
    pub swa_full: bool,
    /// Drop old turns instead of refusing a prompt that does not fit.
    pub truncate_overflow: bool,
    pub steering: SteeringSettings,
}

/// Sampling for one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: u32,
    pub min_p: f64,
    pub repeat_penalty: f64,
    pub seed: u32,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    /// A GBNF grammar constraining the reply.
    pub grammar: Option<Grammar>,
    /// Tools for the model's own template (native tool calls), OpenAI shape.
    pub tools: Option<Vec<serde_json::Value>>,
    /// For a polled stream, how recently its reader showed up; None when a
    /// client waits on the call itself (`generate`, `function_call`).
    pub interest: Option<Interest>,
}

/// A grammar for one reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Grammar {
    /// GBNF, root rule `root`.
    pub gbnf: String,
    /// Lazy grammar: regular expressions that start it when the reply so far
    /// matches one (the first group's start is where the grammar applies).
    /// Empty: the grammar holds from the first token.
    pub triggers: Vec<String>,
}

/// Parse a native reply (see [`native_tools`]).
pub fn parse_native(format: NativeToolFormat, text: &str, tools: &[ToolSpec]) -> Result<NativeReply, String> {
    native_tools::parse(format, text, tools)
}

/// Shortest silence after which a polled stream counts as unattended...
const MIN_ATTENTION_S: f64 = 0.25;
/// ...or this many of its own poll intervals, if longer.
const ATTENTION_INTERVALS: f64 = 4.0;
/// Before its first poll a stream counts as attended this long.
const FIRST_POLL_GRACE_S: f64 = 1.0;

/// How recently a client read a stream, shared by the stream registry
/// (which touches it on every poll) and the scheduler (which lets work a
/// client is waiting on right now go before a stream nobody reads).
#[derive(Debug, Clone)]
pub struct Interest(Arc<Mutex<InterestState>>);

#[derive(Debug)]
struct InterestState {
    last: Instant,
    /// Moving average of the time between polls, once there was one.
    interval_s: Option<f64>,
}

impl Interest {
    pub fn new(now: Instant) -> Self {
        Interest(Arc::new(Mutex::new(InterestState { last: now, interval_s: None })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, InterestState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A poll at `now`.
    pub fn touch(&self, now: Instant) {
        let mut s = self.state();
        let gap = now.saturating_duration_since(s.last).as_secs_f64();
        s.interval_s = Some(match s.interval_s {
            Some(avg) => 0.7 * avg + 0.3 * gap,
            None => gap,
        });
        s.last = now;
    }

    /// Seconds since the last poll (or the start).
    pub fn idle_s(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.state().last).as_secs_f64()
    }

    /// Whether the reader is still there: it polled within a few of its own
    /// intervals (at least [`MIN_ATTENTION_S`]).
    pub fn attended(&self, now: Instant) -> bool {
        let s = self.state();
        let idle = now.saturating_duration_since(s.last).as_secs_f64();
        let patience = match s.interval_s {
            Some(interval) => (ATTENTION_INTERVALS * interval).max(MIN_ATTENTION_S),
            None => FIRST_POLL_GRACE_S,
        };
        idle <= patience
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// End-of-generation token or stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// Cancelled by the client.
    Cancelled,
    /// A stream nobody read for `server.stream_idle_s`: stopped by the
    /// server (never by the engine), its text so far kept readable.
    Abandoned,
}

/// Token accounting of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    /// Prompt tokens served from the slot's KV cache instead of decoded.
    pub cached_tokens: u32,
    pub completion_tokens: u32,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// Old turns were dropped to fit the context.
    pub truncated: bool,
}

/// What a generation reports as it runs. Exactly one `Done` or `Failed` ends
/// the channel.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// New text, always valid UTF-8, never part of a stop string.
    Text(String),
    /// Completed tokens so far (sent with each token, text or not).
    Tokens(u32),
    Done(Completion),
    Failed(EngineError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("model file not found at {0}: set [model] path or ELPIS_MODEL_PATH (scripts/fetch-model.sh fetches the default model)")]
    ModelNotFound(PathBuf),
    #[error("model path {0} is a directory, not a GGUF file: set [model] path or ELPIS_MODEL_PATH to the .gguf file")]
    ModelIsDirectory(PathBuf),
    #[error("cannot read model file {path}: {reason}")]
    ModelUnreadable { path: PathBuf, reason: String },
    #[error("llama.cpp could not load {0} (truncated or not a GGUF model?): check the file, or fetch it again")]
    ModelLoad(PathBuf),
    #[error("cannot create a llama.cpp context of {0} tokens: lower model.context_length or model.parallel")]
    Context(u32),
    #[error("cannot initialise llama.cpp: {0}")]
    Backend(String),
    #[error("the prompt is {prompt} tokens but a generation may use at most {limit} (context_length {context}): shorten the messages, raise model.context_length, or set model.overflow = \"truncate\"")]
    PromptTooLong { prompt: usize, limit: usize, context: u32 },
    #[error("the model's chat template cannot render this conversation: {0} (set model.chat_format to a built-in format to avoid the template)")]
    Template(String),
    #[error("cannot build a grammar: {0}")]
    Grammar(String),
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// Facts about the loaded model, for `get_capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub model_path: String,
    pub model_name: String,
    pub architecture: String,
    /// Tokens one generation may use (prompt + reply).
    pub context_length: u32,
    pub context_length_train: u32,
    pub parameters: u64,
    pub model_size_bytes: u64,
    pub vocab_size: i32,
    pub chat_format: String,
    /// The GGUF carries its own chat template (used when `chat_format` is auto).
    pub has_chat_template: bool,
    /// How the model writes tool calls natively, when its template renders
    /// tools and is in use; None: the generic JSON-array path.
    #[serde(skip)]
    pub native_tools: Option<NativeToolFormat>,
    pub threads: u32,
    pub gpu_layers: u32,
    pub gpu_offload_supported: bool,
    pub slots: u32,
    pub max_step_ms: u32,
    pub sliding_window_full: bool,
}

/// A running generation, as the caller sees it.
pub struct Generation {
    pub events: mpsc::UnboundedReceiver<GenerationEvent>,
    /// Cancel to stop decoding at the next step. Dropping `events` does too.
    pub cancel: CancellationToken,
}

/// What the engine's channel carries.
pub(crate) enum Command {
    Generate {
        request: GenerationRequest,
        events: mpsc::UnboundedSender<GenerationEvent>,
        cancel: CancellationToken,
    },
    /// Reply with the number of busy slots and queued requests.
    Load(tokio::sync::oneshot::Sender<EngineLoad>),
    /// Build a GBNF grammar from a JSON schema.
    SchemaGrammar(String, tokio::sync::oneshot::Sender<Result<String, EngineError>>),
    /// Where the mood's four steering coefficients are read, before a step.
    SteeringSource(SteeringSource),
    /// Stop every queued and running generation (each ends as cancelled).
    CancelAll,
}

/// Reads the current steering coefficients (excited, frustrated, calm,
/// depleted), which drift as the mood decays.
pub type SteeringSource = Box<dyn Fn() -> [f32; 4] + Send>;

/// How busy the engine is.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EngineLoad {
    pub active: usize,
    pub queued: usize,
    /// KV cells held by slots for finished work (the prompt cache).
    pub cached_tokens: usize,
    pub slots: Vec<SlotReport>,
    pub steering: SteeringReport,
}

/// One slot, as the engine accounts for it and as llama.cpp's memory sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SlotReport {
    pub seq: i32,
    pub busy: bool,
    /// Tokens the slot believes its cells hold.
    pub tokens: usize,
    /// Highest position llama.cpp holds for the sequence (-1 when empty):
    /// `tokens - 1` when the accounting is right.
    pub kv_pos_max: i32,
}

/// The `Send` side of the engine: queue work, read model facts.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::UnboundedSender<Command>,
    info: Arc<ModelInfo>,
    /// Generations sent that have not had a slot yet (nor failed or been
    /// cancelled): raised here, lowered by the engine.
    waiting: Arc<AtomicUsize>,
}

impl EngineHandle {
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Generations waiting for a slot (or still to be read by the engine).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Queue a generation; events arrive as the engine steps it.
    pub fn generate(&self, request: GenerationRequest) -> Generation {
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let command = Command::Generate { request, events: tx.clone(), cancel: cancel.clone() };
        self.waiting.fetch_add(1, Ordering::Relaxed);
        if self.commands.send(command).is_err() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(GenerationEvent::Failed(EngineError::Stopped));
        }
        Generation { events: rx, cancel }
    }

    /// Busy slots, queue length and cached cells.
    pub async fn load(&self) -> Result<EngineLoad, EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands.send(Command::Load(tx)).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Stop every generation, queued or running: each ends as `cancelled`.
    pub fn cancel_all(&self) {
        let _ = self.commands.send(Command::CancelAll);
    }

    /// Steer with the coefficients `source` reads (when vectors exist).
    pub fn steer_with(&self, source: SteeringSource) {
        let _ = self.commands.send(Command::SteeringSource(source));
    }

    /// Convert a JSON schema to a GBNF grammar (llama.cpp's converter).
    pub async fn schema_grammar(&self, schema: &serde_json::Value) -> Result<String, EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::SchemaGrammar(schema.to_string(), tx))
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}
