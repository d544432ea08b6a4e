//! What the engine is asked and what it answers: a [`GenerationRequest`]
//! with its sampling and grammar, the [`GenerationEvent`]s a generation
//! reports, its [`Completion`] and [`EngineError`]s, and the [`Interest`] a
//! polled stream's reader shows. Plain data, shared with the server.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::prompt::Message;

/// Sampling for one generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: u32,
    pub min_p: f64,
    pub repeat_penalty: f64,
    /// OpenAI's penalties (0 = none): for a token already present, and per
    /// time it was seen, over the last 64 tokens.
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub seed: u32,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub messages: Vec<Message>,
    /// Raw prompt text instead of `messages` rendered by the template
    /// (special-token strings in it parsed; never truncated).
    pub text: Option<String>,
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    /// A GBNF grammar constraining the reply.
    pub grammar: Option<Grammar>,
    /// Tools for the model's own template (native tool calls), OpenAI shape.
    pub tools: Option<Vec<serde_json::Value>>,
    /// For a polled stream, how recently its reader showed up; None when a
    /// client waits on the call itself (`generate`, `function_call`).
    pub interest: Option<Interest>,
    /// Strings that end the reply (besides the template's turn markers).
    pub stop: Vec<String>,
    /// Speculative decoding for this request (when the engine has it on).
    pub speculative: bool,
    /// The expected reply (OpenAI's predicted outputs), a source of drafts.
    pub prediction: Option<String>,
    /// Report each reply token's log-probability, with this many of the
    /// most likely alternatives (None: no log-probabilities).
    pub logprobs: Option<usize>,
}

/// A reply token's log-probability (OpenAI's `logprobs.content` entry),
/// from the model's distribution before sampling settings apply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
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

/// Shortest silence after which a polled stream counts as unattended...
const MIN_ATTENTION_S: f64 = 0.25;
/// ...or this many of its own poll intervals, if longer.
const ATTENTION_INTERVALS: f64 = 4.0;
/// Before its first poll a stream counts as attended this long.
const FIRST_POLL_GRACE_S: f64 = 1.0;

/// Microseconds this process spent in decode steps during which no request
/// could be answered (a device backend answers only between steps): time
/// in which no client could have been heard, so no stream's silence.
static DEAF_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A step during which nothing was answered took `elapsed`.
pub(super) fn add_deaf_time(elapsed: std::time::Duration) {
    DEAF_US.fetch_add(elapsed.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
}

fn deaf_s() -> f64 {
    DEAF_US.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
}

/// How recently a client read a stream, shared by the stream registry
/// (which touches it on every poll) and the scheduler (which lets work a
/// client is waiting on right now go before a stream nobody reads).
#[derive(Debug, Clone)]
pub struct Interest(Arc<Mutex<InterestState>>);

#[derive(Debug)]
struct InterestState {
    last: Instant,
    /// [`DEAF_US`] at `last`, in seconds.
    deaf_at_last: f64,
    /// Moving average of the time between polls, once there was one.
    interval_s: Option<f64>,
}

impl Interest {
    pub fn new(now: Instant) -> Self {
        Interest(Arc::new(Mutex::new(InterestState { last: now, deaf_at_last: deaf_s(), interval_s: None })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, InterestState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A poll at `now`.
    pub fn touch(&self, now: Instant) {
        let mut s = self.state();
        let gap = s.heard_s(now);
        s.interval_s = Some(match s.interval_s {
            Some(avg) => 0.7 * avg + 0.3 * gap,
            None => gap,
        });
        s.last = now;
        s.deaf_at_last = deaf_s();
    }

    /// Seconds since the last poll (or the start) in which the server could
    /// have heard one.
    pub fn idle_s(&self, now: Instant) -> f64 {
        self.state().heard_s(now)
    }

    /// Whether the reader is still there: it polled within a few of its own
    /// intervals (at least [`MIN_ATTENTION_S`]).
    pub fn attended(&self, now: Instant) -> bool {
        let s = self.state();
        let idle = s.heard_s(now);
        let patience = match s.interval_s {
            Some(interval) => (ATTENTION_INTERVALS * interval).max(MIN_ATTENTION_S),
            None => FIRST_POLL_GRACE_S,
        };
        idle <= patience
    }
}

impl InterestState {
    /// Seconds since `last` less the time nothing could be heard.
    fn heard_s(&self, now: Instant) -> f64 {
        (now.saturating_duration_since(self.last).as_secs_f64() - (deaf_s() - self.deaf_at_last)).max(0.0)
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
    /// Draft tokens decoded (speculative decoding), and how many of them
    /// the model's own samples confirmed.
    pub draft_tokens: u32,
    pub accepted_tokens: u32,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    /// The request's stop string that ended the reply, if one did.
    pub stop_sequence: Option<String>,
    pub usage: Usage,
    /// Old turns were dropped to fit the context.
    pub truncated: bool,
    pub timings: Timings,
    /// Per reply token, when asked for.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// Where a generation's time went (llama-server's `timings`, Ollama's
/// durations), in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// From the engine taking the request to the step that reads its first
    /// prompt row (the whole wait: for a slot, then for room in a batch).
    pub queue_ms: f64,
    /// Prompt tokens decoded, and those served from the cache instead.
    pub prompt_computed_tokens: u32,
    pub prompt_cached_tokens: u32,
    /// From its first prompt row's step to the first reply token's logits.
    pub prompt_ms: f64,
    pub prompt_tokens_per_s: f64,
    /// From the engine taking the request to the first reply token.
    pub time_to_first_token_ms: f64,
    /// From the first reply token to the last, and the pace of the tokens
    /// after the first.
    pub reply_tokens: u32,
    pub reply_ms: f64,
    pub reply_tokens_per_s: f64,
    /// queue + prompt + reply.
    pub total_ms: f64,
}

impl Timings {
    /// From the moments a job went through (a moment not reached yet is
    /// the next one reached, so the parts always add up to the total).
    pub fn of(admitted: Instant, started: Option<Instant>, first_token: Option<Instant>, end: Instant, usage: &Usage) -> Timings {
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1000.0;
        let started = started.unwrap_or(end);
        let first = first_token.unwrap_or(end).max(started);
        let computed = usage.prompt_tokens.saturating_sub(usage.cached_tokens);
        let per_s = |n: u32, ms: f64| if ms > 0.0 { n as f64 * 1000.0 / ms } else { 0.0 };
        let (queue_ms, prompt_ms, reply_ms) = (ms(admitted, started), ms(started, first), ms(first, end));
        Timings {
            queue_ms,
            prompt_computed_tokens: computed,
            prompt_cached_tokens: usage.cached_tokens,
            prompt_ms,
            prompt_tokens_per_s: per_s(computed, prompt_ms),
            time_to_first_token_ms: queue_ms + prompt_ms,
            reply_tokens: usage.completion_tokens,
            reply_ms,
            reply_tokens_per_s: per_s(usage.completion_tokens.saturating_sub(1), reply_ms),
            total_ms: queue_ms + prompt_ms + reply_ms,
        }
    }
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
    /// An RPC worker (`model.rpc_servers`) that cannot be used.
    #[error("{0}")]
    Rpc(String),
    /// Layers that cannot go to the GPU as configured (`model.gpu_layers`).
    #[error("{0}")]
    Offload(String),
}

