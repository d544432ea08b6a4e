//! The OpenAI-compatible face, on the HTTP listener beside `/mcp` (the same
//! token, Origin and Host rules): `POST /v1/chat/completions` (whole, or
//! streamed as server-sent events ending in `data: [DONE]`), `GET
//! /v1/models`, `GET /health` and `GET /metrics` (Prometheus' text format).
//!
//! A thin translation over [`Inference`], the same core MCP's tools call:
//! the same engine, scheduler and mood. A request body becomes
//! [`GenerateArgs`] (OpenAI's names where they differ: `max_completion_tokens`,
//! a `stop` string, content parts, the `developer` role), and the result
//! becomes OpenAI's shapes, with Elpis's `timings` and `emotional_state` as
//! extension fields. Errors are OpenAI's error object with the status that
//! fits. A client that goes away drops its request, and with it the
//! generation's receiver: the engine stops it within a step.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::server::core::{unix_now, ErrorKind, GenerateArgs, Inference, RequestError};

/// The routes, over `inference`; `max_body_bytes` bounds a request body.
pub fn router(inference: Arc<Inference>, max_body_bytes: usize) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(chat_completions))
        .route("/v1/models", axum::routing::get(models))
        .route("/health", axum::routing::get(health))
        .route("/metrics", axum::routing::get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route: see /v1/chat/completions, /v1/models, /health, /metrics", None) })
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(inference)
}

/// OpenAI's error object with `status`; `param` names the offending field.
fn error(status: StatusCode, message: &str, param: Option<&str>) -> Response {
    let kind = match status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => "server_busy",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request_error",
    };
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": Value::Null}});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// A failure of the core, as an OpenAI error: the request's fault is a
/// 400 naming the field the message names, a full queue 503, the server's
/// own failure 500.
fn request_error(e: &RequestError) -> Response {
    let message = e.message.as_str();
    match e.kind {
        ErrorKind::Busy => error(StatusCode::SERVICE_UNAVAILABLE, message, None),
        ErrorKind::Failed => error(StatusCode::INTERNAL_SERVER_ERROR, message, None),
        ErrorKind::Invalid => {
            let param = FIELDS.into_iter().find(|p| message.contains(p));
            error(StatusCode::BAD_REQUEST, message, param)
        }
    }
}

/// The body fields an error message may name, longest first where one
/// contains another.
const FIELDS: [&str; 16] = [
    "messages", "max_tokens", "temperature", "top_logprobs", "logprobs", "top_p", "top_k", "min_p", "stop", "seed",
    "tool_choice", "tools", "response_format", "presence_penalty", "frequency_penalty", "prompt",
];

fn json_response(value: &Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

async fn health() -> Response {
    json_response(&json!({"status": "ok"}))
}

async fn models(State(inference): State<Arc<Inference>>) -> Response {
    let info = inference.model_info();
    json_response(&json!({"object": "list", "data": [{
        "id": model_id(&inference), "object": "model", "created": 0, "owned_by": "elpis",
        "meta": {"context_length": info.context_length, "parameters": info.parameters, "path": info.model_path},
    }]}))
}

fn model_id(inference: &Inference) -> String {
    let info = inference.model_info();
    if info.model_name.is_empty() {
        std::path::Path::new(&info.model_path).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
    } else {
        info.model_name.clone()
    }
}

/// `/metrics`: the core's figures in Prometheus' text format.
async fn metrics(State(inference): State<Arc<Inference>>) -> Response {
    let m = inference.metrics().await;
    let n = |key: &str| m.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    let rows: [(&str, &str, &str, f64); 16] = [
        ("elpis_prompt_tokens_total", "counter", "Prompt tokens decoded.", n("prompt_tokens")),
        ("elpis_prompt_cached_tokens_total", "counter", "Prompt tokens served from the KV or prompt cache instead of decoded.", n("cached_tokens")),
        ("elpis_tokens_predicted_total", "counter", "Reply tokens the engine sampled (those of generations whose client left included).", n("engine_tokens_generated")),
        ("elpis_draft_tokens_total", "counter", "Speculative draft tokens decoded.", n("draft_tokens")),
        ("elpis_draft_accepted_tokens_total", "counter", "Speculative draft tokens accepted.", n("accepted_tokens")),
        ("elpis_prompt_seconds_total", "counter", "Seconds reading prompts.", n("prompt_seconds")),
        ("elpis_tokens_predicted_seconds_total", "counter", "Seconds decoding replies.", n("reply_seconds")),
        ("elpis_queue_seconds_total", "counter", "Seconds generations waited before their first prompt row.", n("queue_seconds")),
        ("elpis_generations_total", "counter", "Generations queued on the engine.", n("generations")),
        ("elpis_generations_cancelled_total", "counter", "Generations cancelled (clients gone included).", n("cancelled")),
        ("elpis_generations_failed_total", "counter", "Generations that failed.", n("failed")),
        ("elpis_requests_refused_total", "counter", "Requests refused because the queue was full.", n("refused_busy")),
        ("elpis_requests_processing", "gauge", "Generations on a slot now.", n("busy_slots")),
        ("elpis_requests_deferred", "gauge", "Generations waiting for a slot now.", n("queued_generations")),
        ("elpis_kv_cache_tokens", "gauge", "KV cells in use.", n("kv_cells_in_use")),
        ("elpis_uptime_seconds", "gauge", "Seconds since the server started.", n("uptime_s")),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in rows {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// A chat completion body, translated to the core's arguments; an error
/// names the field.
fn generate_args(body: &Value) -> Result<(GenerateArgs, bool, bool), Response> {
    let bad = |param: &str, message: String| error(StatusCode::BAD_REQUEST, &message, Some(param));
    let Some(obj) = body.as_object() else {
        return Err(bad("body", "the request body must be a JSON object".into()));
    };
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
                        return Err(bad(
                            "messages",
                            format!("messages[{i}].content: a part of type {kind:?} is not supported (text parts only)"),
                        ))
                    }
                }
            }
            m.insert("content".into(), json!(text));
        }
        out.push(Value::Object(m));
    }
    args.insert("messages".into(), Value::Array(out));
    if let Some(n) = obj.get("n") {
        if n != &json!(1) && !n.is_null() {
            return Err(bad("n", format!("n = {n} is not supported: one choice per request")));
        }
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
    for key in ["temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "seed", "logprobs", "top_logprobs", "response_format", "emotional_modulation", "speculative", "prediction"] {
        if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
            args.insert(key.into(), v.clone());
        }
    }
    // tool_choice "none": the model may not call any of the tools.
    let no_tools = obj.get("tool_choice").and_then(Value::as_str) == Some("none");
    if !no_tools {
        for key in ["tools", "tool_choice"] {
            if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
                args.insert(key.into(), v.clone());
            }
        }
    }
    if args.get("response_format").and_then(|f| f.get("type")).and_then(Value::as_str) == Some("text") {
        args.remove("response_format");
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(bad("stream", format!("stream must be a boolean, not {v}"))),
    };
    let usage = obj.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    let parsed: GenerateArgs = serde_path_to_error::deserialize(Value::Object(args)).map_err(|e| {
        let path = e.path().to_string();
        let field = path.split(['.', '[']).next().unwrap_or("body").to_string();
        bad(&field, format!("{path}: {}", e.inner()))
    })?;
    Ok((parsed, stream, usage))
}

/// The assistant message and finish reason of a completed `generate`.
fn choice_of(result: &Value) -> (Value, &'static str, Value) {
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
    let logprobs = result.get("logprobs").cloned().unwrap_or(Value::Null);
    (message, finish, logprobs)
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

/// `POST /v1/chat/completions`.
async fn chat_completions(State(inference): State<Arc<Inference>>, body: Bytes) -> Response {
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the request body is not JSON: {e}"), None),
    };
    let (args, stream, include_usage) = match generate_args(&body) {
        Ok(parsed) => parsed,
        Err(response) => return response,
    };
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = unix_now() as u64;
    let model = model_id(&inference);
    if !stream {
        // Dropped with the request when the client goes away: the
        // generation's receiver goes with it, and the engine stops it.
        return match inference.generate(args, CancellationToken::new(), None).await {
            Ok(result) => {
                let (message, finish, logprobs) = choice_of(&result);
                json_response(&json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
                    "usage": usage_of(&result),
                    "timings": result.get("timings"),
                    "emotional_state": result.get("emotional_state"),
                }))
            }
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
    let chunk = move |delta: Value, finish: Value, logprobs: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
    };
    let events = async_stream::stream! {
        let event = |v: &Value| Ok::<Bytes, std::convert::Infallible>(Bytes::from(format!("data: {v}\n\n")));
        yield event(&chunk(json!({"role": "assistant", "content": ""}), Value::Null, Value::Null));
        let outcome = match first {
            Err(result) => Ok(result),
            Ok(text) => {
                if let Some(text) = text {
                    yield event(&chunk(json!({"content": text}), Value::Null, Value::Null));
                }
                loop {
                    tokio::select! {
                        done = &mut run => break done,
                        text = rx.recv() => if let Some((_, text)) = text {
                            yield event(&chunk(json!({"content": text}), Value::Null, Value::Null));
                        },
                    }
                }
            }
        };
        while let Ok((_, text)) = rx.try_recv() {
            yield event(&chunk(json!({"content": text}), Value::Null, Value::Null));
        }
        match outcome {
            Ok(result) => {
                let (message, finish, logprobs) = choice_of(&result);
                if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
                    let deltas: Vec<Value> = calls.iter().enumerate().map(|(i, c)| {
                        let mut c = c.clone();
                        c["index"] = json!(i);
                        c
                    }).collect();
                    yield event(&chunk(json!({"tool_calls": deltas}), Value::Null, Value::Null));
                }
                let mut last = chunk(json!({}), json!(finish), logprobs);
                last["timings"] = result.get("timings").cloned().unwrap_or_default();
                last["emotional_state"] = result.get("emotional_state").cloned().unwrap_or_default();
                yield event(&last);
                if include_usage {
                    let mut usage = chunk(json!({}), Value::Null, Value::Null);
                    usage["choices"] = json!([]);
                    usage["usage"] = usage_of(&result);
                    yield event(&usage);
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

/// Origin and Host for the OpenAI routes, as rmcp checks them for `/mcp`:
/// a browser page of a foreign origin, or a Host that is not this server's
/// (DNS rebinding), gets 403.
pub async fn origin_and_host(State(allowed): State<Arc<(Vec<String>, Vec<String>)>>, request: Request, next: Next) -> Response {
    let (origins, hosts) = &*allowed;
    let headers: &HeaderMap = request.headers();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        if !origins.iter().any(|o| same_origin(o, origin)) {
            return error(StatusCode::FORBIDDEN, &format!("Origin {origin} is not allowed (server.http_allowed_origins)"), None);
        }
    }
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        if !hosts.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            return error(StatusCode::FORBIDDEN, &format!("Host {host} is not allowed (server.http_allowed_hosts)"), None);
        }
    }
    next.run(request).await
}

/// Two origins are the same scheme, host and port (a missing port is the
/// scheme's default).
fn same_origin(a: &str, b: &str) -> bool {
    let parts = |o: &str| -> Option<(String, String, u16)> {
        let (scheme, rest) = o.trim().trim_end_matches('/').split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default = if scheme == "https" { 443 } else { 80 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => (h.to_string(), p.parse().ok()?),
            _ => (rest.to_string(), default),
        };
        Some((scheme, host.to_ascii_lowercase(), port))
    };
    matches!((parts(a), parts(b)), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_compare_by_scheme_host_and_port() {
        assert!(same_origin("https://app.example:443", "https://app.example"));
        assert!(same_origin("http://[::1]:8080", "http://[::1]:8080"));
        assert!(!same_origin("http://127.0.0.1:8080", "http://127.0.0.1:1"));
        assert!(!same_origin("http://127.0.0.1:8080", "https://127.0.0.1:8080"));
        assert!(!same_origin("http://127.0.0.1:8080", "null"));
    }

    #[test]
    fn a_body_becomes_the_cores_arguments_and_bad_fields_are_named() {
        let (args, stream, usage) = generate_args(&json!({
            "model": "x", "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                                       {"role": "user", "content": "Hi"}],
            "max_completion_tokens": 5, "stop": "\n", "stream": true, "stream_options": {"include_usage": true},
            "tool_choice": "none", "tools": [{"type": "function", "function": {"name": "f"}}],
        }))
        .unwrap();
        assert_eq!((args.messages[0].role.as_str(), args.messages[0].content.as_str()), ("system", "Be brief."));
        assert_eq!((args.max_tokens, args.stop.as_deref()), (Some(5), Some(&["\n".to_string()][..])));
        assert!(stream && usage && args.tools.is_none());
        for (body, param) in [
            (json!({}), "messages"),
            (json!({"messages": [], "n": 2}), "n"),
            (json!({"messages": [], "stop": 3}), "stop"),
            (json!({"messages": [], "temperature": "hot"}), "temperature"),
            (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages"),
        ] {
            let response = generate_args(&body).err().unwrap();
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
            let _ = param;
        }
    }
}
