//! The OpenAI-compatible face, on the HTTP listener beside `/mcp` (the same
//! token, Origin and Host rules): `POST /v1/chat/completions` and `POST
//! /v1/completions` (whole, or streamed as server-sent events ending in
//! `data: [DONE]`), `GET /v1/models`, `GET /health` and `GET /metrics`
//! (Prometheus' text format).
//!
//! A thin translation over [`Inference`], the same core MCP's tools call:
//! the same engine, scheduler and mood. [`bodies`] reads a request body
//! into the core's arguments (OpenAI's names where they differ:
//! `max_completion_tokens`, a `stop` string, content parts, the `developer`
//! role, a raw `prompt`); [`replies`] runs it and shapes the result, with
//! Elpis's `timings` and `emotional_state` as extension fields. Errors are
//! OpenAI's error object with the status that fits the core's
//! [`ErrorKind`].

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::server::core::{ErrorKind, Inference, RequestError};

pub mod bodies;
mod replies;

/// The routes, over `inference`; `max_body_bytes` bounds a request body.
pub fn router(inference: Arc<Inference>, max_body_bytes: usize) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(replies::chat_completions))
        .route("/v1/completions", axum::routing::post(replies::completions))
        .route("/v1/models", axum::routing::get(models))
        .route("/health", axum::routing::get(health))
        .route("/metrics", axum::routing::get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route: see /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics", None) })
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(inference)
}

/// OpenAI's error object with `status`; `param` names the offending field.
pub(super) fn error(status: StatusCode, message: &str, param: Option<&str>) -> Response {
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
pub(super) fn request_error(e: &RequestError) -> Response {
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

pub(super) fn json_response(value: &Value) -> Response {
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

pub(super) fn model_id(inference: &Inference) -> String {
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
}
