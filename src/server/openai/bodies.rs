//! OpenAI request bodies, read into the core's arguments: pure, so every
//! body can be checked without a model. A bad field is a [`BodyError`]
//! naming it; nothing here panics, whatever the JSON.

use serde_json::{json, Map, Value};

use crate::server::core::args::from_value;
use crate::server::core::GenerateArgs;

/// A body that cannot be served: `param` names the field.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyError {
    pub param: String,
    pub message: String,
}

fn bad(param: &str, message: String) -> BodyError {
    BodyError { param: param.into(), message }
}

/// A body, read: the core's arguments and how the reply goes out.
#[derive(Debug)]
pub struct Parsed {
    pub args: GenerateArgs,
    /// Server-sent events rather than one JSON reply.
    pub stream: bool,
    /// A last event with the usage (`stream_options.include_usage`).
    pub include_usage: bool,
}

/// Fields passed to the core as they are (Elpis's own included).
const SAMPLING: [&str; 14] = [
    "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "seed",
    "response_format", "emotional_modulation", "speculative", "prediction", "logprobs", "top_logprobs",
];

/// `POST /v1/chat/completions`: messages of every role (`developer` is a
/// system message; content parts must be text), tools and tool_choice.
pub fn chat(body: &Value) -> Result<Parsed, BodyError> {
    let obj = object(body)?;
    let mut args = Map::new();
    let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
        return Err(bad("messages", "messages is required: a list of {role, content}".into()));
    };
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(bad("messages", format!("messages[{i}] must be an object with role and content")));
        };
        let mut m = m.clone();
        if m.get("role").and_then(Value::as_str) == Some("developer") {
            m.insert("role".into(), json!("system"));
        }
        if let Some(Value::Array(parts)) = m.get("content") {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(bad("messages", format!("messages[{i}].content: a part of type {kind:?} is not supported (text parts only)")));
                    }
                }
            }
            m.insert("content".into(), json!(text));
        }
        out.push(Value::Object(m));
    }
    args.insert("messages".into(), Value::Array(out));
    let (stream, include_usage) = common(obj, &mut args)?;
    copy(obj, &mut args, &SAMPLING);
    // tool_choice "none": the model may not call any of the tools.
    if obj.get("tool_choice").and_then(Value::as_str) != Some("none") {
        copy(obj, &mut args, &["tools", "tool_choice"]);
    }
    Ok(Parsed { args: arguments(args, None)?, stream, include_usage })
}

/// `POST /v1/completions`: raw prompt text (a string, or a list of one),
/// continued without the chat template. `logprobs` is a count there.
pub fn completion(body: &Value) -> Result<Parsed, BodyError> {
    let obj = object(body)?;
    let prompt = match obj.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => items[0].as_str().unwrap_or_default().to_string(),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            return Err(bad("prompt", format!("prompt has {} texts: one prompt per request", items.len())));
        }
        Some(Value::Array(_)) => return Err(bad("prompt", "prompt must be text: token ids are not supported".into())),
        None | Some(Value::Null) => return Err(bad("prompt", "prompt is required: the text to continue".into())),
        Some(v) => return Err(bad("prompt", format!("prompt must be a string, not {v}"))),
    };
    if obj.get("echo").and_then(Value::as_bool) == Some(true) {
        return Err(bad("echo", "echo is not supported: the reply holds the continuation only".into()));
    }
    if obj.get("suffix").is_some_and(|s| !s.is_null()) {
        return Err(bad("suffix", "suffix is not supported (no fill-in-the-middle)".into()));
    }
    if let Some(n) = obj.get("best_of").filter(|v| !v.is_null() && **v != json!(1)) {
        return Err(bad("best_of", format!("best_of = {n} is not supported: one completion per request")));
    }
    let mut args = Map::new();
    args.insert("messages".into(), json!([]));
    let (stream, include_usage) = common(obj, &mut args)?;
    copy(obj, &mut args, &SAMPLING[..12]);
    match obj.get("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            args.insert("logprobs".into(), json!(true));
        }
        Some(v) => match v.as_i64() {
            Some(n) => {
                args.insert("logprobs".into(), json!(true));
                args.insert("top_logprobs".into(), json!(n));
            }
            None => return Err(bad("logprobs", format!("logprobs must be a number of alternatives (0 to 20), not {v}"))),
        },
    }
    Ok(Parsed { args: arguments(args, Some(prompt))?, stream, include_usage })
}

fn object(body: &Value) -> Result<&Map<String, Value>, BodyError> {
    body.as_object().ok_or_else(|| bad("body", "the request body must be a JSON object".into()))
}

/// What both endpoints share: n, the length, stop, and how to reply.
fn common(obj: &Map<String, Value>, args: &mut Map<String, Value>) -> Result<(bool, bool), BodyError> {
    if let Some(n) = obj.get("n").filter(|n| !n.is_null() && **n != json!(1)) {
        return Err(bad("n", format!("n = {n} is not supported: one choice per request")));
    }
    let max = obj.get("max_completion_tokens").filter(|v| !v.is_null()).or_else(|| obj.get("max_tokens"));
    if let Some(v) = max.filter(|v| !v.is_null()) {
        args.insert("max_tokens".into(), v.clone());
    }
    match obj.get("stop") {
        Some(Value::String(s)) => {
            args.insert("stop".into(), json!([s]));
        }
        Some(v @ Value::Array(_)) => {
            args.insert("stop".into(), v.clone());
        }
        Some(Value::Null) | None => {}
        Some(v) => return Err(bad("stop", format!("stop must be a string or a list of strings, not {v}"))),
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(bad("stream", format!("stream must be a boolean, not {v}"))),
    };
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(bad("stream_options", format!("stream_options.include_usage must be a boolean, not {v}"))),
        },
        Some(v) => return Err(bad("stream_options", format!("stream_options must be an object, not {v}"))),
    };
    Ok((stream, include_usage))
}

fn copy(obj: &Map<String, Value>, args: &mut Map<String, Value>, keys: &[&str]) {
    for key in keys {
        if let Some(v) = obj.get(*key).filter(|v| !v.is_null()) {
            args.insert((*key).into(), v.clone());
        }
    }
}

/// The gathered fields as the core's arguments; a wrong type names its path.
fn arguments(mut args: Map<String, Value>, prompt: Option<String>) -> Result<GenerateArgs, BodyError> {
    if args.get("response_format").and_then(|f| f.get("type")).and_then(Value::as_str) == Some("text") {
        args.remove("response_format");
    }
    let mut parsed: GenerateArgs = from_value(Value::Object(args)).map_err(|e| match e.path {
        Some(path) => bad(path.split(['.', '[']).next().unwrap_or("body"), format!("{path}: {}", e.message)),
        None => bad("body", e.message),
    })?;
    parsed.prompt = prompt;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_body_becomes_the_cores_arguments_and_bad_fields_are_named() {
        let parsed = chat(&json!({
            "model": "x", "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                       {"role": "user", "content": "Hi"}],
            "max_completion_tokens": 5, "stop": "\n", "stream": true, "stream_options": {"include_usage": true},
            "tool_choice": "none", "tools": [{"type": "function", "function": {"name": "f"}}],
        }))
        .unwrap();
        let args = &parsed.args;
        assert_eq!((args.messages[0].role.as_str(), args.messages[0].content.as_str()), ("system", "Be brief."));
        assert_eq!((args.max_tokens, args.stop.as_deref()), (Some(5), Some(&["\n".to_string()][..])));
        assert!(parsed.stream && parsed.include_usage && args.tools.is_none() && args.prompt.is_none());
        for (body, param) in [
            (json!([]), "body"),
            (json!({}), "messages"),
            (json!({"messages": [], "n": 2}), "n"),
            (json!({"messages": [], "stop": 3}), "stop"),
            (json!({"messages": [], "temperature": "hot"}), "temperature"),
            (json!({"messages": [], "stream": "yes"}), "stream"),
            (json!({"messages": [], "stream_options": {"include_usage": 1}}), "stream_options"),
            (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages"),
        ] {
            assert_eq!(chat(&body).unwrap_err().param, param, "{body}");
        }
    }

    #[test]
    fn a_completion_body_carries_its_prompt_and_logprobs_count() {
        let parsed = completion(&json!({"model": "x", "prompt": ["def f():"], "max_tokens": 8, "logprobs": 3, "seed": 1})).unwrap();
        assert_eq!(parsed.args.prompt.as_deref(), Some("def f():"));
        assert!(parsed.args.messages.is_empty() && !parsed.stream);
        assert_eq!((parsed.args.controls.logprobs, parsed.args.controls.top_logprobs), (Some(true), Some(3)));
        for (body, param) in [
            (json!({}), "prompt"),
            (json!({"prompt": [1, 2]}), "prompt"),
            (json!({"prompt": ["a", "b"]}), "prompt"),
            (json!({"prompt": "a", "echo": true}), "echo"),
            (json!({"prompt": "a", "suffix": "b"}), "suffix"),
            (json!({"prompt": "a", "best_of": 2}), "best_of"),
            (json!({"prompt": "a", "logprobs": "many"}), "logprobs"),
            (json!({"prompt": "a", "max_tokens": "ten"}), "max_tokens"),
        ] {
            assert_eq!(completion(&body).unwrap_err().param, param, "{body}");
        }
    }
}
