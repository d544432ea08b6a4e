//! MCP over streamable HTTP: the same tools, resources and notifications as
//! stdio, served at `/mcp` by rmcp's streamable HTTP service under axum,
//! for clients on other machines (or the `--remote` bridge).
//!
//! Safe by default. A loopback address needs nothing; any other address
//! refuses to start without a bearer token, and refuses a token over plain
//! HTTP unless the operator says `--insecure-http` (TLS comes from a
//! certificate and key). The token is compared in constant time; a request
//! without it gets 401 with `WWW-Authenticate: Bearer`. A request whose
//! `Origin` is not an allowed one gets 403, and the `Host` header is checked
//! (MCP's guard against DNS rebinding). Sessions are bounded
//! (`server.max_sessions`), and so are request bodies
//! (`server.max_line_bytes`). Each session is apart: a stream belongs to the
//! session that started it, and a session that ends (DELETE, idle timeout)
//! cancels its generations and drops its streams. The emotional state is
//! one, shared by every session: it is the model's mood, not a client's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::signal::unix::Signal;
use tokio::sync::oneshot;
use tower::ServiceExt as _;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::server::core::Inference;
use crate::server::mcp::{ElpisServer, SessionGuard};
use crate::server::openai;

/// How Elpis listens on HTTP, validated.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub addr: SocketAddr,
    pub token: Option<String>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub allowed_origins: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub max_sessions: usize,
    pub max_body_bytes: usize,
    pub session_idle: Duration,
}

impl HttpSettings {
    /// From the config and the command line; refuses what would expose the
    /// server without the protection it needs, saying why and what to do.
    pub fn new(config: &Config, addr: &str, insecure_http: bool) -> anyhow::Result<HttpSettings> {
        let s = &config.server;
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("--http {addr:?} is not an address: give host:port, for example 127.0.0.1:8787"))?;
        let token = Some(s.http_token.trim().to_string()).filter(|t| !t.is_empty());
        let tls = match (s.http_tls_cert.trim(), s.http_tls_key.trim()) {
            ("", "") => None,
            (cert, key) if !cert.is_empty() && !key.is_empty() => Some((PathBuf::from(cert), PathBuf::from(key))),
            _ => anyhow::bail!("server.http_tls_cert and server.http_tls_key go together: give both, or neither"),
        };
        let loopback = addr.ip().is_loopback();
        if !loopback && token.is_none() {
            anyhow::bail!(
                "--http {addr} is not a loopback address: anyone who can reach it could use the model. \
                 Set a bearer token (server.http_token or ELPIS_SERVER_HTTP_TOKEN), or listen on 127.0.0.1"
            );
        }
        if !loopback && tls.is_none() && !insecure_http {
            anyhow::bail!(
                "--http {addr} would send the bearer token in clear text: give a certificate and key \
                 (server.http_tls_cert, server.http_tls_key), or say --insecure-http on a network you trust"
            );
        }
        let mut allowed_hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"].into_iter().map(String::from).collect();
        if !addr.ip().is_unspecified() {
            allowed_hosts.push(addr.ip().to_string());
        }
        allowed_hosts.extend(s.http_allowed_hosts.iter().cloned());
        Ok(HttpSettings {
            addr,
            token,
            tls,
            allowed_origins: s.http_allowed_origins.clone(),
            allowed_hosts,
            max_sessions: s.max_sessions,
            max_body_bytes: s.max_line_bytes,
            session_idle: Duration::from_secs_f64(s.http_session_idle_s),
        })
    }
}

/// What the request guard needs.
struct Gate {
    token: Option<String>,
    sessions: Arc<AtomicUsize>,
    max_sessions: usize,
}

/// Bearer token first (401), then the bound on sessions for a request that
/// opens one (503).
async fn gate(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    if let Some(token) = &gate.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            let mut response = (StatusCode::UNAUTHORIZED, "a bearer token is required (Authorization: Bearer <token>)\n").into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"elpis\""));
            return response;
        }
    }
    let mcp = request.uri().path().starts_with("/mcp");
    let opens_session = mcp && request.method() == axum::http::Method::POST && !request.headers().contains_key("mcp-session-id");
    if opens_session && gate.sessions.load(Ordering::Relaxed) >= gate.max_sessions {
        let why = format!("too many sessions: {} are open (server.max_sessions); end one (DELETE) or try later\n", gate.max_sessions);
        return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    }
    let ends_session = mcp && request.method() == axum::http::Method::DELETE;
    let mut response = next.run(request).await;
    if ends_session && response.status() == StatusCode::ACCEPTED {
        // The session is gone when rmcp answers: say "done" (204), which
        // every client reads as success (the Python SDK warns on 202).
        *response.status_mut() = StatusCode::NO_CONTENT;
    }
    response
}

/// The origins a browser page may call from: the configured ones, and, on
/// a loopback listener, the server's own origins (a page it is served from,
/// as MCP's official SDKs accept); any other origin gets 403.
fn allowed_origins(configured: &[String], scheme: &str, local: SocketAddr) -> Vec<String> {
    let mut origins = configured.to_vec();
    if local.ip().is_loopback() {
        let port = local.port();
        origins.extend(["127.0.0.1", "localhost", "[::1]"].map(|host| format!("{scheme}://{host}:{port}")));
    }
    origins
}

/// Equal byte strings, in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Serve MCP and the OpenAI API over HTTP until SIGTERM or SIGINT; then
/// every generation stops (running replies answer as cancelled) and the
/// listener closes. The listener is up before the model has loaded: until
/// `loaded` gives the core, every request past the token check is a 503.
pub async fn session(loaded: oneshot::Receiver<Arc<Inference>>, settings: HttpSettings, mut sigterm: Signal) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .with_context(|| format!("cannot listen on {}", settings.addr))?;
    let stop = CancellationToken::new();
    let scheme = if settings.tls.is_some() { "https" } else { "http" };
    let local = listener.local_addr().unwrap_or(settings.addr);
    let origins = allowed_origins(&settings.allowed_origins, scheme, local);
    let routes: Arc<OnceLock<axum::Router>> = Arc::default();
    let gate = Arc::new(Gate { token: settings.token.clone(), sessions: Arc::default(), max_sessions: settings.max_sessions });
    let app = axum::Router::new()
        .fallback_service(tower::service_fn({
            let routes = Arc::clone(&routes);
            move |request: Request| {
                let routes = routes.get().cloned();
                async move {
                    Ok::<Response, std::convert::Infallible>(match routes {
                        Some(routes) => routes.oneshot(request).await.unwrap_or_else(|never| match never {}),
                        None => loading(),
                    })
                }
            }
        }))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&gate), self::gate));
    // Always said on stderr (never stdout), logs or not: with port 0 it is
    // how a launcher learns the port, and the second line says it is ready.
    crate::logging::say(&format!("listening on {scheme}://{local} (503 until the model has loaded)"));
    let shutdown = {
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = sigterm.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            }
            stop.cancel();
        }
    };
    let serving = async {
        match &settings.tls {
            None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(anyhow::Error::from),
            Some((cert, key)) => serve_tls(listener, app, tls_acceptor(cert, key)?, shutdown).await,
        }
    };
    tokio::pin!(serving);
    let inference = tokio::select! {
        loaded = loaded => match loaded {
            Ok(inference) => inference,
            Err(_) => anyhow::bail!("the model did not load"),
        },
        served = &mut serving => return served,
    };
    let _ = routes.set(self::routes(&inference, &settings, &gate, origins, stop.child_token()));
    tracing::info!("serving MCP on {scheme}://{local}/mcp and the OpenAI API on {scheme}://{local}/v1");
    crate::logging::say(&format!("serving MCP on {scheme}://{local}/mcp (OpenAI API: {scheme}://{local}/v1)"));
    let served = serving.await;
    inference.cancel_all();
    tracing::info!("shut down");
    served
}

/// What every request past the token check gets while the model loads:
/// 503 with OpenAI's error object (as llama-server answers then), and when
/// to try again.
fn loading() -> Response {
    let body = serde_json::json!({"error": {"message": "the model is loading: try again shortly", "type": "unavailable_error", "param": null, "code": 503}});
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// The routes over the loaded core: MCP at `/mcp` (rmcp's own Origin and
/// Host checks) and the OpenAI API (the same rules, as a layer).
fn routes(inference: &Arc<Inference>, settings: &HttpSettings, gate: &Arc<Gate>, origins: Vec<String>, stop: CancellationToken) -> axum::Router {
    let mut http = StreamableHttpServerConfig::default()
        .with_cancellation_token(stop)
        .with_allowed_hosts(settings.allowed_hosts.clone())
        .with_allowed_origins(origins.clone())
        .enforce_origin_validation()
        .with_max_request_body_bytes(settings.max_body_bytes);
    http.sse_keep_alive = Some(Duration::from_secs(15));
    let mut manager = LocalSessionManager::default();
    manager.session_config.keep_alive = Some(settings.session_idle);
    let factory_inference = Arc::clone(inference);
    let factory_sessions = Arc::clone(&gate.sessions);
    let service = StreamableHttpService::new(
        move || Ok(ElpisServer::for_session(Arc::clone(&factory_inference), SessionGuard::new(&factory_inference, &factory_sessions))),
        manager.into(),
        http,
    );
    let openai = openai::router(Arc::clone(inference), settings.max_body_bytes).layer(axum::middleware::from_fn_with_state(
        Arc::new((origins, settings.allowed_hosts.clone())),
        openai::origin_and_host,
    ));
    axum::Router::new().nest_service("/mcp", service).merge(openai)
}

/// A TLS acceptor from PEM files (the certificate chain and its key).
fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read the certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("{} is not a PEM private key", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and key do not go together")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accept TLS connections and serve `app` on each, until `shutdown`.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    acceptor: tokio_rustls::TlsAcceptor,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}");
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::info!(%peer, "TLS handshake failed: {e}");
                    return;
                }
            };
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(addr: &str, token: &str, insecure: bool) -> anyhow::Result<HttpSettings> {
        let mut config = Config::default();
        config.server.http_token = token.into();
        HttpSettings::new(&config, addr, insecure)
    }

    #[test]
    fn exposure_needs_a_token_and_tls_or_a_say_so() {
        assert!(settings("127.0.0.1:8787", "", false).is_ok(), "loopback needs nothing");
        let e = settings("0.0.0.0:8787", "", false).unwrap_err().to_string();
        assert!(e.contains("bearer token"), "{e}");
        let e = settings("0.0.0.0:8787", "secret", false).unwrap_err().to_string();
        assert!(e.contains("clear text") && e.contains("--insecure-http"), "{e}");
        assert!(settings("0.0.0.0:8787", "secret", true).is_ok());
        assert!(settings("nonsense", "", false).unwrap_err().to_string().contains("not an address"));
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"abc", b"ab"));
    }
}
