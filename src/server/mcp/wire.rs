//! Tool arguments as they arrive on the wire (`shared/docs/wire.md`), with
//! the JSON schemas `tools/list` publishes. Parsing errors name the argument.

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::server::core::controls::{MAX_STOPS, MAX_STOP_BYTES, MAX_TOP_LOGPROBS};
use crate::server::core::args::from_value;
use crate::server::core::{FunctionCallArgs, GenerateArgs, UpdateEmotionArgs};

/// `generate_stream_read` and `generate_stream_cancel`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct StreamArgs {
    /// The id returned by generate_stream_start.
    pub stream_id: String,
}

/// Tools without arguments.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct NoArgs {}

/// Parse tool arguments; the error names the offending argument.
pub fn parse_args<T: DeserializeOwned>(tool: &str, arguments: Option<Map<String, Value>>) -> Result<T, String> {
    from_value(Value::Object(arguments.unwrap_or_default())).map_err(|e| match e.path {
        Some(path) => format!("invalid argument {path} for {tool}: {}", e.message),
        None => format!("invalid arguments for {tool}: {}", e.message),
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

/// The input schema of `tool` as `tools/list` publishes it, made easy for
/// a model to fill: no `["integer", "null"]` unions or integer formats, the
/// defaults stated (`max_tokens` from the config), ranges as
/// minimum/maximum, the known events as examples.
pub fn input_schema(tool: &str, default_max_tokens: u32) -> Map<String, Value> {
    let mut schema = match tool {
        "generate" | "generate_stream_start" => schema_of::<GenerateArgs>(),
        "generate_stream_read" | "generate_stream_cancel" => schema_of::<StreamArgs>(),
        "function_call" => schema_of::<FunctionCallArgs>(),
        "update_emotion" => schema_of::<UpdateEmotionArgs>(),
        _ => schema_of::<NoArgs>(),
    };
    for value in schema.values_mut() {
        plain_types(value);
    }
    let set = |schema: &mut Map<String, Value>, property: &str, extra: Value| {
        let target = schema.get_mut("properties").and_then(|p| p.get_mut(property)).and_then(Value::as_object_mut);
        if let (Some(target), Value::Object(extra)) = (target, extra) {
            target.extend(extra);
        }
    };
    // Free-form values get a schema saying what they are.
    let replace = |schema: &mut Map<String, Value>, property: &str, with: Value| {
        if let Some(p) = schema.get_mut("properties").and_then(Value::as_object_mut).and_then(|p| p.get_mut(property)) {
            let description = p.get("description").cloned();
            *p = with;
            if let (Some(d), Some(obj)) = (description, p.as_object_mut()) {
                obj.insert("description".into(), d);
            }
        }
    };
    replace(&mut schema, "response_format", json!({"type": "object", "properties": {
        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
        "json_schema": {"type": "object", "properties": {"name": {"type": "string"}, "schema": {"type": "object"}}, "required": ["schema"]}},
        "required": ["type"]}));
    replace(&mut schema, "prediction", json!({"type": "object", "properties": {
        "type": {"type": "string", "enum": ["content"]}, "content": {"type": "string"}}, "required": ["type", "content"]}));
    replace(&mut schema, "tool_choice", json!({"anyOf": [{"type": "string", "enum": ["auto", "required"]},
        {"type": "object", "properties": {"type": {"type": "string"}, "function": {"type": "object", "properties": {"name": {"type": "string"}}}}}]}));
    set(&mut schema, "max_tokens", json!({"minimum": 1, "default": default_max_tokens}));
    set(&mut schema, "top_p", json!({"exclusiveMinimum": 0.0, "maximum": 1.0}));
    set(&mut schema, "top_k", json!({"minimum": 0, "maximum": 100000}));
    set(&mut schema, "min_p", json!({"minimum": 0.0, "maximum": 1.0}));
    set(&mut schema, "repeat_penalty", json!({"exclusiveMinimum": 0.0, "maximum": 2.0}));
    set(&mut schema, "presence_penalty", json!({"minimum": 0.0, "maximum": 2.0, "default": 0.0}));
    set(&mut schema, "frequency_penalty", json!({"minimum": 0.0, "maximum": 2.0, "default": 0.0}));
    set(&mut schema, "seed", json!({"minimum": 0, "maximum": u32::MAX}));
    set(&mut schema, "speculative", json!({"default": true}));
    set(&mut schema, "logprobs", json!({"default": false}));
    set(&mut schema, "top_logprobs", json!({"minimum": 0, "maximum": MAX_TOP_LOGPROBS}));
    set(&mut schema, "stop", json!({"maxItems": MAX_STOPS,
        "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_BYTES}}));
    set(&mut schema, "temperature", json!({"minimum": 0.0, "maximum": 2.0}));
    set(&mut schema, "emotional_modulation", json!({"default": true}));
    set(&mut schema, "intensity", json!({"minimum": 0.0, "maximum": 2.0, "default": 1.0}));
    let events: Vec<&str> = crate::emotion::EVENTS.iter().map(|(name, _)| *name).collect();
    set(&mut schema, "event_type", json!({"examples": events}));
    if let Some(role) = schema.get_mut("$defs").and_then(|d| d.pointer_mut("/Message/properties/role")).and_then(Value::as_object_mut) {
        role.insert("enum".into(), json!(crate::prompt::ROLES));
    }
    schema
}

/// Optional values are plain types (absent means the default), and integers
/// carry no machine formats a model would have to know.
fn plain_types(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get("type") {
                let kept: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                if kept.len() == 1 {
                    map.insert("type".into(), kept[0].clone());
                }
            }
            if map.get("default").is_some_and(Value::is_null) {
                map.remove("default");
            }
            if map.get("format").and_then(Value::as_str).is_some_and(|f| ["int64", "int32", "uint32", "uint64", "uint", "double", "float"].contains(&f)) {
                map.remove("format");
            }
            for v in map.values_mut() {
                plain_types(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(plain_types),
        _ => {}
    }
}

/// The emotional state object (wire.md).
fn emotional_state_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "valence": {"type": "number", "minimum": -1, "maximum": 1},
            "arousal": {"type": "number", "minimum": -1, "maximum": 1},
            "quadrant": {"type": "string", "enum": ["excited", "frustrated", "calm", "depleted"]},
            "last_update": {"type": "number"},
            "update_count": {"type": "integer"},
            "baseline": {"type": "object"},
            "steering_coefficients": {"type": "object"},
            "trajectory": {"type": "object"}
        },
        "required": ["valence", "arousal", "quadrant", "trajectory"]
    })
}

/// The output schema of `tool`: the shape of its result object (the same
/// object as `structuredContent` and the text block). Successful results
/// only; failures are `{"error": ...}` with `isError: true`.
pub fn output_schema(tool: &str) -> Map<String, Value> {
    let state = emotional_state_schema();
    let usage = json!({"type": "object", "properties": {
        "prompt_tokens": {"type": "integer"}, "cached_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
        "draft_tokens": {"type": "integer"}, "accepted_tokens": {"type": "integer"}}});
    let timings = json!({"type": "object", "properties": {
        "queue_ms": {"type": "number"}, "prompt_computed_tokens": {"type": "integer"}, "prompt_cached_tokens": {"type": "integer"},
        "prompt_ms": {"type": "number"}, "prompt_tokens_per_s": {"type": "number"}, "time_to_first_token_ms": {"type": "number"},
        "reply_tokens": {"type": "integer"}, "reply_ms": {"type": "number"}, "reply_tokens_per_s": {"type": "number"},
        "total_ms": {"type": "number"}}});
    let sampling = json!({"type": "object", "properties": {"temperature": {"type": "number"}, "top_p": {"type": "number"},
        "top_k": {"type": "integer"}, "min_p": {"type": "number"}, "repeat_penalty": {"type": "number"},
        "presence_penalty": {"type": "number"}, "frequency_penalty": {"type": "number"}, "seed": {"type": "integer"}}});
    let finish = json!({"type": "string", "enum": ["stop", "length", "cancelled", "abandoned"]});
    let calls = json!({"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "string"}, "type": {"type": "string"},
        "function": {"type": "object", "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}});
    let schema = match tool {
        "generate" => json!({"type": "object", "properties": {
            "content": {"type": "string"}, "emotional_state": state, "modulated_params": sampling,
            "finish_reason": finish, "stop_sequence": {"type": "string"}, "usage": usage, "timings": timings,
            "truncated": {"type": "boolean"}, "tool_calls": calls, "raw_content": {"type": "string"}, "parse_error": {"type": "string"},
            "logprobs": {"type": "object", "properties": {"content": {"type": "array"}}}},
            "required": ["content", "emotional_state", "modulated_params"]}),
        "generate_stream_start" => json!({"type": "object", "properties": {
            "stream_id": {"type": "string"}, "status": {"type": "string"}, "emotional_state": state, "modulated_params": sampling},
            "required": ["stream_id", "status", "emotional_state"]}),
        "generate_stream_read" => json!({"type": "object", "properties": {
            "stream_id": {"type": "string"}, "new_content": {"type": "string"}, "is_complete": {"type": "boolean"},
            "total_tokens": {"type": "integer"}, "full_content": {"type": "string"}, "emotional_state": state,
            "finish_reason": finish, "stop_sequence": {"type": "string"}, "usage": usage, "timings": timings,
            "truncated": {"type": "boolean"}, "tool_calls": calls, "content": {"type": "string"},
            "raw_content": {"type": "string"}, "parse_error": {"type": "string"}, "error": {"type": "string"}},
            "required": ["new_content", "is_complete", "total_tokens"]}),
        "generate_stream_cancel" => json!({"type": "object", "properties": {
            "status": {"type": "string"}, "stream_id": {"type": "string"}}, "required": ["status", "stream_id"]}),
        "function_call" => json!({"type": "object", "properties": {
            "tool_calls": calls,
            "emotional_state": state, "modulated_params": sampling, "finish_reason": finish,
            "usage": usage, "timings": timings, "raw_content": {"type": "string"}, "parse_error": {"type": "string"},
            "content": {"type": "string", "description": "The model's text: its answer when it called no tool, or words before its calls"}},
            "required": ["tool_calls", "emotional_state"]}),
        "get_capabilities" => json!({"type": "object", "properties": {
            "context_length": {"type": "integer"}, "max_tokens": {"type": "integer"}, "backend": {"type": "string"},
            "model_path": {"type": "string"}, "temperature": {"type": "number"}, "top_p": {"type": "number"}},
            "required": ["context_length", "max_tokens", "backend", "model_path", "temperature", "top_p"]}),
        _ => state,
    };
    match schema {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let e = parse_args::<GenerateArgs>("generate", obj(json!({"messages": [], "top_p": "high"}))).unwrap_err();
        assert!(e.contains("top_p"), "{e}");
        let e = parse_args::<FunctionCallArgs>("function_call", obj(json!({"messages": [], "tools": [], "seed": "s"}))).unwrap_err();
        assert!(e.contains("seed"), "{e}");
        let e = parse_args::<GenerateArgs>("generate", obj(json!({"messages": [], "stop": "x"}))).unwrap_err();
        assert!(e.contains("stop"), "{e}");
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
