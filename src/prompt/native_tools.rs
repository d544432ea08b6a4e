//! Native tool calls: the model's own call format, as its template teaches
//! it. The tools go to the template (which writes them into the prompt the
//! way the model was trained), the reply is constrained by a grammar built
//! from the tools' schemas, and the reply is parsed back into OpenAI calls
//! plus any text. With `tool_choice: "auto"` the grammar is lazy: it starts
//! at the format's opening marker, so the model may answer in text instead.
//! Pure: the schema-to-grammar conversion is the engine's.

use serde_json::{json, Value};

use super::tools::{ToolSpec, MAX_CALLS};

/// How a model writes a tool call natively (its template and training).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeToolFormat {
    /// Hermes / Qwen 2.5: `<tool_call>\n{"name": .., "arguments": {..}}\n</tool_call>`, one block per call.
    Hermes,
    /// Llama 3.1+: `{"name": .., "parameters": {..}}`, optionally after `<|python_tag|>`.
    Llama3,
    /// Mistral: `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}`.
    Mistral,
}

impl NativeToolFormat {
    pub fn name(self) -> &'static str {
        match self {
            NativeToolFormat::Hermes => "hermes",
            NativeToolFormat::Llama3 => "llama-3",
            NativeToolFormat::Mistral => "mistral",
        }
    }

    /// The format a template that renders `tools` teaches, from its text.
    pub fn detect(source: &str) -> Option<NativeToolFormat> {
        if !source.contains("tools") {
            return None;
        }
        if source.contains("<tool_call>") {
            Some(NativeToolFormat::Hermes)
        } else if source.contains("[TOOL_CALLS]") {
            Some(NativeToolFormat::Mistral)
        } else if source.contains("<|python_tag|>") || (source.contains("ipython") && source.contains("\"parameters\"")) {
            Some(NativeToolFormat::Llama3)
        } else {
            None
        }
    }
}

/// What a native reply held: text (the answer, or words before the calls)
/// and the calls.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeReply {
    pub content: String,
    pub calls: Vec<(String, Value)>,
}

/// The tools as the template expects them (OpenAI's shape).
pub fn template_tools(tools: &[ToolSpec]) -> Vec<Value> {
    tools
        .iter()
        .map(|t| {
            json!({"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}})
        })
        .collect()
}

/// The JSON schema of one call in `format` (Mistral: the whole array).
pub fn call_schema(format: NativeToolFormat, tools: &[ToolSpec]) -> Value {
    let arguments_key = match format {
        NativeToolFormat::Llama3 => "parameters",
        NativeToolFormat::Hermes | NativeToolFormat::Mistral => "arguments",
    };
    let calls: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"const": t.name}, arguments_key: t.parameters},
                "required": ["name", arguments_key],
                "additionalProperties": false,
            })
        })
        .collect();
    let call = if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) };
    match format {
        NativeToolFormat::Mistral => json!({"type": "array", "items": call, "minItems": 1, "maxItems": MAX_CALLS}),
        _ => call,
    }
}

/// The GBNF grammar of a reply's calls, from the grammar of
/// [`call_schema`] (root rule `root`, renamed here). Under a lazy grammar
/// it applies from the trigger on; otherwise from the first token.
pub fn reply_grammar(format: NativeToolFormat, call_grammar: &str) -> String {
    let mut renamed = String::with_capacity(call_grammar.len() + 200);
    for line in call_grammar.lines() {
        match line.strip_prefix("root ::=") {
            Some(rest) => renamed.push_str(&format!("elpis-call ::={rest}")),
            None => renamed.push_str(line),
        }
        renamed.push('\n');
    }
    let head = match format {
        // Small Qwen models often write the call in a ```json fence or
        // bare instead of in <tool_call> tags: those forms are calls too.
        NativeToolFormat::Hermes => format!(
            "root ::= elpis-block (\"\\n\"? elpis-block){{0,{}}} | \"```json\" \"\\n\"? elpis-call \"\\n\"? \"```\" | elpis-call\n\
             elpis-block ::= \"<tool_call>\" \"\\n\"? elpis-call \"\\n\"? \"</tool_call>\"\n",
            MAX_CALLS - 1
        ),
        NativeToolFormat::Llama3 => "root ::= \"<|python_tag|>\"? elpis-call\n".to_string(),
        NativeToolFormat::Mistral => "root ::= \"[TOOL_CALLS]\" \" \"? elpis-call\n".to_string(),
    };
    head + &renamed
}

/// Regular expressions (llama.cpp's lazy-grammar triggers, searched in the
/// reply so far; the grammar starts at the first group) that open a call.
/// A format's marker always does; a reply that opens with a bare JSON
/// object only once it names one of `tools`, so a model that answers with
/// JSON naming no tool (small models do) is not forced into a call.
pub fn triggers(format: NativeToolFormat, tools: &[ToolSpec]) -> Vec<String> {
    let names: Vec<String> = tools.iter().map(|t| t.name.replace('.', "\\.")).collect();
    let bare = format!("\\{{\\s*\"name\"\\s*:\\s*\"({})\"", names.join("|"));
    match format {
        NativeToolFormat::Hermes => vec![
            "<tool_call>".into(),
            format!("^\\s*(```json\\s*{bare})"),
            format!("^\\s*({bare})"),
        ],
        NativeToolFormat::Llama3 => vec!["<\\|python_tag\\|>".into(), format!("^\\s*({bare})")],
        NativeToolFormat::Mistral => vec!["\\[TOOL_CALLS\\]".into()],
    }
}

/// Parse a reply in `format`. A reply without any call is a text answer.
pub fn parse(format: NativeToolFormat, text: &str, tools: &[ToolSpec]) -> Result<NativeReply, String> {
    let (content, raw_calls) = match format {
        NativeToolFormat::Hermes => split_hermes(text, tools)?,
        NativeToolFormat::Llama3 => {
            let body = text.trim_start();
            let body = body.strip_prefix("<|python_tag|>").unwrap_or(body).trim();
            if body.starts_with('{') {
                // Several calls may be separated by `;`.
                let mut calls = Vec::new();
                for part in json_values(body)? {
                    calls.push(part);
                }
                (String::new(), calls)
            } else {
                (text.trim().to_string(), Vec::new())
            }
        }
        NativeToolFormat::Mistral => match text.find("[TOOL_CALLS]") {
            Some(at) => {
                let body = text[at + "[TOOL_CALLS]".len()..].trim();
                let value: Value = serde_json::from_str(body).map_err(|e| format!("[TOOL_CALLS] is not followed by a JSON array: {e}"))?;
                let calls = match value {
                    Value::Array(items) => items,
                    obj @ Value::Object(_) => vec![obj],
                    other => return Err(format!("[TOOL_CALLS] is followed by {other}, not a list of calls")),
                };
                (text[..at].trim().to_string(), calls)
            }
            None => (text.trim().to_string(), Vec::new()),
        },
    };
    let mut calls: Vec<(String, Value)> = Vec::new();
    for call in raw_calls {
        let name = call.get("name").and_then(Value::as_str).ok_or_else(|| format!("call without a name: {call}"))?;
        if !tools.iter().any(|t| t.name == name) {
            return Err(format!("call to unknown function {name:?}"));
        }
        let arguments = call.get("arguments").or_else(|| call.get("parameters")).cloned().unwrap_or_else(|| json!({}));
        // Some models write the arguments as a JSON string.
        let arguments = match arguments {
            Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
            other => other,
        };
        if !arguments.is_object() {
            return Err(format!("arguments of {name:?} are not an object: {arguments}"));
        }
        let call = (name.to_string(), arguments);
        if !calls.contains(&call) {
            calls.push(call);
        }
    }
    Ok(NativeReply { content, calls })
}

/// Hermes: every `<tool_call>...</tool_call>` block is a call (an unclosed
/// last block runs to the end); the rest is text.
fn split_hermes(text: &str, tools: &[ToolSpec]) -> Result<(String, Vec<Value>), String> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut content = String::new();
    let mut calls = Vec::new();
    if !text.contains(OPEN) {
        // The fenced or bare forms: one call, the whole reply, when it
        // names a tool (JSON naming none is the model's text answer).
        let body = text.trim();
        let body = body.strip_prefix("```json").and_then(|b| b.trim_end().strip_suffix("```")).unwrap_or(body).trim();
        if body.starts_with('{') {
            if let Ok(call @ Value::Object(_)) = serde_json::from_str::<Value>(body) {
                if call.get("name").and_then(Value::as_str).is_some_and(|n| tools.iter().any(|t| t.name == n)) {
                    return Ok((String::new(), vec![call]));
                }
            }
        }
    }
    let mut rest = text;
    while let Some(at) = rest.find(OPEN) {
        content.push_str(&rest[..at]);
        let after = &rest[at + OPEN.len()..];
        let (body, next) = match after.find(CLOSE) {
            Some(end) => (&after[..end], &after[end + CLOSE.len()..]),
            None => (after, ""),
        };
        let call: Value = serde_json::from_str(body.trim()).map_err(|e| format!("a <tool_call> block is not JSON: {e}"))?;
        calls.push(call);
        rest = next;
    }
    content.push_str(rest);
    Ok((content.trim().to_string(), calls))
}

/// One or more JSON values separated by `;` or whitespace.
fn json_values(text: &str) -> Result<Vec<Value>, String> {
    let mut values = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    loop {
        match stream.next() {
            Some(Ok(v)) => values.push(v),
            Some(Err(e)) => {
                let offset = stream.byte_offset();
                let rest = text[offset..].trim_start_matches([';', ' ', '\n']);
                if rest.is_empty() {
                    break;
                }
                if rest.len() == text.len() - offset {
                    return Err(format!("the call is not JSON: {e}"));
                }
                values.extend(json_values(rest)?);
                break;
            }
            None => break,
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::parse_tools;
    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";

    fn tools() -> Vec<ToolSpec> {
        parse_tools(&[
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}),
            json!({"name": "ping"}),
        ])
        .unwrap()
    }

    #[test]
    fn hermes_blocks_and_text() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"ping\", \"arguments\": {}}\n</tool_call>";
        let reply = parse(NativeToolFormat::Hermes, text, &tools()).unwrap();
        assert_eq!(reply.content, "Let me check.");
        assert_eq!(reply.calls, vec![("get_weather".into(), json!({"city": "Oslo"})), ("ping".into(), json!({}))]);
        let fenced = parse(NativeToolFormat::Hermes, "```json\n{\n  \"name\": \"ping\",\n  \"arguments\": {}\n}\n```", &tools()).unwrap();
        assert_eq!(fenced.calls, vec![("ping".into(), json!({}))]);
        let bare = parse(NativeToolFormat::Hermes, "{\"name\": \"ping\", \"arguments\": {}}", &tools()).unwrap();
        assert_eq!(bare.calls.len(), 1);
        let made_up = parse(NativeToolFormat::Hermes, "{\"name\": \"cat joke\", \"arguments\": {}}", &tools()).unwrap();
        assert!(made_up.calls.is_empty() && made_up.content.contains("cat joke"));
        let t = triggers(NativeToolFormat::Hermes, &tools());
        assert!(t[2].contains("(get_weather|ping)"), "{t:?}");
        let answer = parse(NativeToolFormat::Hermes, "It is sunny.", &tools()).unwrap();
        assert_eq!((answer.content.as_str(), answer.calls.len()), ("It is sunny.", 0));
        assert!(parse(NativeToolFormat::Hermes, "<tool_call>{\"name\": \"nope\"}</tool_call>", &tools()).unwrap_err().contains("unknown"));
        assert!(parse(NativeToolFormat::Hermes, "<tool_call>{\"name\": ", &tools()).unwrap_err().contains("not JSON"));
    }

    #[test]
    fn llama3_and_mistral() {
        let l = parse(NativeToolFormat::Llama3, "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}", &tools()).unwrap();
        assert_eq!(l.calls, vec![("get_weather".into(), json!({"city": "Rome"}))]);
        let two = parse(NativeToolFormat::Llama3, "{\"name\": \"ping\", \"parameters\": {}}; {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}", &tools()).unwrap();
        assert_eq!(two.calls.len(), 2);
        assert_eq!(parse(NativeToolFormat::Llama3, "Hello there", &tools()).unwrap().content, "Hello there");
        let m = parse(NativeToolFormat::Mistral, "[TOOL_CALLS] [{\"name\": \"ping\", \"arguments\": {}, \"id\": \"abc123def\"}]", &tools()).unwrap();
        assert_eq!(m.calls, vec![("ping".into(), json!({}))]);
        assert_eq!(parse(NativeToolFormat::Mistral, "No call.", &tools()).unwrap().calls.len(), 0);
    }

    #[test]
    fn grammars_wrap_the_call_rule() {
        let call = "root ::= \"{\" space \"}\"\nspace ::= \" \"?\n";
        let g = reply_grammar(NativeToolFormat::Hermes, call);
        assert!(g.starts_with("root ::= elpis-block"));
        assert!(g.contains("elpis-call ::= \"{\" space \"}\""));
        assert_eq!(g.matches("root ::=").count(), 1);
        assert!(reply_grammar(NativeToolFormat::Mistral, call).contains("\"[TOOL_CALLS]\""));
        let schema = call_schema(NativeToolFormat::Llama3, &tools());
        assert_eq!(schema["anyOf"][0]["required"], json!(["name", "parameters"]));
        assert_eq!(call_schema(NativeToolFormat::Mistral, &tools())["type"], "array");
    }

    #[test]
    fn tool_formats_are_detected() {
        assert_eq!(NativeToolFormat::detect("{% if tools %}<tool_call>{% endif %}"), Some(NativeToolFormat::Hermes));
        assert_eq!(NativeToolFormat::detect("{% if tools %}[TOOL_CALLS]{% endif %}"), Some(NativeToolFormat::Mistral));
        assert_eq!(NativeToolFormat::detect("{% if tools %}<|python_tag|>{% endif %}"), Some(NativeToolFormat::Llama3));
        assert_eq!(NativeToolFormat::detect(CHATML), None);
    }
}
