//! What the stdio relay ([`bridge`]) talks to: a remote Elpis over
//! streamable HTTP (`--remote URL`), or an engine process of its own (a
//! server with `model.rpc_servers` is supervised: see below). Both carry
//! the same MCP messages; this file hides how.
//!
//! **The supervised engine.** ggml aborts the process when an RPC worker
//! dies in the middle of a decode (nothing can run the layers it held, and
//! llama.cpp has no way back). So a server that uses workers runs as two
//! processes: the one Psyche spawned relays stdio (and loads nothing), and
//! a child, the same binary with [`SUPERVISED_ENV`] set, loads the model
//! and serves. When the child ends without being asked to, every request
//! still owed gets an error carrying the child's last words (which name the
//! lost worker), and the next request starts a new child with
//! [`RESTARTED_ENV`] set: it goes on without the workers still down, and
//! the client's `initialize` is repeated to it, so Psyche's session goes on.
//! The child is the only process that touches the model, on its one thread.
//!
//! [`bridge`]: crate::server::bridge
//! [`RESTARTED_ENV`]: crate::engine::RESTARTED_ENV

use std::future::Future;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::service::RoleClient;
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::transport::streamable_http_client::{StreamableHttpClientTransportConfig, StreamableHttpError};
use rmcp::transport::{StreamableHttpClientTransport, Transport};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::oneshot;

use crate::config::Config;

/// Set in the environment of a supervised engine process (so it serves,
/// rather than supervising another).
pub const SUPERVISED_ENV: &str = "ELPIS_SUPERVISED";

/// How long an engine process may take to end once its stdin is closed
/// (it answers what it owes first), before it is killed.
const ENGINE_END_LIMIT: Duration = Duration::from_secs(40);

/// How long a bridge waits for a remote that is loading its model.
const LOADING_LIMIT: Duration = Duration::from_secs(300);

/// Where the relay sends what stdin brings.
#[derive(Debug, Clone)]
pub enum Target {
    /// A remote Elpis's MCP endpoint.
    Url(String),
    /// An engine process of our own.
    Engine,
}

impl Target {
    /// The other end, in words.
    pub fn name(&self) -> String {
        match self {
            Target::Url(url) => format!("the remote Elpis at {url}"),
            Target::Engine => "the engine process".into(),
        }
    }

    /// The error for a request still owed when the other end went.
    pub fn loss(&self, why: &str) -> String {
        match self {
            Target::Url(url) => format!("the connection to the remote Elpis at {url} was lost before this request was answered: {why}"),
            Target::Engine => format!("the engine process ended before this request was answered ({why}); the next request starts it again"),
        }
    }

    /// Before the first message on a new connection: wait while a remote
    /// is still loading its model (an engine process answers only once
    /// loaded, so there is nothing to wait for).
    pub async fn until_ready(&self, config: &Config) {
        if let Target::Url(url) = self {
            until_loaded(config, url, LOADING_LIMIT).await;
        }
    }

    /// How long the handshake on a new connection may take (an engine
    /// process loads the model first).
    pub fn handshake_limit(&self) -> Duration {
        match self {
            Target::Url(_) => Duration::from_secs(10),
            Target::Engine => Duration::from_secs(600),
        }
    }
}

/// A send that failed: whether the connection is gone, and why.
pub struct SendError {
    pub fatal: bool,
    pub why: String,
}

/// A send on its way.
pub type Sending = Pin<Box<dyn Future<Output = Result<(), SendError>> + Send>>;

/// One connection to the target.
pub enum Upstream {
    Http(StreamableHttpClientTransport<reqwest::Client>),
    Engine(EngineProcess),
}

/// A child serving MCP on its stdio, with its stderr passed on.
pub struct EngineProcess {
    child: Child,
    io: AsyncRwTransport<RoleClient, ChildStdout, ChildStdin>,
    /// The last lines it wrote to stderr (what it said before it ended).
    last_words: Arc<Mutex<Vec<String>>>,
    /// Fires when its stderr closes (every last word has been read).
    stderr_closed: Option<oneshot::Receiver<()>>,
}

impl Upstream {
    /// Connect to `target`; `restarted`: why the last engine process ended.
    pub fn connect(config: &Config, target: &Target, restarted: Option<&str>) -> anyhow::Result<Upstream> {
        match target {
            Target::Url(url) => connect_http(config, url).map(Upstream::Http),
            Target::Engine => EngineProcess::spawn(restarted).map(Upstream::Engine),
        }
    }

    pub fn send(&mut self, message: ClientJsonRpcMessage) -> Sending {
        match self {
            Upstream::Http(http) => {
                let sending = http.send(message);
                Box::pin(async move { sending.await.map_err(|e| SendError { fatal: is_fatal(&e), why: e.to_string() }) })
            }
            Upstream::Engine(engine) => {
                let sending = engine.io.send(message);
                Box::pin(async move { sending.await.map_err(|e| SendError { fatal: true, why: e.to_string() }) })
            }
        }
    }

    pub async fn receive(&mut self) -> Option<ServerJsonRpcMessage> {
        match self {
            Upstream::Http(http) => http.receive().await,
            Upstream::Engine(engine) => engine.io.receive().await,
        }
    }

    /// The other end closed the connection: why (for an engine process,
    /// how it ended and its last words).
    pub async fn ended(&mut self) -> String {
        match self {
            Upstream::Http(_) => "the remote closed the connection".into(),
            Upstream::Engine(engine) => engine.ended().await,
        }
    }

    /// An engine process that ended before it ever served: its exit code,
    /// for this process to end with (None: still running, or a remote).
    pub async fn failed_to_start(&mut self) -> Option<i32> {
        match self {
            Upstream::Http(_) => None,
            Upstream::Engine(engine) => {
                let status = tokio::time::timeout(Duration::from_secs(5), engine.child.wait()).await.ok()?.ok()?;
                Some(status.code().unwrap_or(1))
            }
        }
    }

    /// End the connection. An engine process is told by the end of its
    /// stdin: it answers what it owes, which [`receive`] still brings, and
    /// exits ([`reap`] waits for it).
    ///
    /// [`receive`]: Upstream::receive
    /// [`reap`]: Upstream::reap
    pub async fn close(&mut self) {
        match self {
            Upstream::Http(http) => {
                let _ = http.close().await;
            }
            Upstream::Engine(engine) => {
                let _ = engine.io.close().await;
            }
        }
    }

    /// How long answers may still come after [`close`](Upstream::close).
    pub fn answers_after_close(&self) -> Duration {
        match self {
            Upstream::Http(_) => Duration::ZERO,
            Upstream::Engine(_) => ENGINE_END_LIMIT,
        }
    }

    /// After the end: wait for an engine process to exit, or kill it.
    pub async fn reap(&mut self) {
        if let Upstream::Engine(engine) = self {
            if tokio::time::timeout(Duration::from_secs(5), engine.child.wait()).await.is_err() {
                tracing::warn!("the engine process did not end after its stdin's end: killing it");
                let _ = engine.child.kill().await;
            }
        }
    }
}

impl EngineProcess {
    /// This binary again, with the same arguments, serving on pipes.
    fn spawn(restarted: Option<&str>) -> anyhow::Result<EngineProcess> {
        let exe = std::env::current_exe().context("cannot find this program to start its engine process")?;
        let mut command = tokio::process::Command::new(exe);
        command
            .args(std::env::args_os().skip(1))
            .env(SUPERVISED_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(why) = restarted {
            command.env(crate::engine::RESTARTED_ENV, why);
        }
        let mut child = command.spawn().context("cannot start the engine process")?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
            anyhow::bail!("the engine process has no pipes");
        };
        let last_words = Arc::new(Mutex::new(Vec::new()));
        let (closed, stderr_closed) = oneshot::channel();
        let words = Arc::clone(&last_words);
        // Its stderr is ours (its log), line by line, keeping the last few.
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{line}");
                let mut words = words.lock().unwrap_or_else(|e| e.into_inner());
                words.push(line);
                if words.len() > 8 {
                    words.remove(0);
                }
            }
            let _ = closed.send(());
        });
        tracing::info!(pid = child.id(), "started the engine process");
        Ok(EngineProcess { child, io: AsyncRwTransport::new_client(stdout, stdin), last_words, stderr_closed: Some(stderr_closed) })
    }

    async fn ended(&mut self) -> String {
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        if let Some(closed) = self.stderr_closed.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
        }
        let how = match status {
            Ok(Ok(status)) => match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
                (Some(code), _) => format!("it exited with code {code}"),
                (None, Some(signal)) => format!("it was ended by signal {signal}"),
                _ => format!("it ended ({status})"),
            },
            _ => "its output closed".into(),
        };
        let words = self.last_words.lock().unwrap_or_else(|e| e.into_inner());
        // The line that says what happened, else the last one.
        let said = words
            .iter()
            .rev()
            .find(|l| l.contains("lost the RPC worker") || l.contains("llama.cpp aborted"))
            .or(words.last())
            .map(|l| l.trim_start_matches("elpis-server: ").to_string());
        match said {
            Some(said) => format!("{how}: {said}"),
            None => how,
        }
    }
}

/// Wait while a remote Elpis answers 503 because its model is loading (at
/// most `limit`, as often as its Retry-After says), so that a bridge started
/// with its remote is not refused. Anything else ends the wait: the relay
/// reports what it meets.
pub async fn until_loaded(config: &Config, url: &str, limit: Duration) {
    let (Ok(client), Ok(mut health)) = (http_client(config), reqwest::Url::parse(url)) else { return };
    let path = health.path().strip_suffix("/mcp").unwrap_or("").to_string();
    health.set_path(&format!("{path}/health"));
    health.set_query(None);
    let token = config.server.http_token.trim().to_string();
    let deadline = tokio::time::Instant::now() + limit;
    let mut waited = false;
    loop {
        let mut request = client.get(health.clone());
        if !token.is_empty() {
            request = request.bearer_auth(&token);
        }
        let Ok(reply) = request.send().await else { return };
        if reply.status().as_u16() != 503 {
            if waited {
                tracing::info!("the remote Elpis at {url} has loaded its model");
            }
            return;
        }
        if !waited {
            tracing::info!("the remote Elpis at {url} is loading its model: waiting (at most {limit:?})");
            waited = true;
        }
        let retry = reply.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).unwrap_or(1);
        let pause = Duration::from_secs(retry.clamp(1, 10));
        if tokio::time::Instant::now() + pause > deadline {
            return;
        }
        tokio::time::sleep(pause).await;
    }
}

/// An HTTP client that trusts `server.remote_ca` and follows no redirects.
fn http_client(config: &Config) -> anyhow::Result<reqwest::Client> {
    // reqwest's rustls needs a crypto provider: ring, as the server uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10));
    let ca = config.server.remote_ca.trim();
    if !ca.is_empty() {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read server.remote_ca {ca}"))?;
        let cert = reqwest::Certificate::from_pem(&pem).with_context(|| format!("server.remote_ca {ca} is not a PEM certificate"))?;
        client = client.add_root_certificate(cert);
    }
    client.build().context("cannot set up the HTTP client")
}

/// The HTTP client transport, with the token and the certificate to trust.
fn connect_http(config: &Config, url: &str) -> anyhow::Result<StreamableHttpClientTransport<reqwest::Client>> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("--remote {url:?} is not a URL: give one like https://gpu-box:8787/mcp"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        anyhow::bail!("--remote {url:?}: expected an http:// or https:// URL");
    }
    let client = http_client(config)?;
    let mut transport = StreamableHttpClientTransportConfig::with_uri(url).max_json_response_size(config.server.max_line_bytes);
    let token = config.server.http_token.trim();
    if !token.is_empty() {
        if parsed.scheme() == "http" && !parsed.host_str().is_some_and(is_loopback_host) {
            tracing::warn!("the bearer token goes to {url} in clear text: use https off this machine");
        }
        transport = transport.auth_header(token);
    }
    Ok(StreamableHttpClientTransport::with_client(client, transport))
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a failed send means the connection (or the session) is gone.
fn is_fatal<E: std::error::Error + Send + Sync + 'static>(e: &StreamableHttpError<E>) -> bool {
    !matches!(
        e,
        StreamableHttpError::ResponseBodyTooLarge { .. } | StreamableHttpError::Deserialize(_) | StreamableHttpError::UnexpectedContentType(_)
    ) && !matches!(e, StreamableHttpError::HttpStatus(status) if status.status == 400 || status.status == 413)
}
