//! What a reply is constrained to and read back as, beyond text: tool calls
//! (for `function_call`, and for `generate` and streams given `tools`) and
//! JSON (`response_format`). Each is a grammar set on the engine request,
//! then a reading of the finished text into the result's fields.

use serde_json::{json, Map, Value};

use crate::engine::{Completion, EngineHandle, FinishReason, Grammar, GenerationRequest};
use crate::prompt::{self, Message, NativeToolFormat, ToolSpec};
use super::error::RequestError;

/// A request's tools, set up: how to read the calls back.
pub struct ToolUse {
    pub tools: Vec<ToolSpec>,
    /// The model's own call format, or None for the generic JSON array.
    pub native: Option<NativeToolFormat>,
}

impl ToolUse {
    /// Validate `tools` and `tool_choice`, and set the request's grammar:
    /// in the model's own format when it has one (the tools go to its
    /// template; with `tool_choice: "auto"` the grammar waits for a call to
    /// begin, so the model may answer in text), else as a generic JSON
    /// array (the tools described in a system message).
    pub async fn prepare(
        engine: &EngineHandle,
        native: Option<NativeToolFormat>,
        tools: &[Value],
        choice: Option<&Value>,
        request: &mut GenerationRequest,
    ) -> Result<ToolUse, RequestError> {
        let tools = prompt::parse_tools(tools).map_err(RequestError::invalid)?;
        let (tools, required) = prompt::apply_tool_choice(tools, choice).map_err(RequestError::invalid)?;
        let grammar = match native {
            Some(format) => {
                let call = engine.schema_grammar(&prompt::call_schema(format, &tools)).await?;
                request.tools = Some(prompt::template_tools(&tools));
                Grammar {
                    gbnf: prompt::reply_grammar(format, &call),
                    triggers: if required { Vec::new() } else { prompt::triggers(format, &tools) },
                }
            }
            None => {
                let instructions = prompt::tools_prompt(&tools);
                match request.messages.first_mut() {
                    Some(first) if first.role == "system" => {
                        first.content = format!("{}\n\n{instructions}", first.content);
                    }
                    _ => request.messages.insert(0, Message::new("system", instructions)),
                }
                Grammar { gbnf: engine.schema_grammar(&prompt::reply_schema(&tools, required)).await?, triggers: Vec::new() }
            }
        };
        request.grammar = Some(grammar);
        Ok(ToolUse { tools, native })
    }

    /// A guard for streaming the reply's text without its call markup.
    pub fn guard(&self) -> prompt::CallGuard {
        prompt::CallGuard::new(self.native)
    }

    /// The calls in a finished reply: `tool_calls` (OpenAI format, `[]` for
    /// none), `content` (the words outside the calls, when any), or, when the
    /// reply cannot be read, `raw_content` and a `parse_error` that says why.
    pub fn read(&self, completion: &Completion) -> Map<String, Value> {
        let parsed = match self.native {
            Some(format) => prompt::parse_native(format, &completion.text, &self.tools).map(|r| (r.content, r.calls)),
            None => prompt::parse_reply(&completion.text, &self.tools).map(|calls| (String::new(), calls)),
        };
        // A constrained reply cut by the token limit is a runaway (a string
        // or array the model never closed), not a call: say so plainly.
        let parsed = match parsed {
            Err(_) if completion.finish_reason == FinishReason::Length => Err(format!(
                "the reply hit the token limit ({} tokens) inside a call, before the JSON was complete: \
                 the model ran away (for example an unbounded string or array); retry, lower the temperature, \
                 or bound the schema (maxLength, maxItems)",
                completion.usage.completion_tokens
            )),
            other => other,
        };
        let mut out = Map::new();
        match parsed {
            Ok((content, calls)) => {
                let calls: Vec<Value> = calls
                    .iter()
                    .map(|(name, arguments)| {
                        let id = format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]);
                        prompt::openai_call(id, name, arguments)
                    })
                    .collect();
                out.insert("tool_calls".into(), json!(calls));
                if !content.is_empty() {
                    out.insert("content".into(), json!(content));
                }
            }
            Err(parse_error) => {
                out.insert("tool_calls".into(), json!([]));
                out.insert("raw_content".into(), json!(completion.text));
                out.insert("parse_error".into(), json!(parse_error));
            }
        }
        out
    }
}

/// Constrain `request`'s reply to JSON valid for `schema`.
pub async fn json_reply(engine: &EngineHandle, schema: &Value, request: &mut GenerationRequest) -> Result<(), RequestError> {
    let gbnf = engine
        .schema_grammar(schema)
        .await
        .map_err(|e| RequestError::invalid(format!("response_format's schema cannot be turned into a grammar: {e}")))?;
    request.grammar = Some(Grammar { gbnf, triggers: Vec::new() });
    Ok(())
}

/// Whether a JSON reply parsed: None, or the `parse_error` to report.
pub fn json_problem(completion: &Completion) -> Option<String> {
    match serde_json::from_str::<Value>(&completion.text) {
        Ok(_) => None,
        Err(_) if completion.finish_reason == FinishReason::Length => Some(format!(
            "the reply hit the token limit ({} tokens) before the JSON was complete: raise max_tokens, or bound the \
             schema (maxLength, maxItems)",
            completion.usage.completion_tokens
        )),
        Err(_) if completion.finish_reason == FinishReason::Cancelled => Some("the reply was cancelled before the JSON was complete".into()),
        Err(e) => Some(format!("the reply is not JSON ({e})")),
    }
}
