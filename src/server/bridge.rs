//! `--remote URL`: relay MCP on stdio to an Elpis served over streamable
//! HTTP elsewhere, so an unmodified Psyche (which spawns `elpis-server` and
//! speaks stdio) can use a model on another machine by changing one
//! environment variable.
//!
//! Every rule of the stdio server holds through the bridge, because stdin
//! and stdout are read and written by the same [`transport`] code: every
//! line is answered (unusable lines here, the rest by the remote), nothing
//! else reaches stdout, and stdin's end closes the remote session (its
//! generations stop) and exits 0, answering what is still owed. A lost
//! connection (the remote down, restarted, unreachable, its session gone)
//! is a clear error on every request still owed, never a hang: while
//! requests are owed the bridge pings the remote, and a ping that fails or
//! goes unanswered for [`PING_LIMIT`] counts as lost. The next request after
//! a loss connects again (at most once every [`RECONNECT_EVERY`]; those in
//! between get the error at once): a new session with the client's own
//! `initialize` repeated, so the remote coming back needs no restart of
//! Psyche. Streams of the old session are gone (reading one says so); the
//! request that found the remote back is sent on the new session.
//!
//! [`transport`]: crate::server::transport

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use rmcp::model::{ClientJsonRpcMessage, JsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::Transport as _;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::server::transport::{error_value, stdio_lines, StdinWatch, StdioLines, StdoutWatch};
use crate::server::upstream::{Target, Upstream};

/// How often the remote is pinged while requests are owed.
const PING_EVERY: Duration = Duration::from_secs(2);
/// A ping unanswered this long means the connection is lost.
const PING_LIMIT: Duration = Duration::from_secs(30);
/// A request while the remote is lost tries to connect again at most this often.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// How long closing the remote session may take at the end.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);
/// JSON-RPC's implementation-defined server error, for a remote that is gone.
const REMOTE_LOST: i64 = -32000;
/// The prefix of the bridge's own ping ids (answers to them stay here).
const PING_ID: &str = "elpis-bridge/ping/";
/// The id of the bridge's own `initialize` when it connects again.
const REINIT_ID: &str = "elpis-bridge/initialize/";

/// Serve stdio through an engine process of our own, started again when it
/// ends unasked (see [`crate::server::upstream`]).
pub async fn supervise(config: &Config) -> anyhow::Result<()> {
    bridge(config, Target::Engine).await
}

/// Relay stdio to `target` until stdin closes (exit 0) or a signal comes.
pub async fn bridge(config: &Config, target: Target) -> anyhow::Result<()> {
    let remote = Upstream::connect(config, &target, None)?;
    let stdin_closed = CancellationToken::new();
    let reader = StdinWatch { inner: tokio::io::stdin(), eof: stdin_closed.clone(), recorder: None };
    let writer = StdoutWatch { inner: tokio::io::stdout(), broken: CancellationToken::new() };
    let (local, session) = stdio_lines(reader, writer, config.server.max_line_bytes);
    tracing::info!("relaying MCP on stdio to {}", target.name());
    let (outbox, sendings) = mpsc::unbounded_channel();
    let (failed, failures) = mpsc::unbounded_channel();
    tokio::spawn(send_in_order(sendings, failed));
    let mut relay = Relay {
        config: config.clone(),
        target,
        local,
        remote,
        lost: None,
        outbox,
        failures,
        pings: HashMap::new(),
        next_ping: 0,
        opened: false,
        startup: None,
        ready: false,
        init: None,
        epoch: 0,
        last_attempt: None,
        heard: false,
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut tick = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = relay.local.receive() => match message {
                Some(message) => relay.forward(message).await,
                None => {
                    // The reader is done (stdin's end may be seen here first).
                    tracing::info!("stdin closed: ending the remote session");
                    relay.end("stdin closed, so the bridge ended the remote session before this request was answered").await;
                    break;
                }
            },
            _ = stdin_closed.cancelled() => {
                tracing::info!("stdin closed: ending the remote session");
                relay.end("stdin closed, so the bridge ended the remote session before this request was answered").await;
                break;
            }
            message = relay.remote.receive(), if relay.lost.is_none() => match message {
                Some(message) => relay.back(message).await,
                None => {
                    // The transport has quit; a failed send that says why
                    // (unreachable, refused) is on its way: let it through first.
                    for _ in 0..8 {
                        tokio::task::yield_now().await;
                    }
                    while let Ok(failure) = relay.failures.try_recv() {
                        relay.failed(failure).await;
                    }
                    let why = relay.remote.ended().await;
                    if !relay.served() {
                        // An engine process that never served (a bad
                        // config, a worker down at start): its own error
                        // said why; end as it did.
                        if let Some(code) = relay.remote.failed_to_start().await {
                            let _ = tokio::time::timeout(CLOSE_LIMIT, session.flushed()).await;
                            std::process::exit(code);
                        }
                    }
                    relay.lose(why).await
                }
            },
            Some(failure) = relay.failures.recv() => relay.failed(failure).await,
            _ = tick.tick() => relay.watch().await,
            _ = sigterm.recv() => {
                tracing::info!("SIGTERM: ending the remote session");
                relay.end("the bridge was stopped (SIGTERM) before this request was answered").await;
                break;
            }
            _ = tokio::signal::ctrl_c() => {
                relay.end("the bridge was stopped (SIGINT) before this request was answered").await;
                break;
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_LIMIT, session.flushed()).await;
    tracing::info!("bridge shut down");
    Ok(())
}

/// A message on its way to the remote: what went wrong, if anything.
type Sending = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Failure>> + Send>>;

/// Hand each message to the HTTP transport after the one before it.
async fn send_in_order(mut sendings: mpsc::UnboundedReceiver<Sending>, failed: mpsc::UnboundedSender<Failure>) {
    while let Some(sending) = sendings.recv().await {
        if let Some(failure) = sending.await {
            let _ = failed.send(failure);
        }
    }
}

/// A send that failed, from the task that waited on it.
struct Failure {
    /// The request's id (None: a notification or a response).
    id: Option<Value>,
    why: String,
    /// The connection is gone, not only this message.
    fatal: bool,
    /// The connection it was sent on (a failure on an earlier one, after
    /// connecting again, is old news: its request was answered at the loss).
    epoch: u64,
}

/// The relay's state: both ends, and whether the remote is lost.
struct Relay {
    config: Config,
    target: Target,
    local: StdioLines,
    remote: Upstream,
    /// Why the remote is lost, once it is.
    lost: Option<String>,
    /// Sends to the remote, in the order read: one task hands them to the
    /// HTTP transport one after another (each done once its POST is
    /// accepted), so `notifications/initialized` cannot overtake, or be
    /// overtaken by, the request after it.
    outbox: mpsc::UnboundedSender<Sending>,
    failures: mpsc::UnboundedReceiver<Failure>,
    /// The bridge's pings in flight, by id, with when each went.
    pings: HashMap<String, Instant>,
    next_ping: u64,
    /// The first message (initialize) has gone to the remote.
    opened: bool,
    /// Whether the first message was `initialize` (None: none yet).
    startup: Option<bool>,
    /// The handshake is over (`notifications/initialized` went, or the
    /// client is sessionless): the bridge's own pings may go.
    ready: bool,
    /// The client's `initialize` and whether the remote accepted it
    /// (repeated when connecting again).
    init: Option<(ClientJsonRpcMessage, Value, bool)>,
    /// Which connection `remote` is: how many times it connected again.
    epoch: u64,
    /// When the last try to connect again began.
    last_attempt: Option<Instant>,
    /// Anything came back on the first connection.
    heard: bool,
}

impl Relay {
    /// A message from stdin: to the remote, or answered here when the
    /// remote is lost (or for a ping before the session began).
    async fn forward(&mut self, message: ClientJsonRpcMessage) {
        let id = match &message {
            JsonRpcMessage::Request(request) => Some(serde_json::to_value(&request.id).unwrap_or(Value::Null)),
            _ => None,
        };
        if let Some(why) = self.lost.clone() {
            let Some(owed) = id.clone() else { return };
            match self.reconnect(&message).await {
                Ok(()) => {}
                Err(failed) => {
                    let why = format!("the connection to {} is lost ({why}){failed}", self.target.name());
                    self.answer(error_value(owed, REMOTE_LOST, &why)).await;
                    return;
                }
            }
        }
        let is_ping = matches!(&message, JsonRpcMessage::Request(r) if matches!(r.request, rmcp::model::ClientRequest::PingRequest(_)));
        if is_ping && !self.opened {
            // The HTTP transport opens its session with the first message;
            // a ping before initialize is answered here, as stdio would.
            if let Some(id) = id {
                self.answer(json!({"jsonrpc": "2.0", "id": id, "result": {}})).await;
            }
            return;
        }
        if !self.opened {
            self.target.until_ready(&self.config).await;
        }
        self.opened = true;
        let initialized = matches!(&message, JsonRpcMessage::Notification(n) if matches!(n.notification, rmcp::model::ClientNotification::InitializedNotification(_)));
        let startup_is_initialize = matches!(&message, JsonRpcMessage::Request(r) if matches!(r.request, rmcp::model::ClientRequest::InitializeRequest(_)));
        if initialized || (self.startup.is_none() && !startup_is_initialize) {
            self.ready = true;
        }
        self.startup.get_or_insert(startup_is_initialize);
        if startup_is_initialize {
            if let Some(id) = &id {
                self.init = Some((message.clone(), id.clone(), false));
            }
        }
        tracing::debug!(message = %serde_json::to_string(&message).unwrap_or_default(), "to the remote");
        let sending = self.remote.send(message);
        let epoch = self.epoch;
        let _ = self.outbox.send(Box::pin(async move { sending.await.err().map(|e| Failure { id, fatal: e.fatal, why: e.why, epoch }) }));
    }

    /// The remote is lost and `message` (a request) came: connect again, on
    /// a new session that repeats the client's accepted `initialize`; or,
    /// when the client is starting over with an `initialize` of its own, a
    /// fresh connection that it opens. Err: what to add to the loss's error.
    async fn reconnect(&mut self, message: &ClientJsonRpcMessage) -> Result<(), String> {
        let is_initialize = matches!(message, JsonRpcMessage::Request(r) if matches!(r.request, rmcp::model::ClientRequest::InitializeRequest(_)));
        let accepted = self.init.as_ref().filter(|(_, _, accepted)| *accepted).map(|(init, _, _)| init.clone());
        let sessionless = self.startup == Some(false);
        if accepted.is_none() && !sessionless && !is_initialize {
            return Err("; send initialize to connect again".into());
        }
        if self.last_attempt.is_some_and(|at| at.elapsed() < RECONNECT_EVERY) {
            return Err(format!("; the bridge tries to connect again at the next request (at most once every {RECONNECT_EVERY:?})"));
        }
        self.last_attempt = Some(Instant::now());
        let mut remote = Upstream::connect(&self.config, &self.target, self.lost.as_deref())
            .map_err(|e| format!("; connecting again failed: {e:#}"))?;
        self.target.until_ready(&self.config).await;
        let reopened = if is_initialize || sessionless {
            // The client's own message opens the new session.
            false
        } else {
            let init = accepted.expect("checked above");
            let limit = self.target.handshake_limit();
            match tokio::time::timeout(limit, handshake(&mut remote, init, self.epoch + 1)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => return Err(format!("; connecting again failed: {e}")),
                Err(_) => return Err(format!("; connecting again took over {limit:?}")),
            }
        };
        self.epoch += 1;
        self.remote = remote;
        self.lost = None;
        self.pings.clear();
        self.opened = reopened;
        self.ready = reopened || sessionless;
        if is_initialize {
            self.startup = None;
        }
        tracing::info!(reconnects = self.epoch, "connected to {} again: a new session (streams of the old one are gone)", self.target.name());
        Ok(())
    }

    /// Whether the other end ever served: it said anything, or this is a
    /// connection made again.
    fn served(&self) -> bool {
        self.epoch > 0 || self.heard
    }

    /// A message from the remote: to stdout, unless it answers a ping of ours.
    async fn back(&mut self, message: ServerJsonRpcMessage) {
        self.heard = true;
        let answered = match &message {
            JsonRpcMessage::Response(r) => Some(&r.id),
            JsonRpcMessage::Error(e) => e.id.as_ref(),
            _ => None,
        };
        if let Some(rmcp::model::NumberOrString::String(id)) = answered {
            if self.pings.remove(id.as_ref()).is_some() {
                return;
            }
        }
        if let (JsonRpcMessage::Response(r), Some((_, id, accepted))) = (&message, self.init.as_mut()) {
            if serde_json::to_value(&r.id).is_ok_and(|answered| answered == *id) {
                *accepted = true;
            }
        }
        if self.local.send(message).await.is_err() {
            tracing::warn!("stdout is closed");
        }
    }

    async fn failed(&mut self, failure: Failure) {
        if failure.epoch != self.epoch {
            tracing::debug!("a failure on an earlier connection: {}", failure.why);
            return;
        }
        if let Some(ping) = failure.id.as_ref().and_then(Value::as_str).filter(|id| id.starts_with(PING_ID)) {
            self.pings.remove(ping);
            self.lose(failure.why).await;
            return;
        }
        if failure.fatal {
            if let Some(id) = failure.id {
                // Answered first, with its own reason; then the rest.
                let why = format!("{} cannot be reached: {}", self.target.name(), failure.why);
                self.answer(error_value(id, REMOTE_LOST, &why)).await;
            }
            self.lose(failure.why).await;
        } else if let Some(id) = failure.id {
            let why = format!("{} refused the request: {}", self.target.name(), failure.why);
            self.answer(error_value(id, REMOTE_LOST, &why)).await;
        } else {
            tracing::warn!("a message to the remote was not delivered: {}", failure.why);
        }
    }

    /// While requests are owed, ping the remote; a ping that failed or has
    /// waited too long means the connection is lost.
    async fn watch(&mut self) {
        if self.lost.is_some() || !self.ready {
            return;
        }
        if let Some(waited) = self.pings.values().map(Instant::elapsed).max() {
            if waited > PING_LIMIT {
                self.lose(format!("the remote did not answer a ping for {PING_LIMIT:?}")).await;
            }
            return;
        }
        if self.local.ledger().owed() == 0 {
            return;
        }
        self.next_ping += 1;
        let id = format!("{PING_ID}{}", self.next_ping);
        let ping: ClientJsonRpcMessage = match serde_json::from_value(json!({"jsonrpc": "2.0", "id": id, "method": "ping"})) {
            Ok(ping) => ping,
            Err(_) => return,
        };
        self.pings.insert(id.clone(), Instant::now());
        let sending = self.remote.send(ping);
        let epoch = self.epoch;
        let _ = self.outbox.send(Box::pin(async move {
            sending.await.err().map(|e| Failure { id: Some(Value::String(id)), why: e.why, fatal: true, epoch })
        }));
    }

    /// The remote is gone: every request owed gets an error that says so.
    async fn lose(&mut self, why: String) {
        if self.lost.is_some() {
            return;
        }
        tracing::error!("the connection to {} is lost: {why}", self.target.name());
        let message = self.target.loss(&why);
        self.answer_owed(&message).await;
        self.lost = Some(why);
    }

    /// The end (stdin closed, a signal): close the remote session, so its
    /// generations stop, and answer what is still owed.
    async fn end(&mut self, why: &str) {
        if self.lost.is_none() {
            if tokio::time::timeout(CLOSE_LIMIT, self.remote.close()).await.is_err() {
                tracing::warn!("closing the remote session took over {CLOSE_LIMIT:?}");
            }
            // An engine process answers what it owes before it exits.
            let answers = self.remote.answers_after_close();
            let _ = tokio::time::timeout(answers, async {
                while let Some(message) = self.remote.receive().await {
                    self.back(message).await;
                }
            })
            .await;
            self.remote.reap().await;
            self.lost = Some("the bridge ended".into());
        }
        self.answer_owed(why).await;
    }

    async fn answer_owed(&mut self, why: &str) {
        for id in self.local.ledger().owed_ids() {
            self.answer(error_value(id, REMOTE_LOST, why)).await;
        }
    }

    async fn answer(&mut self, error: Value) {
        match serde_json::from_value::<ServerJsonRpcMessage>(error) {
            Ok(message) => {
                let _ = self.local.send(message).await;
            }
            Err(e) => tracing::error!("cannot write an answer: {e}"),
        }
    }
}

/// Open a new session on `remote` with the client's `initialize` (under an
/// id of the bridge's; its answer stays here) and `notifications/initialized`.
async fn handshake(remote: &mut Upstream, init: ClientJsonRpcMessage, attempt: u64) -> Result<(), String> {
    let mut init = serde_json::to_value(&init).map_err(|e| e.to_string())?;
    let id = format!("{REINIT_ID}{attempt}");
    init["id"] = Value::String(id.clone());
    let init: ClientJsonRpcMessage = serde_json::from_value(init).map_err(|e| e.to_string())?;
    remote.send(init).await.map_err(|e| e.why)?;
    loop {
        match remote.receive().await {
            None => return Err("the remote closed the connection".into()),
            Some(JsonRpcMessage::Response(r)) if matches!(&r.id, rmcp::model::NumberOrString::String(s) if s.as_ref() == id) => break,
            Some(JsonRpcMessage::Error(e)) if matches!(&e.id, Some(rmcp::model::NumberOrString::String(s)) if s.as_ref() == id) => {
                return Err(format!("the remote refused initialize: {}", e.error.message));
            }
            Some(other) => tracing::debug!(message = %serde_json::to_string(&other).unwrap_or_default(), "from the remote while connecting again (dropped)"),
        }
    }
    let initialized: ClientJsonRpcMessage =
        serde_json::from_value(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).map_err(|e| e.to_string())?;
    remote.send(initialized).await.map_err(|e| e.why)
}
