//! What a request asks of the core, whichever face it came through: the
//! arguments of a generation, a function call and an emotion update, with
//! the controls they share. MCP's tools take them as they are (their JSON
//! schemas are these types'); the OpenAI face translates its bodies into
//! them. Values are checked where they are used ([`super::controls`]), so
//! the error names the argument the same way for both faces.

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::prompt::Message;

/// `generate` and `generate_stream_start`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct GenerateArgs {
    /// The conversation: a list of {role, content}; role is system, user, assistant or tool.
    pub messages: Vec<Message>,
    /// Most tokens to generate (default from the config, 2048).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Sampling temperature 0..2, overriding the emotional modulation (0 = greedy).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Derive temperature/top_p from the emotional state (default true).
    #[serde(default)]
    pub emotional_modulation: Option<bool>,
    #[serde(flatten)]
    pub controls: Controls,
    /// Stop strings (up to 8): the reply ends before the first of them (finish_reason "stop", stop_sequence names it).
    #[serde(default)]
    pub stop: Option<Vec<String>>,
    /// Constrain the reply to JSON: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}} ({"type": "text"}: unconstrained).
    #[serde(default)]
    pub response_format: Option<Value>,
    /// Tools in OpenAI format the model may call (as function_call takes them); the completed result carries tool_calls.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// OpenAI tool_choice (with tools): "auto" (default), "required", or {"type": "function", "function": {"name": ...}}.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Raw prompt text, fed to the model as it is instead of rendering
    /// `messages` with the chat template (OpenAI's `/v1/completions`).
    /// Special-token strings in it are parsed. Not an MCP argument.
    #[serde(skip)]
    #[schemars(skip)]
    pub prompt: Option<String>,
}

/// Sampling and decoding controls shared by the generation tools, all
/// optional: an explicit value wins over the mood's and the config's.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct Controls {
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this (0 < top_p <= 1).
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens (0 = no limit).
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Drop tokens less likely than this share of the most likely one (0..1).
    #[serde(default)]
    pub min_p: Option<f64>,
    /// Penalty for tokens seen in the last 64 (1 = none, up to 2).
    #[serde(default)]
    pub repeat_penalty: Option<f64>,
    /// Penalty for any token already present (0 = none, up to 2).
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// Penalty growing with how often a token was seen (0 = none, up to 2).
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// Sampling seed: the same seed, settings and prompt give the same reply.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Speculative decoding for this request (default: the server's model.speculative); false turns it off.
    #[serde(default)]
    pub speculative: Option<bool>,
    /// The expected reply (OpenAI predicted outputs: {"type": "content", "content": "..."}), for example the file being edited: a source of drafts.
    #[serde(default)]
    pub prediction: Option<Value>,
    /// Report each reply token's log-probability (the result's logprobs.content).
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With each token, this many of the most likely alternatives (0..20).
    #[serde(default)]
    pub top_logprobs: Option<i64>,
}

impl GenerateArgs {
    pub fn modulation(&self) -> bool {
        self.emotional_modulation.unwrap_or(true)
    }
}

/// `function_call`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct FunctionCallArgs {
    /// The conversation: a list of {role, content}.
    pub messages: Vec<Message>,
    /// Tools in OpenAI format: {"type": "function", "function": {"name", "description", "parameters"}}.
    pub tools: Vec<Value>,
    /// Sampling temperature 0..2 (default: from the emotional state).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// OpenAI tool_choice: "auto" (default), "required", or {"type": "function", "function": {"name": ...}}.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(flatten)]
    pub controls: Controls,
}

/// `update_emotion`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct UpdateEmotionArgs {
    /// Event name: success, failure, insight, blocked, ... (unknown names raise arousal slightly).
    pub event_type: String,
    /// Strength of the event, clamped to 0..2 (default 1.0).
    #[serde(default)]
    pub intensity: Option<f64>,
    /// Free text, logged.
    #[serde(default)]
    pub context: Option<String>,
}

/// Arguments that do not have the types they must.
#[derive(Debug, Clone, PartialEq)]
pub struct ArgsError {
    /// The offending field's path (`top_p`, `messages[0].role`), when one
    /// can be named.
    pub path: Option<String>,
    pub message: String,
}

/// Arguments of type `T` from JSON; the error names the offending field.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, ArgsError> {
    let error = |e: serde_path_to_error::Error<serde_json::Error>| {
        let path = e.path().to_string();
        ArgsError { path: Some(path).filter(|p| p != "." && !p.is_empty()), message: e.inner().to_string() }
    };
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        // A flattened field's error comes without its path: the controls
        // parsed alone name it.
        match serde_path_to_error::deserialize::<_, Controls>(value) {
            Err(inner) if e.path().to_string() == "." => error(inner),
            _ => error(e),
        }
    })
}
