//! Function calling for models without native tool support: the tools are
//! described in a system message, the reply is constrained by a grammar built
//! from the tools' JSON schemas (a JSON array of calls, empty for none), and
//! the reply is parsed into OpenAI-format `tool_calls`. Pure, apart from the
//! schema-to-grammar conversion which the engine does with llama.cpp.

use serde_json::{json, Value};

/// A tool the model may call, validated from the OpenAI format.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON schema of the arguments object.
    pub parameters: Value,
}

/// Most calls one reply may hold.
pub const MAX_CALLS: usize = 4;

/// Validate the wire's `tools` list (`{type: "function", function: {name,
/// description, parameters}}`, or the bare inner object).
pub fn parse_tools(tools: &[Value]) -> Result<Vec<ToolSpec>, String> {
    if tools.is_empty() {
        return Err("tools is empty: give at least one tool in OpenAI format \
                    ({\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}})"
            .into());
    }
    let mut specs: Vec<ToolSpec> = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let function = tool.get("function").unwrap_or(tool);
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("tools[{i}] has no function name: expected {{\"type\": \"function\", \"function\": {{\"name\": \"...\"}}}}"))?;
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') || name.len() > 64 {
            return Err(format!("tools[{i}].function.name {name:?} is invalid: use 1-64 letters, digits, '_', '-' or '.'"));
        }
        if specs.iter().any(|s| s.name == name) {
            return Err(format!("tools[{i}].function.name {name:?} is given twice"));
        }
        let parameters = match function.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err(format!("tools[{i}].function.parameters must be a JSON schema object")),
        };
        super::response_format::within_grammar_bounds(&parameters, &format!("tools[{i}].function.parameters"))?;
        let description = function.get("description").and_then(Value::as_str).unwrap_or("").to_string();
        specs.push(ToolSpec { name: name.to_string(), description, parameters });
    }
    Ok(specs)
}

/// The JSON schema every reply must satisfy: an array of at most
/// [`MAX_CALLS`] calls (at least one when `required`), each naming one tool
/// and giving arguments valid for it.
pub fn reply_schema(tools: &[ToolSpec], required: bool) -> Value {
    let calls: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {
                    "name": {"const": t.name},
                    "arguments": t.parameters,
                },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let item = if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) };
    json!({"type": "array", "items": item, "minItems": usize::from(required), "maxItems": MAX_CALLS})
}

/// How the model may choose, from the OpenAI `tool_choice` argument:
/// `"auto"` (default: any tool or none), `"required"` (at least one call),
/// or `{"type": "function", "function": {"name": ...}}` (that tool only).
/// Returns the tools offered and whether a call is required.
pub fn apply_tool_choice(tools: Vec<ToolSpec>, choice: Option<&Value>) -> Result<(Vec<ToolSpec>, bool), String> {
    match choice {
        None | Some(Value::Null) => Ok((tools, false)),
        Some(Value::String(s)) if s == "auto" => Ok((tools, false)),
        Some(Value::String(s)) if s == "required" => Ok((tools, true)),
        Some(obj @ Value::Object(_)) => {
            let name = obj
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| obj.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| "tool_choice object must name a function: {\"type\": \"function\", \"function\": {\"name\": ...}}".to_string())?;
            let chosen: Vec<ToolSpec> = tools.into_iter().filter(|t| t.name == name).collect();
            if chosen.is_empty() {
                return Err(format!("tool_choice names {name:?}, which is not in tools"));
            }
            Ok((chosen, true))
        }
        Some(other) => Err(format!("tool_choice {other} is invalid: use \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")),
    }
}

/// The system message describing the tools and the reply format.
pub fn tools_prompt(tools: &[ToolSpec]) -> String {
    let mut out = String::from(
        "You can call functions. Available functions:\n",
    );
    for t in tools {
        out.push_str(&format!(
            "- {}: {}\n  parameters (JSON schema): {}\n",
            t.name,
            if t.description.is_empty() { "(no description)" } else { &t.description },
            t.parameters
        ));
    }
    out.push_str(
        "Reply with only a JSON array of calls, like \
         [{\"name\": \"function_name\", \"arguments\": {...}}]. \
         Reply with [] if no function fits the request.",
    );
    out
}

/// One parsed call, in OpenAI format.
pub fn openai_call(id: String, name: &str, arguments: &Value) -> Value {
    json!({
        "id": id,
        "type": "function",
        "function": {"name": name, "arguments": arguments.to_string()},
    })
}

/// Parse the model's reply into `(name, arguments)` pairs; a call repeated
/// with the same arguments counts once (small models like to repeat).
pub fn parse_reply(text: &str, tools: &[ToolSpec]) -> Result<Vec<(String, Value)>, String> {
    let mut calls = parse_calls(text, tools)?;
    let mut seen = Vec::new();
    calls.retain(|call| {
        let fresh = !seen.contains(call);
        if fresh {
            seen.push(call.clone());
        }
        fresh
    });
    Ok(calls)
}

fn parse_calls(text: &str, tools: &[ToolSpec]) -> Result<Vec<(String, Value)>, String> {
    let value: Value = serde_json::from_str(text.trim()).map_err(|e| format!("reply is not JSON: {e}"))?;
    let items = match value {
        Value::Array(items) => items,
        obj @ Value::Object(_) => vec![obj],
        other => return Err(format!("reply is not a list of calls: {other}")),
    };
    items
        .into_iter()
        .map(|item| {
            let name = item
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("call without a name: {item}"))?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(format!("call to unknown function {name:?}"));
            }
            let arguments = item.get("arguments").cloned().unwrap_or_else(|| json!({}));
            if !arguments.is_object() {
                return Err(format!("arguments of {name:?} are not an object: {arguments}"));
            }
            Ok((name.to_string(), arguments))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    #[test]
    fn tools_are_validated() {
        let specs = parse_tools(&[weather(), json!({"name": "ping"})]).unwrap();
        assert_eq!(specs[1].name, "ping");
        assert_eq!(specs[1].parameters["type"], "object");
        assert!(parse_tools(&[]).unwrap_err().contains("tools is empty"));
        assert!(parse_tools(&[json!({"type": "function"})]).unwrap_err().contains("tools[0]"));
        assert!(parse_tools(&[weather(), weather()]).unwrap_err().contains("twice"));
        assert!(parse_tools(&[json!({"name": "a b"})]).unwrap_err().contains("invalid"));
        assert!(parse_tools(&[json!({"name": "x", "parameters": 3})]).unwrap_err().contains("parameters"));
    }

    #[test]
    fn schema_names_each_tool() {
        let specs = parse_tools(&[weather(), json!({"name": "ping"})]).unwrap();
        let schema = reply_schema(&specs, false);
        assert_eq!(schema["type"], "array");
        assert_eq!(schema["minItems"], 0);
        assert_eq!(reply_schema(&specs, true)["minItems"], 1);
        assert_eq!(schema["items"]["anyOf"][0]["properties"]["name"]["const"], "get_weather");
        assert_eq!(schema["maxItems"], MAX_CALLS);
    }

    #[test]
    fn tool_choice_forms() {
        let specs = parse_tools(&[weather(), json!({"name": "ping"})]).unwrap();
        assert_eq!(apply_tool_choice(specs.clone(), None).unwrap().1, false);
        assert_eq!(apply_tool_choice(specs.clone(), Some(&json!("required"))).unwrap().1, true);
        let (only, required) =
            apply_tool_choice(specs.clone(), Some(&json!({"type": "function", "function": {"name": "ping"}}))).unwrap();
        assert_eq!((only.len(), only[0].name.as_str(), required), (1, "ping", true));
        assert!(apply_tool_choice(specs.clone(), Some(&json!({"function": {"name": "nope"}}))).is_err());
        assert!(apply_tool_choice(specs, Some(&json!(7))).is_err());
    }

    #[test]
    fn replies_parse_or_say_why() {
        let specs = parse_tools(&[weather()]).unwrap();
        let calls = parse_reply(r#"[{"name": "get_weather", "arguments": {"city": "Oslo"}}]"#, &specs).unwrap();
        assert_eq!(calls, vec![("get_weather".to_string(), json!({"city": "Oslo"}))]);
        assert!(parse_reply("[]", &specs).unwrap().is_empty());
        let twice = r#"[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_weather", "arguments": {"city": "Oslo"}},
                        {"name": "get_weather", "arguments": {"city": "Rome"}}]"#;
        assert_eq!(parse_reply(twice, &specs).unwrap().len(), 2);
        assert!(parse_reply("[{\"name\": \"nope\", \"arguments\": {}}]", &specs).unwrap_err().contains("unknown"));
        assert!(parse_reply("[{\"name\": \"get_weather\"", &specs).unwrap_err().contains("not JSON"));
        let call = openai_call("call_1".into(), "get_weather", &json!({"city": "Oslo"}));
        assert_eq!(call["function"]["arguments"], "{\"city\":\"Oslo\"}");
    }
}
