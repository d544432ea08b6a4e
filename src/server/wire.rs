//! Tool arguments as they arrive on the wire (`shared/docs/wire.md`), with
//! the JSON schemas `tools/list` publishes. Parsing errors name the argument.

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::engine::Message;

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
}

impl GenerateArgs {
    pub fn modulation(&self) -> bool {
        self.emotional_modulation.unwrap_or(true)
    }
}

/// `generate_stream_read` and `generate_stream_cancel`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct StreamArgs {
    /// The id returned by generate_stream_start.
    pub stream_id: String,
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

/// Tools without arguments.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct NoArgs {}

/// Parse tool arguments; the error names the offending argument.
pub fn parse_args<T: DeserializeOwned>(tool: &str, arguments: Option<Map<String, Value>>) -> Result<T, String> {
    let value = Value::Object(arguments.unwrap_or_default());
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." || path.is_empty() {
            format!("invalid arguments for {tool}: {}", e.inner())
        } else {
            format!("invalid argument {path} for {tool}: {}", e.inner())
        }
    })
}

/// The JSON schema of `T` as a JSON object.
pub fn schema_of<T: JsonSchema>() -> Map<String, Value> {
    let schema = schemars::schema_for!(T);
    match serde_json::to_value(schema) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Option<Map<String, Value>> {
        v.as_object().cloned()
    }

    #[test]
    fn errors_name_the_argument() {
        let e = parse_args::<GenerateArgs>("generate", obj(json!({"messages": "hi"}))).unwrap_err();
        assert!(e.contains("messages"), "{e}");
        let e = parse_args::<GenerateArgs>("generate", obj(json!({"messages": [], "max_tokens": "ten"}))).unwrap_err();
        assert!(e.contains("max_tokens"), "{e}");
        let e = parse_args::<GenerateArgs>("generate", obj(json!({}))).unwrap_err();
        assert!(e.contains("messages"), "{e}");
        let e = parse_args::<GenerateArgs>("generate", obj(json!({"messages": [{"role": "user"}]}))).unwrap_err();
        assert!(e.contains("content"), "{e}");
        let e = parse_args::<StreamArgs>("generate_stream_read", obj(json!({"stream_id": 5}))).unwrap_err();
        assert!(e.contains("stream_id"), "{e}");
        // Unknown arguments are ignored (Psyche's future fields must not break it).
        assert!(parse_args::<GenerateArgs>("generate", obj(json!({"messages": [], "bogus": 1}))).is_ok());
    }

    #[test]
    fn defaults_and_nulls() {
        let a: GenerateArgs = parse_args("generate", obj(json!({"messages": [], "temperature": null}))).unwrap();
        assert_eq!(a.max_tokens, None);
        assert!(a.modulation());
        assert!(parse_args::<NoArgs>("get_emotion", None).is_ok());
    }

    #[test]
    fn schemas_list_required_arguments() {
        let s = schema_of::<GenerateArgs>();
        assert_eq!(s["type"], "object");
        assert_eq!(s["required"], json!(["messages"]));
        assert!(s["properties"].get("max_tokens").is_some());
    }
}
