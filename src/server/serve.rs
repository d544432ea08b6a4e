//! Serving: load the engine on the runtime's one thread, serve MCP over
//! stdio, and stop promptly (exit 0) when stdin closes or SIGTERM/SIGINT
//! arrives, even in the middle of a generation.

use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rmcp::ServiceExt;
use tokio::runtime::Runtime;
use tokio::signal::unix::Signal;
use tokio::sync::oneshot;
use tokio::task::LocalSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::{Engine, EngineSettings};
use crate::server::http::{self, HttpSettings};
use crate::server::bridge;
use crate::server::upstream::{Target, SUPERVISED_ENV};
use crate::server::core::{Inference, Mood};
use crate::server::mcp::ElpisServer;
use crate::server::transport::{stdio_lines, Ledger, StdinWatch, StdoutWatch};
use crate::session::Recorder;

/// How long requests still running at the end may take to be answered once
/// generation has stopped (they answer within a step; this only bounds a hang).
const ANSWER_LIMIT: Duration = Duration::from_secs(30);
/// How long the last answers may take to be written to stdout.
const FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// Load the engine on this thread, run `session` as a task on the runtime
/// while this thread drives the engine (the engine is no task: only this
/// thread, in [`Engine::drive`], touches it), and return the session's
/// result. The engine stops when the session ends. The `chat` command uses
/// it too.
pub fn with_engine<T, Fut>(
    runtime: &Rc<Runtime>,
    local: &Rc<LocalSet>,
    config: &Config,
    settings: EngineSettings,
    session: impl FnOnce(Arc<Inference>) -> Fut + 'static,
) -> anyhow::Result<T>
where
    T: 'static,
    Fut: Future<Output = anyhow::Result<T>> + 'static,
{
    while_loading(runtime, local, config, settings, |loaded| async move {
        match loaded.await {
            Ok(inference) => session(inference).await,
            Err(_) => anyhow::bail!("the model did not load"),
        }
    })
}

/// As [`with_engine`], but the session starts before the model loads: it
/// gets the core once it is ready, and the runtime's tasks run while the
/// weights are read (a listener answers "loading" meanwhile).
pub fn while_loading<T, Fut>(
    runtime: &Rc<Runtime>,
    local: &Rc<LocalSet>,
    config: &Config,
    settings: EngineSettings,
    session: impl FnOnce(oneshot::Receiver<Arc<Inference>>) -> Fut,
) -> anyhow::Result<T>
where
    T: 'static,
    Fut: Future<Output = anyhow::Result<T>> + 'static,
{
    let over = CancellationToken::new();
    let session_over = over.clone();
    let (ready, loaded) = oneshot::channel();
    let session = session(loaded);
    let task = local.spawn_local(async move {
        let result = session.await;
        session_over.cancel();
        result
    });
    let (engine, handle) = Engine::load(&settings, Some(answer_while_loading(runtime, local)))?;
    let mood = Arc::new(Mood::new(config.emotion.clone()));
    let steering_mood = Arc::clone(&mood);
    handle.steer_with(Box::new(move || steering_mood.steering()));
    let _ = ready.send(Arc::new(Inference::new(handle, mood, config.model.clone(), &config.server)));
    engine.drive(runtime, local, &over);
    local.block_on(runtime, task).map_err(|e| anyhow::anyhow!("the session stopped abnormally: {e}"))?
}

/// The runtime's ready tasks, run from inside the model's load every few
/// milliseconds, each run bounded: the load is on this thread, so this is
/// the only way anything is answered meanwhile. Nothing that runs can reach
/// the engine: it does not exist yet.
fn answer_while_loading(runtime: &Rc<Runtime>, local: &Rc<LocalSet>) -> Box<dyn FnMut()> {
    const EVERY: Duration = Duration::from_millis(5);
    const ROUNDS: usize = 8;
    let (runtime, local) = (Rc::clone(runtime), Rc::clone(local));
    let mut last = std::time::Instant::now();
    Box::new(move || {
        if last.elapsed() >= EVERY {
            local.block_on(&runtime, async {
                for _ in 0..ROUNDS {
                    tokio::task::yield_now().await;
                }
            });
            last = std::time::Instant::now();
        }
    })
}

/// Where MCP is served.
#[derive(Debug, Clone)]
pub enum Listen {
    /// On stdio (what Psyche spawns).
    Stdio,
    /// Over streamable HTTP, validated.
    Http(HttpSettings),
    /// On stdio, relayed to a remote Elpis at this URL.
    Remote(String),
}

impl Listen {
    /// From the command line, else the config (server.http, server.remote).
    pub fn choose(config: &Config, http: Option<String>, insecure_http: bool, remote: Option<String>) -> anyhow::Result<Listen> {
        let http = http.or_else(|| Some(config.server.http.trim().to_string()).filter(|s| !s.is_empty()));
        let remote = remote.or_else(|| Some(config.server.remote.trim().to_string()).filter(|s| !s.is_empty()));
        match (http, remote) {
            (Some(_), Some(_)) => anyhow::bail!("serve over HTTP here (--http, server.http) or relay to a remote (--remote, server.remote), not both"),
            (Some(addr), None) => Ok(Listen::Http(HttpSettings::new(config, &addr, insecure_http)?)),
            (None, Some(url)) => Ok(Listen::Remote(url)),
            (None, None) => Ok(Listen::Stdio),
        }
    }
}

/// Serve MCP until the client goes, stdin closes or a signal comes.
pub fn serve(runtime: &Rc<Runtime>, local: &Rc<LocalSet>, config: Config, listen: Listen) -> anyhow::Result<()> {
    // Listening before the model loads: a SIGTERM during the load is an
    // orderly end too, not a kill.
    let sigterm = {
        let _entered = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("cannot listen for SIGTERM")?
    };
    let settings = config.engine_settings();
    match listen {
        // ggml aborts when an RPC worker dies mid-decode: with workers, the
        // model lives in an engine process this one relays to and restarts.
        Listen::Stdio if !settings.rpc_servers.is_empty() && std::env::var_os(SUPERVISED_ENV).is_none() => {
            local.block_on(runtime, bridge::supervise(&config))
        }
        Listen::Stdio => with_engine(runtime, local, &config.clone(), settings, move |inference| session(config, inference, sigterm)),
        // The listener is up while the model loads, answering 503.
        Listen::Http(http) => while_loading(runtime, local, &config, settings, move |loaded| http::session(loaded, http, sigterm)),
        // No model here: the remote has it.
        Listen::Remote(url) => local.block_on(runtime, bridge::bridge(&config, Target::Url(url))),
    }
}

/// The MCP session on stdio.
///
/// Every request read is answered before the process exits: at the end,
/// generation stops (running replies end as `cancelled`), the answers still
/// owed are written, and only then does the session end. Stdin closing
/// before `initialize` is an orderly end too (exit 0).
async fn session(config: Config, inference: Arc<Inference>, mut sigterm: Signal) -> anyhow::Result<()> {
    let stdin_closed = CancellationToken::new();
    let recorder = match std::env::var_os("ELPIS_RECORD") {
        Some(path) if !path.is_empty() => {
            let path = std::path::PathBuf::from(path);
            let recorder = Recorder::create(&path)
                .with_context(|| format!("cannot open ELPIS_RECORD file {}", path.display()))?;
            tracing::info!(path = %path.display(), "recording the session");
            Some(Arc::new(recorder))
        }
        _ => None,
    };
    let (reader, writer) = rmcp::transport::io::stdio_pipes();
    let reader = StdinWatch { inner: reader, eof: stdin_closed.clone(), recorder: recorder.clone() };
    let stdout_broken = CancellationToken::new();
    let writer = StdoutWatch { inner: writer, broken: stdout_broken.clone() };
    let (transport, session) = stdio_lines(reader, writer, config.server.max_line_bytes);
    let handshake = ElpisServer::new(Arc::clone(&inference), recorder.clone()).serve(transport);
    let end = tokio::select! {
        service = handshake => match service {
            Ok(service) => {
                tracing::info!("serving MCP on stdio");
                serve_until_the_end(service, &session.ledger, &stdin_closed, &stdout_broken, &mut sigterm).await
            }
            Err(rmcp::service::ServerInitializeError::ConnectionClosed(_)) => {
                tracing::info!("stdin closed before the session began");
                End::Orderly
            }
            Err(e) => End::Failed(anyhow::Error::new(e).context("MCP initialisation failed")),
        },
        _ = stdout_broken.cancelled() => End::ReaderGone,
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM before the session began");
            End::Orderly
        }
        _ = tokio::signal::ctrl_c() => End::Orderly,
    };
    inference.cancel_all();
    if !matches!(end, End::ReaderGone) {
        // Every line queued for stdout is written before the process leaves
        // (bounded: a client that never reads must not hold the exit).
        if tokio::time::timeout(FLUSH_LIMIT, session.flushed()).await.is_err() {
            tracing::warn!("stdout did not take the last answers within {FLUSH_LIMIT:?}");
        }
    }
    tracing::info!("shut down");
    match end {
        End::Failed(e) => Err(e),
        End::Orderly | End::ReaderGone => Ok(()),
    }
}

/// How a session ended.
enum End {
    /// Stdin closed, a signal, or the client left: every answer owed was written.
    Orderly,
    /// Nobody reads stdout any more: nothing more can be written.
    ReaderGone,
    Failed(anyhow::Error),
}

/// Serve an initialised session until it ends; then stop generating and
/// wait until every request read has been answered.
async fn serve_until_the_end(
    service: rmcp::service::RunningService<rmcp::RoleServer, ElpisServer>,
    ledger: &Ledger,
    stdin_closed: &CancellationToken,
    stdout_broken: &CancellationToken,
    sigterm: &mut Signal,
) -> End {
    let cancel = service.cancellation_token();
    let inference = Arc::clone(service.service().inference());
    let mut waiting = Box::pin(service.waiting());
    let signalled = tokio::select! {
        _ = &mut waiting => {
            tracing::info!("client disconnected");
            return End::Orderly;
        }
        _ = stdin_closed.cancelled() => {
            tracing::info!("stdin closed");
            false
        }
        _ = stdout_broken.cancelled() => return End::ReaderGone,
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM");
            true
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT");
            true
        }
    };
    // Stop all generation now: running replies end as cancelled, and their
    // requests are answered with what was written so far.
    inference.cancel_all();
    let limit = tokio::time::sleep(ANSWER_LIMIT);
    tokio::pin!(limit);
    if signalled {
        // Stdin may stay open after a signal: stop once nothing read is owed.
        tokio::select! {
            _ = ledger.settled(false) => {}
            _ = &mut waiting => {}
            _ = stdout_broken.cancelled() => return End::ReaderGone,
            _ = &mut limit => tracing::warn!(owed = ledger.owed(), "answers still owed after {ANSWER_LIMIT:?}: leaving anyway"),
        }
        cancel.cancel();
        let _ = tokio::time::timeout(ANSWER_LIMIT, waiting).await;
    } else {
        // At stdin's end rmcp stops serving once every request read has
        // been answered (the transport holds the end of input back till then).
        tokio::select! {
            _ = &mut waiting => {}
            _ = stdout_broken.cancelled() => return End::ReaderGone,
            _ = &mut limit => {
                tracing::warn!(owed = ledger.owed(), "answers still owed after {ANSWER_LIMIT:?}: leaving anyway");
                cancel.cancel();
            }
        }
    }
    End::Orderly
}
