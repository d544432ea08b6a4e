//! MCP over stdio, read and written here rather than by rmcp's codec, so
//! that every line of input gets exactly one answer: a line that is not
//! valid UTF-8, not JSON, nested too deep, a JSON-RPC batch, or longer than
//! `server.max_line_bytes` is answered with a JSON-RPC error (`-32700` parse
//! error, `-32600` invalid request), with its id when one can be read, else
//! `null`. Notifications get no answer, as JSON-RPC says.
//!
//! One task owns stdout and writes every line, rmcp's answers and these
//! errors alike, so there are never two writers. A line over the limit is
//! read and discarded as it streams in, never buffered whole.

use std::future::Future;
use std::io;

use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use rmcp::RoleServer;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
/// Bytes of an over-long line kept to look for its id.
const ID_SNIFF_BYTES: usize = 4096;
/// Lines waiting to be written (back-pressure beyond that).
const OUTGOING_LINES: usize = 64;

/// The transport rmcp serves on: messages in, lines out.
pub struct StdioLines {
    incoming: mpsc::Receiver<RxJsonRpcMessage<RoleServer>>,
    outgoing: mpsc::Sender<String>,
}

/// Start the reader and the writer tasks over `reader` and `writer`.
pub fn stdio_lines<R, W>(reader: R, writer: W, max_line_bytes: usize) -> StdioLines
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::channel(OUTGOING_LINES);
    let (in_tx, in_rx) = mpsc::channel(OUTGOING_LINES);
    tokio::spawn(write_lines(writer, out_rx));
    tokio::spawn(read_lines(reader, max_line_bytes, in_tx, out_tx.clone()));
    StdioLines { incoming: in_rx, outgoing: out_tx }
}

impl Transport<RoleServer> for StdioLines {
    type Error = io::Error;

    fn send(&mut self, item: TxJsonRpcMessage<RoleServer>) -> impl Future<Output = Result<(), io::Error>> + Send + 'static {
        let outgoing = self.outgoing.clone();
        async move {
            let line = serde_json::to_string(&item).map_err(io::Error::other)?;
            outgoing.send(line).await.map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "stdout is closed"))
        }
    }

    fn receive(&mut self) -> impl Future<Output = Option<RxJsonRpcMessage<RoleServer>>> + Send {
        self.incoming.recv()
    }

    fn close(&mut self) -> impl Future<Output = Result<(), io::Error>> + Send {
        self.incoming.close();
        async { Ok(()) }
    }
}

async fn write_lines<W: AsyncWrite + Unpin>(mut writer: W, mut lines: mpsc::Receiver<String>) {
    while let Some(mut line) = lines.recv().await {
        line.push('\n');
        if writer.write_all(line.as_bytes()).await.is_err() || writer.flush().await.is_err() {
            // The reader is gone (StdoutWatch has said so); stop writing.
            return;
        }
    }
}

/// Split the input into lines of at most `max` bytes and hand each on.
async fn read_lines<R: AsyncRead + Unpin>(
    reader: R,
    max: usize,
    incoming: mpsc::Sender<RxJsonRpcMessage<RoleServer>>,
    outgoing: mpsc::Sender<String>,
) {
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
        if newline.is_some() && !finish_line(&mut line, &mut oversized, max, &incoming, &outgoing).await {
            return;
        }
    }
    // A last line without its newline.
    let _ = finish_line(&mut line, &mut oversized, max, &incoming, &outgoing).await;
}

/// Answer or pass on one complete line; false once rmcp has gone.
async fn finish_line(
    line: &mut Vec<u8>,
    oversized: &mut Option<(usize, Vec<u8>)>,
    max: usize,
    incoming: &mpsc::Sender<RxJsonRpcMessage<RoleServer>>,
    outgoing: &mpsc::Sender<String>,
) -> bool {
    if let Some((size, head)) = oversized.take() {
        let id = sniff_id(&head);
        tracing::warn!(bytes = size, "refused a line over server.max_line_bytes ({max})");
        let message = format!(
            "the message is over {max} bytes (server.max_line_bytes): it was read and discarded; send less \
             (for example shorter messages), or raise the limit"
        );
        let _ = outgoing.send(error_line(id, INVALID_REQUEST, &message)).await;
        return true;
    }
    let bytes = std::mem::take(line);
    match classify(&bytes) {
        Line::Empty | Line::Silent => true,
        Line::Message(msg) => incoming.send(*msg).await.is_ok(),
        Line::Answer(text) => {
            let _ = outgoing.send(text).await;
            true
        }
    }
}

/// What to do with one line.
enum Line {
    Empty,
    /// Passed to rmcp.
    Message(Box<RxJsonRpcMessage<RoleServer>>),
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
    match serde_json::from_value::<RxJsonRpcMessage<RoleServer>>(value) {
        Ok(msg) => Line::Message(Box::new(msg)),
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

fn error_value(id: Value, code: i64, message: &str) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(line: &[u8]) -> Value {
        match classify(line) {
            Line::Answer(text) => serde_json::from_str(&text).unwrap(),
            Line::Message(_) => panic!("passed on: {}", String::from_utf8_lossy(line)),
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
        assert!(matches!(classify(b"{\"jsonrpc\":\"2.0\",\"id\":9,\"result\":5}"), Line::Message(_) | Line::Silent));
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
        assert!(matches!(classify(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#), Line::Message(_)));
        assert!(matches!(classify("\u{feff}{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}".as_bytes()), Line::Message(_)));
        assert!(matches!(classify(b"   "), Line::Empty));
        assert!(matches!(classify(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#), Line::Message(_)));
    }

    #[test]
    fn ids_are_sniffed_from_the_head() {
        assert_eq!(sniff_id(br#"{"jsonrpc":"2.0","id": 12,"method":"#), json!(12));
        assert_eq!(sniff_id(br#"{"id":"abc","#), json!("abc"));
        assert_eq!(sniff_id(br#"{"method":"x"}"#), Value::Null);
    }
}
