//! MCP over stdio, read and written here rather than by rmcp's codec, so
//! that every line of input gets exactly one answer: a line that is not
//! valid UTF-8, not JSON, nested too deep, a JSON-RPC batch, or longer than
//! `server.max_line_bytes` is answered with a JSON-RPC error (`-32700` parse
//! error, `-32600` invalid request), with its id when one can be read, else
//! `null`. Notifications get no answer, as JSON-RPC says.
//!
//! Before the session has begun (an `initialize` request, or a sessionless
//! request of MCP 2026-07-28 carrying its `_meta` fields), any other request
//! is answered here with an error that says what to send first, and
//! notifications are dropped: rmcp would otherwise end the session on them.
//!
//! Every request handed to rmcp is counted in a [`Ledger`] until its answer
//! has been queued for stdout (or the client cancelled it), so the server
//! can stop reading without leaving a request it read unanswered: rmcp sees
//! the end of input only once the ledger is empty.
//!
//! One task owns stdout and writes every line, rmcp's answers and these
//! errors alike, so there are never two writers. A line over the limit is
//! read and discarded as it streams in, never buffered whole.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use rmcp::RoleServer;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::session::Recorder;

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const INVALID_PARAMS: i64 = -32602;
/// Bytes of an over-long line kept to look for its id.
const ID_SNIFF_BYTES: usize = 4096;
/// Lines waiting to be written (back-pressure beyond that).
const OUTGOING_LINES: usize = 64;
/// The `_meta` fields a sessionless (MCP 2026-07-28) request carries in
/// place of an `initialize` handshake.
const SESSIONLESS_META: [&str; 2] = ["io.modelcontextprotocol/protocolVersion", "io.modelcontextprotocol/clientCapabilities"];

/// What the reader and rmcp's side share: whether the session has begun,
/// and the requests still owed an answer.
#[derive(Debug, Default)]
struct LedgerState {
    /// An `initialize` (or a complete sessionless request) went to rmcp.
    begun: bool,
    /// Requests handed to rmcp and not yet answered, by id (one at most per
    /// id: a request under an id still owed is refused at the gate).
    owed: HashMap<String, usize>,
    /// The reader has read its last line (stdin closed or failed).
    input_done: bool,
}

/// The answers the server still owes, shared by the reader (which records
/// each request it passes on) and the transport (which clears it when the
/// answer is queued for stdout).
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    state: Arc<(Mutex<LedgerState>, Notify)>,
}

impl Ledger {
    fn with<T>(&self, f: impl FnOnce(&mut LedgerState) -> T) -> T {
        let (lock, notify) = &*self.state;
        let out = f(&mut lock.lock().unwrap_or_else(|p| p.into_inner()));
        notify.notify_waiters();
        out
    }

    fn owe(&self, id: String) {
        self.with(|s| *s.owed.entry(id).or_default() += 1);
    }

    fn settle(&self, id: &str) {
        self.with(|s| {
            if let Some(n) = s.owed.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    s.owed.remove(id);
                }
            }
        });
    }

    /// Requests still owed an answer.
    pub fn owed(&self) -> usize {
        self.with(|s| s.owed.values().sum())
    }

    /// The ids of the requests still owed an answer, once per answer owed.
    pub fn owed_ids(&self) -> Vec<Value> {
        self.with(|s| {
            s.owed
                .iter()
                .flat_map(|(key, n)| std::iter::repeat_n(serde_json::from_str(key).unwrap_or(Value::Null), *n))
                .collect()
        })
    }

    /// Whether `initialize` (or a sessionless request) has passed the gate.
    pub fn begun(&self) -> bool {
        self.with(|s| s.begun)
    }

    /// Wait until every request read so far is answered; with `input_too`,
    /// also until the reader has read its last line.
    pub async fn settled(&self, input_too: bool) {
        let (lock, notify) = &*self.state;
        loop {
            let notified = notify.notified();
            {
                let s = lock.lock().unwrap_or_else(|p| p.into_inner());
                if s.owed.is_empty() && (s.input_done || !input_too) {
                    return;
                }
            }
            notified.await;
        }
    }
}

/// What the writer task is given: a line to write, or a request to say
/// when everything queued before it has been written.
enum Out {
    Line(String),
    Flushed(tokio::sync::oneshot::Sender<()>),
}

/// The ledger and a way to wait for stdout, for an orderly end.
pub struct StdioSession {
    pub ledger: Ledger,
    outgoing: mpsc::Sender<Out>,
}

impl StdioSession {
    /// Wait until every line queued so far has been written and flushed
    /// (false when stdout is gone).
    pub async fn flushed(&self) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.outgoing.send(Out::Flushed(tx)).await.is_ok() && rx.await.is_ok()
    }
}

/// The transport rmcp serves on: messages in, lines out.
pub struct StdioLines {
    incoming: mpsc::Receiver<RxJsonRpcMessage<RoleServer>>,
    outgoing: mpsc::Sender<Out>,
    ledger: Ledger,
}

impl StdioLines {
    /// The requests owed an answer (shared with the reader).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }
}

/// Start the reader and the writer tasks over `reader` and `writer`.
pub fn stdio_lines<R, W>(reader: R, writer: W, max_line_bytes: usize) -> (StdioLines, StdioSession)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::channel(OUTGOING_LINES);
    let (in_tx, in_rx) = mpsc::channel(OUTGOING_LINES);
    let ledger = Ledger::default();
    tokio::spawn(write_lines(writer, out_rx));
    let lines = LineReader { max: max_line_bytes, incoming: in_tx, outgoing: out_tx.clone(), ledger: ledger.clone() };
    tokio::spawn(lines.run(reader));
    let session = StdioSession { ledger: ledger.clone(), outgoing: out_tx.clone() };
    (StdioLines { incoming: in_rx, outgoing: out_tx, ledger }, session)
}

/// The id of an answer rmcp sends, as the ledger keys it.
fn answered_id(item: &TxJsonRpcMessage<RoleServer>) -> Option<String> {
    let id = match item {
        rmcp::model::JsonRpcMessage::Response(r) => Some(&r.id),
        rmcp::model::JsonRpcMessage::Error(e) => e.id.as_ref(),
        _ => None,
    }?;
    serde_json::to_value(id).ok().map(|v| id_key(&v))
}

/// How the ledger keys a request id.
fn id_key(id: &Value) -> String {
    id.to_string()
}

impl Transport<RoleServer> for StdioLines {
    type Error = io::Error;

    fn send(&mut self, item: TxJsonRpcMessage<RoleServer>) -> impl Future<Output = Result<(), io::Error>> + Send + 'static {
        let outgoing = self.outgoing.clone();
        let ledger = self.ledger.clone();
        let answered = answered_id(&item);
        async move {
            let line = serde_json::to_string(&item).map_err(io::Error::other)?;
            let sent = outgoing.send(Out::Line(line)).await.map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "stdout is closed"));
            if let Some(id) = answered {
                ledger.settle(&id);
            }
            sent
        }
    }

    /// The next message; at the end of input, only once every request
    /// read has been answered (rmcp stops serving when this says None).
    fn receive(&mut self) -> impl Future<Output = Option<RxJsonRpcMessage<RoleServer>>> + Send {
        let ledger = self.ledger.clone();
        let incoming = &mut self.incoming;
        async move {
            match incoming.recv().await {
                Some(message) => Some(message),
                None => {
                    ledger.settled(true).await;
                    None
                }
            }
        }
    }

    fn close(&mut self) -> impl Future<Output = Result<(), io::Error>> + Send {
        self.incoming.close();
        async { Ok(()) }
    }
}

async fn write_lines<W: AsyncWrite + Unpin>(mut writer: W, mut lines: mpsc::Receiver<Out>) {
    while let Some(out) = lines.recv().await {
        match out {
            Out::Line(mut line) => {
                line.push('\n');
                if writer.write_all(line.as_bytes()).await.is_err() || writer.flush().await.is_err() {
                    // The reader is gone (StdoutWatch has said so); stop writing.
                    return;
                }
            }
            Out::Flushed(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Splits the input into lines, answers what it can, hands the rest on.
struct LineReader {
    max: usize,
    incoming: mpsc::Sender<RxJsonRpcMessage<RoleServer>>,
    outgoing: mpsc::Sender<Out>,
    ledger: Ledger,
}

impl LineReader {
    /// Read lines of at most `max` bytes and deal with each, until the
    /// input ends (or rmcp has gone).
    async fn run<R: AsyncRead + Unpin>(self, reader: R) {
        self.read_all(reader).await;
        self.ledger.with(|s| s.input_done = true);
    }

    async fn read_all<R: AsyncRead + Unpin>(&self, reader: R) {
        let max = self.max;
        let mut reader = BufReader::with_capacity(64 * 1024, reader);
        let mut line: Vec<u8> = Vec::new();
        // Size so far of a line over the limit, and its first bytes.
        let mut oversized: Option<(usize, Vec<u8>)> = None;
        loop {
            let buf = match reader.fill_buf().await {
                Ok(buf) => buf,
                Err(e) => {
                    tracing::warn!("reading stdin failed: {e}");
                    break;
                }
            };
            if buf.is_empty() {
                break;
            }
            let newline = buf.iter().position(|&b| b == b'\n');
            let chunk = &buf[..newline.unwrap_or(buf.len())];
            match &mut oversized {
                Some((size, _)) => *size += chunk.len(),
                None if line.len() + chunk.len() > max => {
                    let size = line.len() + chunk.len();
                    let mut head = std::mem::take(&mut line);
                    head.truncate(ID_SNIFF_BYTES);
                    let room = ID_SNIFF_BYTES - head.len();
                    head.extend_from_slice(&chunk[..room.min(chunk.len())]);
                    head.shrink_to_fit();
                    oversized = Some((size, head));
                }
                None => line.extend_from_slice(chunk),
            }
            let consumed = chunk.len() + usize::from(newline.is_some());
            reader.consume(consumed);
            if newline.is_some() && !self.finish_line(&mut line, &mut oversized).await {
                return;
            }
        }
        // A last line without its newline.
        let _ = self.finish_line(&mut line, &mut oversized).await;
    }

    /// Answer or pass on one complete line; false once rmcp has gone.
    async fn finish_line(&self, line: &mut Vec<u8>, oversized: &mut Option<(usize, Vec<u8>)>) -> bool {
        let max = self.max;
        if let Some((size, head)) = oversized.take() {
            let id = sniff_id(&head);
            tracing::warn!(bytes = size, "refused a line over server.max_line_bytes ({max})");
            let message = format!(
                "the message is over {max} bytes (server.max_line_bytes): it was read and discarded; send less \
                 (for example shorter messages), or raise the limit"
            );
            self.answer(error_line(id, INVALID_REQUEST, &message)).await;
            return true;
        }
        let bytes = std::mem::take(line);
        match classify(&bytes) {
            Line::Empty | Line::Silent => true,
            Line::Message(msg, kind) => match self.admit(&kind) {
                Admit::Pass => self.incoming.send(*msg).await.is_ok(),
                Admit::Drop(why) => {
                    tracing::info!("ignored a message before the session began: {why}");
                    true
                }
                Admit::Answer(text) => {
                    self.answer(text).await;
                    true
                }
            },
            Line::Answer(text) => {
                self.answer(text).await;
                true
            }
        }
    }

    async fn answer(&self, line: String) {
        let _ = self.outgoing.send(Out::Line(line)).await;
    }

    /// The gate: before the session begins only `initialize`, `ping` and
    /// complete sessionless requests pass. Every request that passes is
    /// owed an answer; a client's cancellation settles what it cancelled.
    fn admit(&self, kind: &Kind) -> Admit {
        let begun = self.ledger.with(|s| s.begun);
        match kind {
            Kind::Request { id, method, missing_meta } => {
                let sessionless = missing_meta.is_empty();
                if !begun {
                    let opens = method == "initialize" || (sessionless && method != "ping");
                    if opens {
                        self.ledger.with(|s| s.begun = true);
                    } else if method != "ping" {
                        return Admit::Answer(not_begun(id, method, missing_meta));
                    }
                }
                // rmcp keys its answers by id: a second request under an id
                // still in flight would take the first one's answer and
                // leave the other owed for ever (and the session unable to
                // end). It is refused here, and the first goes on.
                let key = id_key(id);
                if self.ledger.with(|s| s.owed.contains_key(&key)) {
                    return Admit::Answer(error_line(
                        id.clone(),
                        INVALID_REQUEST,
                        &format!(
                            "request id {key} is already in flight: a request's id must differ from those of the \
                             requests still awaiting an answer (this one was not run; the earlier one goes on)"
                        ),
                    ));
                }
                self.ledger.owe(key);
                Admit::Pass
            }
            Kind::Notification { method, .. } if !begun => Admit::Drop(format!("notification {method}")),
            Kind::Notification { cancels: Some(id), .. } => {
                // rmcp drops the answer of a request the client cancelled.
                self.ledger.settle(&id_key(id));
                Admit::Pass
            }
            Kind::Notification { .. } => Admit::Pass,
            Kind::Response if !begun => Admit::Drop("a response".into()),
            Kind::Response => Admit::Pass,
        }
    }
}

/// What the gate does with a message.
enum Admit {
    Pass,
    /// Dropped, with a note for the log.
    Drop(String),
    /// Answered here, with this line.
    Answer(String),
}

/// The answer to a request sent before the session began: what to send first.
fn not_begun(id: &Value, method: &str, missing_meta: &[&str]) -> String {
    let partial = missing_meta.len() < SESSIONLESS_META.len();
    if partial {
        // A sessionless client that left fields out: name them.
        let message = format!(
            "request _meta is missing or has malformed required fields: {} (a sessionless MCP 2026-07-28 request \
             carries both {}; or send initialize first)",
            missing_meta.join(", "),
            SESSIONLESS_META.join(" and ")
        );
        return error_line(id.clone(), INVALID_PARAMS, &message);
    }
    let message = format!(
        "the session has not begun: send initialize first (and then notifications/initialized), before {method}; \
         a sessionless MCP 2026-07-28 client instead puts {} in each request's params._meta",
        SESSIONLESS_META.join(" and ")
    );
    error_line(id.clone(), INVALID_REQUEST, &message)
}

/// What kind of message a line holds, for the gate.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Request {
        id: Value,
        method: String,
        /// Sessionless `_meta` fields it lacks (all of them for an ordinary request).
        missing_meta: Vec<&'static str>,
    },
    Notification {
        method: String,
        /// `notifications/cancelled`: the request it cancels.
        cancels: Option<Value>,
    },
    Response,
}

impl Kind {
    fn of(value: &Value) -> Kind {
        let method = value.get("method").and_then(Value::as_str).unwrap_or_default().to_string();
        match value.get("id") {
            Some(id) if !method.is_empty() => {
                let meta = value.pointer("/params/_meta");
                let missing_meta = SESSIONLESS_META
                    .into_iter()
                    .filter(|key| {
                        let field = meta.and_then(|m| m.get(*key));
                        let well_formed = match *key {
                            "io.modelcontextprotocol/protocolVersion" => field.is_some_and(Value::is_string),
                            _ => field.is_some_and(Value::is_object),
                        };
                        !well_formed
                    })
                    .collect();
                Kind::Request { id: id.clone(), method, missing_meta }
            }
            None if !method.is_empty() => {
                let cancels = (method == "notifications/cancelled")
                    .then(|| value.pointer("/params/requestId").cloned())
                    .flatten();
                Kind::Notification { method, cancels }
            }
            _ => Kind::Response,
        }
    }
}

/// What to do with one line.
enum Line {
    Empty,
    /// For rmcp (after the gate), with what the gate needs to know of it.
    Message(Box<RxJsonRpcMessage<RoleServer>>, Kind),
    /// Answered here, with this line.
    Answer(String),
    /// A notification (or a client's response) that cannot be used: JSON-RPC
    /// gives it no answer.
    Silent,
}

fn classify(bytes: &[u8]) -> Line {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    let Ok(text) = std::str::from_utf8(bytes) else {
        let id = sniff_id(bytes);
        return Line::Answer(error_line(id, PARSE_ERROR, "parse error: the message is not valid UTF-8"));
    };
    let text = text.trim();
    if text.is_empty() {
        return Line::Empty;
    }
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            let why = if e.to_string().contains("recursion limit") {
                "parse error: the message is nested too deeply".to_string()
            } else {
                format!("parse error: the message is not JSON ({e})")
            };
            return Line::Answer(error_line(sniff_id(text.as_bytes()), PARSE_ERROR, &why));
        }
    };
    match value {
        Value::Array(items) => batch(items),
        Value::Object(_) => single(value),
        _ => Line::Answer(error_line(Value::Null, INVALID_REQUEST, "invalid request: a JSON-RPC message is an object")),
    }
}

fn single(value: Value) -> Line {
    let id = value.get("id").filter(|id| id.is_string() || id.is_number()).cloned();
    let is_response = value.get("method").is_none() && (value.get("result").is_some() || value.get("error").is_some());
    let is_notification = value.get("id").is_none() && value.get("method").is_some_and(Value::is_string);
    let kind = Kind::of(&value);
    match serde_json::from_value::<RxJsonRpcMessage<RoleServer>>(value) {
        Ok(msg) => Line::Message(Box::new(msg), kind),
        Err(e) if is_response => {
            tracing::info!("ignored a response the server cannot use: {e}");
            Line::Silent
        }
        Err(e) if is_notification => {
            tracing::info!("ignored a notification that is not valid: {e}");
            Line::Silent
        }
        Err(e) => match id {
            Some(id) => Line::Answer(error_line(id, INVALID_REQUEST, &format!("invalid request: {e}"))),
            None => Line::Answer(error_line(
                Value::Null,
                INVALID_REQUEST,
                &format!("invalid request: not a JSON-RPC 2.0 request or notification ({e})"),
            )),
        },
    }
}

/// MCP (2025-06-18) has no batches: each request in one gets an error, in
/// one batch answer as JSON-RPC says; notifications in it get none.
fn batch(items: Vec<Value>) -> Line {
    const WHY: &str = "invalid request: JSON-RPC batches are not supported (MCP removed them): send each message on a line of its own";
    if items.is_empty() {
        return Line::Answer(error_line(Value::Null, INVALID_REQUEST, WHY));
    }
    let answers: Vec<Value> = items
        .iter()
        .filter_map(|item| {
            let is_notification = item.get("method").is_some() && item.get("id").is_none();
            (!is_notification).then(|| error_value(item.get("id").cloned().unwrap_or(Value::Null), INVALID_REQUEST, WHY))
        })
        .collect();
    if answers.is_empty() {
        Line::Silent
    } else {
        Line::Answer(Value::Array(answers).to_string())
    }
}

pub(crate) fn error_value(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn error_line(id: Value, code: i64, message: &str) -> String {
    error_value(id, code, message).to_string()
}

/// The request id of a message that cannot be parsed whole, when its first
/// bytes show one (`"id": 7` or `"id": "abc"`); else null.
fn sniff_id(bytes: &[u8]) -> Value {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(ID_SNIFF_BYTES)]);
    let Some(at) = text.find("\"id\"") else { return Value::Null };
    let rest = text[at + 4..].trim_start();
    let Some(rest) = rest.strip_prefix(':') else { return Value::Null };
    let mut values = serde_json::Deserializer::from_str(rest.trim_start()).into_iter::<Value>();
    match values.next() {
        Some(Ok(id @ (Value::Number(_) | Value::String(_)))) => id,
        _ => Value::Null,
    }
}

/// Wraps stdout to notice a reader that is gone: a failed write (EPIPE, or
/// any error on the protocol channel) ends the session. A write that is
/// merely pending (a slow reader, a full pipe) is back-pressure, not an error.
pub struct StdoutWatch<W> {
    pub inner: W,
    pub broken: CancellationToken,
}

impl<W> StdoutWatch<W> {
    fn check<T>(&self, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(e)) = &poll {
            if !self.broken.is_cancelled() {
                tracing::warn!("writing to stdout failed ({e}): the client stopped reading; shutting down");
                self.broken.cancel();
            }
        }
        poll
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for StdoutWatch<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(poll)
    }
}

/// Wraps stdin to notice end-of-file at once (rmcp would otherwise keep
/// draining in-flight requests, which may be long generations), and to
/// record the session when ELPIS_RECORD is set.
pub struct StdinWatch<R> {
    pub inner: R,
    pub eof: CancellationToken,
    pub recorder: Option<Arc<Recorder>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for StdinWatch<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let at_eof = match &poll {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if let Some(recorder) = &self.recorder {
                    recorder.incoming(read);
                }
                read.is_empty() && buf.remaining() > 0
            }
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        };
        if at_eof && !self.eof.is_cancelled() {
            if let Some(recorder) = &self.recorder {
                recorder.closed();
            }
            self.eof.cancel();
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(line: &[u8]) -> Value {
        match classify(line) {
            Line::Answer(text) => serde_json::from_str(&text).unwrap(),
            Line::Message(..) => panic!("passed on: {}", String::from_utf8_lossy(line)),
            Line::Empty | Line::Silent => panic!("no answer: {}", String::from_utf8_lossy(line)),
        }
    }

    #[test]
    fn every_unusable_line_is_answered_with_its_id_when_readable() {
        let bad_utf8 = b"{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"tools/list\",\"params\":{\"x\":\"\xff\"}}";
        let a = answer(bad_utf8);
        assert_eq!((a["id"].clone(), a["error"]["code"].clone()), (json!(7), json!(PARSE_ERROR)));
        let deep = format!("{{\"jsonrpc\":\"2.0\",\"id\":\"d\",\"method\":\"x\",\"params\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
        let a = answer(deep.as_bytes());
        assert_eq!(a["id"], "d");
        assert!(a["error"]["message"].as_str().unwrap().contains("nested too deeply"), "{a}");
        let a = answer(b"{not json");
        assert_eq!((a["id"].clone(), a["error"]["code"].clone()), (Value::Null, json!(PARSE_ERROR)));
        assert_eq!(answer(b"42")["error"]["code"], INVALID_REQUEST);
        assert_eq!(answer(b"{\"hello\": 1}")["id"], Value::Null);
        let a = answer(b"{\"jsonrpc\":\"2.0\",\"id\":9,\"method\":5}");
        assert_eq!((a["id"].clone(), a["error"]["code"].clone()), (json!(9), json!(INVALID_REQUEST)));
        assert!(matches!(classify(b"{\"jsonrpc\":\"2.0\",\"id\":9,\"result\":5}"), Line::Message(..) | Line::Silent));
    }

    #[test]
    fn batches_get_one_error_per_request() {
        let a = answer(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"},3]"#);
        let items = a.as_array().unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["id"], 1);
        assert_eq!(items[1]["id"], Value::Null);
        assert!(items[0]["error"]["message"].as_str().unwrap().contains("batches"));
        assert!(matches!(classify(br#"[{"jsonrpc":"2.0","method":"notifications/initialized"}]"#), Line::Silent));
    }

    #[test]
    fn valid_messages_pass_and_blank_lines_are_nothing() {
        assert!(matches!(classify(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#), Line::Message(..)));
        assert!(matches!(classify("\u{feff}{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}".as_bytes()), Line::Message(..)));
        assert!(matches!(classify(b"   "), Line::Empty));
        assert!(matches!(classify(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#), Line::Message(..)));
    }

    #[test]
    fn ids_are_sniffed_from_the_head() {
        assert_eq!(sniff_id(br#"{"jsonrpc":"2.0","id": 12,"method":"#), json!(12));
        assert_eq!(sniff_id(br#"{"id":"abc","#), json!("abc"));
        assert_eq!(sniff_id(br#"{"method":"x"}"#), Value::Null);
    }

    fn reader() -> (LineReader, mpsc::Receiver<RxJsonRpcMessage<RoleServer>>) {
        let (in_tx, in_rx) = mpsc::channel(8);
        let (out_tx, _out_rx) = mpsc::channel(8);
        (LineReader { max: 1 << 20, incoming: in_tx, outgoing: out_tx, ledger: Ledger::default() }, in_rx)
    }

    fn kind(line: &str) -> Kind {
        Kind::of(&serde_json::from_str(line).unwrap())
    }

    #[test]
    fn before_initialize_requests_are_answered_and_notifications_dropped() {
        let (r, _rx) = reader();
        let Admit::Answer(text) = r.admit(&kind(r#"{"jsonrpc":"2.0","id":4,"method":"tools/list"}"#)) else { panic!() };
        let a: Value = serde_json::from_str(&text).unwrap();
        assert_eq!((a["id"].clone(), a["error"]["code"].clone()), (json!(4), json!(INVALID_REQUEST)));
        assert!(a["error"]["message"].as_str().unwrap().contains("send initialize first"), "{a}");
        // A sessionless client that forgot one field hears which.
        let partial = r#"{"jsonrpc":"2.0","id":"p","method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
        let Admit::Answer(text) = r.admit(&kind(partial)) else { panic!() };
        let a: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(a["error"]["code"], INVALID_PARAMS);
        let message = a["error"]["message"].as_str().unwrap();
        assert!(message.contains("io.modelcontextprotocol/clientCapabilities") && !message.contains("missing or has malformed required fields: io.modelcontextprotocol/protocolVersion"), "{message}");
        assert!(matches!(r.admit(&kind(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)), Admit::Drop(_)));
        assert!(matches!(r.admit(&kind(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)), Admit::Pass));
        assert_eq!(r.ledger.owed(), 1, "a ping before initialize is passed on and owed");
        assert!(!r.ledger.with(|s| s.begun));
    }

    #[test]
    fn initialize_begins_the_session_and_every_request_is_owed() {
        let (r, _rx) = reader();
        assert!(matches!(r.admit(&kind(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#)), Admit::Pass));
        assert!(matches!(r.admit(&kind(r#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#)), Admit::Pass));
        assert_eq!(r.ledger.owed(), 2);
        r.ledger.settle("0");
        assert!(matches!(r.admit(&kind(r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":7}}"#)), Admit::Pass));
        assert_eq!(r.ledger.owed(), 0, "a cancelled request is owed nothing");
        // A complete sessionless request begins a session too.
        let (r, _rx) = reader();
        let full = r#"{"jsonrpc":"2.0","id":3,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
        assert!(matches!(r.admit(&kind(full)), Admit::Pass));
        assert!(r.ledger.with(|s| s.begun));
    }

    /// Random lines, and real requests cut, spliced and bit-flipped: the
    /// classifier never panics, a line holding a request (an object with an
    /// id and a method) always goes on or is answered, never dropped, and
    /// every answer is JSON-RPC with an error and the request's id when it
    /// can be read. Fixed cases; ELPIS_PROPTEST_CASES runs more.
    #[test]
    fn random_lines_are_passed_on_or_answered() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let cases = std::env::var("ELPIS_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
        let mut runner = TestRunner::new_with_rng(
            Config { cases, failure_persistence: None, ..Config::default() },
            TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
        );
        const REAL: [&str; 4] = [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"generate","arguments":{"messages":[]}}}"#,
            r#"{"jsonrpc":"2.0","id":"a","method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"x","version":"1"}}}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#,
            r#"[{"jsonrpc":"2.0","id":2,"method":"ping"}]"#,
        ];
        let mutated = (proptest::sample::select(&REAL[..]), any::<proptest::sample::Index>(), any::<proptest::sample::Index>(), any::<u8>(), any::<bool>())
            .prop_map(|(line, cut, flip, bit, splice)| {
                let mut bytes = line.as_bytes().to_vec();
                if splice {
                    bytes.truncate(cut.index(bytes.len() + 1));
                }
                let at = flip.index(bytes.len().max(1));
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= 1 << (bit % 8);
                }
                bytes
            });
        let line = prop_oneof![proptest::collection::vec(any::<u8>(), 0..200), "\\PC{0,200}".prop_map(String::into_bytes), mutated];
        let outcome = runner.run(&line, |bytes| {
            let parsed: Option<Value> = std::str::from_utf8(&bytes).ok().and_then(|t| serde_json::from_str(t.trim_start_matches('\u{feff}')).ok());
            let request_id = parsed.as_ref().filter(|v| v.get("method").is_some()).and_then(|v| v.get("id")).filter(|id| id.is_string() || id.is_number()).cloned();
            match classify(&bytes) {
                Line::Answer(text) => {
                    let answer: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
                    let answers = answer.as_array().cloned().unwrap_or_else(|| vec![answer.clone()]);
                    for a in &answers {
                        prop_assert!(a["jsonrpc"] == "2.0" && a["error"]["message"].is_string(), "{}", a);
                    }
                    if let Some(id) = request_id {
                        prop_assert_eq!(&answer["id"], &id);
                    }
                }
                Line::Empty | Line::Silent => prop_assert!(request_id.is_none(), "a request was dropped: {}", String::from_utf8_lossy(&bytes)),
                Line::Message(..) => {}
            }
            Ok(())
        });
        if let Err(e) = outcome {
            panic!("{e}");
        }
    }
}
