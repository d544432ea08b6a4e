//! The two generation routes, whole or streamed: a body read into the
//! core's arguments ([`super::bodies`]), one call of [`Inference::generate`],
//! and the result in the shape of the route ([`Shape`]): a chat message
//! and `chat.completion.chunk` deltas, or a `text_completion` and its text
//! chunks. A client that goes away drops the call, and with it the
//! generation's receiver: the engine stops it within a step.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::bodies::{self, BodyError, Parsed};
use super::{error, json_response, model_id, request_error};
use crate::server::core::{unix_now, Inference};

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(inference): State<Arc<Inference>>, body: Bytes) -> Response {
    reply(inference, &body, bodies::chat, Shape::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions(State(inference): State<Arc<Inference>>, body: Bytes) -> Response {
    reply(inference, &body, bodies::completion, Shape::Text).await
}

/// Which route's shapes a reply takes.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Text,
}

/// One reply's names, on every chunk.
struct Header {
    shape: Shape,
    id: String,
    created: u64,
    model: String,
}

impl Header {
    fn new(shape: Shape, inference: &Inference) -> Header {
        let prefix = match shape {
            Shape::Chat => "chatcmpl",
            Shape::Text => "cmpl",
        };
        Header { shape, id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()), created: unix_now() as u64, model: model_id(inference) }
    }

    fn object(&self, choice: Value, whole: bool) -> Value {
        let object = match (self.shape, whole) {
            (Shape::Chat, true) => "chat.completion",
            (Shape::Chat, false) => "chat.completion.chunk",
            (Shape::Text, _) => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]})
    }

    /// A chunk of new text.
    fn text(&self, text: &str) -> Value {
        match self.shape {
            Shape::Chat => self.object(json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}), false),
            Shape::Text => self.object(json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null}), false),
        }
    }

    /// The whole reply.
    fn whole(&self, result: &Value) -> Value {
        let (message, finish) = message_of(result);
        let logprobs = self.logprobs(result);
        let mut out = match self.shape {
            Shape::Chat => self.object(json!({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}), true),
            Shape::Text => self.object(json!({"index": 0, "text": message["content"], "logprobs": logprobs, "finish_reason": finish}), true),
        };
        out["usage"] = usage_of(result);
        extensions(&mut out, result);
        out
    }

    /// The stream's last events: tool calls as deltas (chat), then the
    /// finish reason with the log-probabilities and Elpis's extensions.
    fn ending(&self, result: &Value) -> Vec<Value> {
        let (message, finish) = message_of(result);
        let logprobs = self.logprobs(result);
        let mut out = Vec::new();
        let last = match self.shape {
            Shape::Chat => {
                if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
                    let deltas: Vec<Value> = calls.iter().enumerate().map(|(i, c)| {
                        let mut c = c.clone();
                        c["index"] = json!(i);
                        c
                    }).collect();
                    out.push(self.object(json!({"index": 0, "delta": {"tool_calls": deltas}, "logprobs": null, "finish_reason": null}), false));
                }
                json!({"index": 0, "delta": {}, "logprobs": logprobs, "finish_reason": finish})
            }
            Shape::Text => json!({"index": 0, "text": "", "logprobs": logprobs, "finish_reason": finish}),
        };
        let mut last = self.object(last, false);
        extensions(&mut last, result);
        out.push(last);
        out
    }

    /// The usage event (`stream_options.include_usage`): no choices.
    fn usage(&self, result: &Value) -> Value {
        let mut usage = self.object(Value::Null, false);
        usage["choices"] = json!([]);
        usage["usage"] = usage_of(result);
        usage
    }

    /// Chat: OpenAI's `{"content": [...]}` as the core gives it. Text:
    /// the legacy lists (tokens, their log-probabilities, the alternatives
    /// as maps, and each token's character offset in the reply).
    fn logprobs(&self, result: &Value) -> Value {
        let Some(content) = result.get("logprobs").and_then(|l| l.get("content")).and_then(Value::as_array) else {
            return Value::Null;
        };
        match self.shape {
            Shape::Chat => json!({"content": content}),
            Shape::Text => {
                let (mut tokens, mut logprobs, mut tops, mut offsets, mut at) = (vec![], vec![], vec![], vec![], 0usize);
                for entry in content {
                    let token = entry.get("token").and_then(Value::as_str).unwrap_or_default();
                    tokens.push(json!(token));
                    logprobs.push(entry.get("logprob").cloned().unwrap_or(Value::Null));
                    let top: serde_json::Map<String, Value> = entry.get("top_logprobs").and_then(Value::as_array).into_iter().flatten()
                        .filter_map(|t| Some((t.get("token")?.as_str()?.to_string(), t.get("logprob")?.clone())))
                        .collect();
                    tops.push(Value::Object(top));
                    offsets.push(json!(at));
                    at += token.chars().count();
                }
                json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets})
            }
        }
    }
}

/// Elpis's extension fields: the timings and the mood after the reply.
fn extensions(out: &mut Value, result: &Value) {
    out["timings"] = result.get("timings").cloned().unwrap_or_default();
    out["emotional_state"] = result.get("emotional_state").cloned().unwrap_or_default();
}

/// The assistant message and finish reason of a completed `generate`.
fn message_of(result: &Value) -> (Value, &'static str) {
    let calls = result.get("tool_calls").and_then(Value::as_array).filter(|c| !c.is_empty());
    let content = result.get("content").and_then(Value::as_str).unwrap_or_default();
    let finish = match (calls, result.get("finish_reason").and_then(Value::as_str)) {
        (Some(_), _) => "tool_calls",
        (None, Some("length")) => "length",
        _ => "stop",
    };
    let mut message = json!({"role": "assistant", "content": if calls.is_some() && content.is_empty() { Value::Null } else { json!(content) }});
    if let Some(calls) = calls {
        message["tool_calls"] = json!(calls);
    }
    (message, finish)
}

fn usage_of(result: &Value) -> Value {
    let u = result.get("usage").cloned().unwrap_or_default();
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    json!({
        "prompt_tokens": n("prompt_tokens"),
        "completion_tokens": n("completion_tokens"),
        "total_tokens": n("prompt_tokens") + n("completion_tokens"),
        "prompt_tokens_details": {"cached_tokens": n("cached_tokens")},
    })
}

/// Read the body, run the generation and answer in `shape`.
async fn reply(inference: Arc<Inference>, body: &[u8], read: fn(&Value) -> Result<Parsed, BodyError>, shape: Shape) -> Response {
    let body: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the request body is not JSON: {e}"), None),
    };
    let Parsed { args, stream, include_usage } = match read(&body) {
        Ok(parsed) => parsed,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.message, Some(&e.param)),
    };
    let header = Header::new(shape, &inference);
    if !stream {
        // Dropped with the request when the client goes away: the
        // generation's receiver goes with it, and the engine stops it.
        return match inference.generate(args, CancellationToken::new(), None).await {
            Ok(result) => json_response(&header.whole(&result)),
            Err(e) => request_error(&e),
        };
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut run = Box::pin(async move { inference.generate(args, CancellationToken::new(), Some(tx)).await });
    // Until the first text (or the end) the request can still fail as a
    // plain HTTP error: an invalid field is a 400, not an event.
    let first = tokio::select! {
        done = &mut run => Err(done),
        text = rx.recv() => Ok(text),
    };
    let first = match first {
        Err(Err(e)) => return request_error(&e),
        Err(Ok(result)) => Err(result),
        Ok(text) => Ok(text.map(|(_, t)| t)),
    };
    let events = async_stream::stream! {
        let event = |v: &Value| Ok::<Bytes, std::convert::Infallible>(Bytes::from(format!("data: {v}\n\n")));
        if let Shape::Chat = header.shape {
            yield event(&header.object(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}), false));
        }
        let outcome = match first {
            Err(result) => Ok(result),
            Ok(text) => {
                if let Some(text) = text {
                    yield event(&header.text(&text));
                }
                loop {
                    tokio::select! {
                        done = &mut run => break done,
                        text = rx.recv() => if let Some((_, text)) = text {
                            yield event(&header.text(&text));
                        },
                    }
                }
            }
        };
        while let Ok((_, text)) = rx.try_recv() {
            yield event(&header.text(&text));
        }
        match outcome {
            Ok(result) => {
                for last in header.ending(&result) {
                    yield event(&last);
                }
                if include_usage {
                    yield event(&header.usage(&result));
                }
            }
            Err(e) => {
                yield event(&json!({"error": {"message": e.message, "type": "server_error", "param": null, "code": null}}));
            }
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    let mut response = Response::new(Body::from_stream(events));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
