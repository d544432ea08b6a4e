//! One chat message as the wire carries it, and the roles it may have.
//! Pure; no model needed.

use serde::{Deserialize, Serialize};

/// One chat message as it arrives on the wire: `{role, content}`, plus the
/// optional OpenAI fields of a tool conversation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (null reads as empty, as on an assistant message that only
    /// calls tools).
    #[serde(deserialize_with = "null_as_empty")]
    pub content: String,
    /// On an assistant message: the calls it made, OpenAI format
    /// (`[{"id", "type": "function", "function": {"name", "arguments"}}]`;
    /// `arguments` a JSON string or object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// On a tool message: the id of the call this result answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// On a tool message: the function's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message { role: role.to_string(), content: content.into(), ..Message::default() }
    }

    /// The calls of an assistant message as `(name, arguments)`, arguments
    /// parsed from a JSON string when they are one.
    pub fn calls(&self) -> Vec<(String, serde_json::Value)> {
        let calls = self.tool_calls.as_deref().unwrap_or_default();
        calls
            .iter()
            .map(|call| {
                let function = call.get("function").unwrap_or(call);
                let name = function.get("name").and_then(serde_json::Value::as_str).unwrap_or_default();
                let arguments = match function.get("arguments") {
                    Some(serde_json::Value::String(s)) => {
                        serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.clone()))
                    }
                    Some(v) => v.clone(),
                    None => serde_json::json!({}),
                };
                (name.to_string(), arguments)
            })
            .collect()
    }
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// Roles a message may have.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

