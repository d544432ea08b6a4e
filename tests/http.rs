//! MCP over streamable HTTP (`--http`) and the stdio bridge (`--remote`),
//! on the real binary and the test model, all on 127.0.0.1: the refusals
//! (no token, wrong token, foreign Origin or Host, unknown session, too many
//! sessions, a body over the limit), sessions kept apart, a session's end
//! stopping its generations, and the bridge keeping every stdio rule (every
//! line answered, EOF ends the remote session and exits 0, a lost or absent
//! remote is a clear error on every request, never a hang, and a remote
//! that comes back is used again without restarting the client), over HTTPS
//! too.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "test-token-7c1f";

/// `elpis-server --http 127.0.0.1:0` and the URL it says it serves.
fn http_server(env: &[(&str, &str)]) -> (Server, String) {
    let server = Server::spawn_raw(env, &["--http", "127.0.0.1:0"]);
    let url = url_after(&server, "serving MCP on ");
    (server, url)
}

/// The URL a starting server names after `words` on stderr.
fn url_after(server: &Server, words: &str) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let stderr = server.stderr_all();
        // Only from a line that has ended: a read may land while it is written.
        let after = stderr.find(words).map(|at| &stderr[at + words.len()..]);
        if let Some((line, _)) = after.and_then(|rest| rest.split_once('\n')) {
            return line.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the HTTP server did not say where it listens; stderr:\n{}", server.stderr());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stop an HTTP server with SIGTERM: exit 0, nothing ever on stdout.
fn stop(mut server: Server) {
    server.kill_signal("TERM");
    let status = server.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "exit {status:?}; stderr:\n{}", server.stderr());
    assert!(server.notifications().is_empty(), "the HTTP server wrote to stdout: {:?}", server.notifications());
}

fn runtime() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A raw MCP-over-HTTP client: one POST per message, the answer read from
/// the SSE (or JSON) body.
struct Client {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
    session: Option<String>,
    next_id: u64,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    /// The JSON-RPC messages in the body.
    messages: Vec<Value>,
}

impl Client {
    fn new(url: &str, token: Option<&str>) -> Client {
        Client { http: reqwest::Client::new(), url: url.into(), token: token.map(String::from), session: None, next_id: 1 }
    }

    async fn post(&self, body: &Value, extra: &[(&str, &str)]) -> Reply {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.to_string());
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session).header("mcp-protocol-version", "2025-06-18");
        }
        for (k, v) in extra {
            request = request.header(*k, *v);
        }
        let response = tokio::time::timeout(TIMEOUT, request.send()).await.expect("POST timed out").expect("POST failed");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = tokio::time::timeout(TIMEOUT, response.text()).await.expect("body timed out").unwrap_or_default();
        let messages = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .chain(std::iter::once(text.as_str()).filter(|t| t.trim_start().starts_with('{')))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .collect();
        Reply { status, headers, messages }
    }

    fn message(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
    }

    /// Open a session: initialize, then notifications/initialized.
    async fn initialize(&mut self) -> Reply {
        let init = self.message(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "elpis-http-tests", "version": "1"}}),
        );
        let reply = self.post(&init, &[]).await;
        if reply.status == 200 {
            self.session = Some(reply.headers["mcp-session-id"].to_str().unwrap().to_string());
            let done = self.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}), &[]).await;
            assert_eq!(done.status, 202);
        }
        reply
    }

    /// A request's answer (the JSON-RPC message with its id).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let message = self.message(method, params);
        let reply = self.post(&message, &[]).await;
        assert_eq!(reply.status, 200, "{method}: HTTP {}", reply.status);
        reply
            .messages
            .into_iter()
            .find(|m| m.get("id") == message.get("id"))
            .unwrap_or_else(|| panic!("no answer to {method}"))
    }

    async fn tool(&mut self, name: &str, args: Value) -> ToolResult {
        parse_tool_response(&self.call("tools/call", json!({"name": name, "arguments": args})).await)
    }

    async fn delete(&self) -> u16 {
        let mut request = self.http.delete(&self.url).header("mcp-session-id", self.session.clone().unwrap());
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        request.send().await.unwrap().status().as_u16()
    }
}

async fn metrics(client: &mut Client) -> Value {
    let read = client.call("resources/read", json!({"uri": "elpis://metrics"})).await;
    serde_json::from_str(read["result"]["contents"][0]["text"].as_str().unwrap()).unwrap()
}

/// Issue 32: the listener is up before the model has loaded. From the
/// line that says it listens, every request is answered (never a refused
/// connection): 503 with OpenAI's error object and a Retry-After while the
/// model loads, then the real answer. Whether any request falls inside the
/// load depends on the machine; every answer's shape does not.
#[test]
fn while_the_model_loads_requests_get_503_then_answers() {
    let server = Server::spawn_raw(&[("ELPIS_SERVER_HTTP_TOKEN", TOKEN)], &["--http", "127.0.0.1:0"]);
    let base = url_after(&server, "listening on ");
    let deadline = Instant::now() + TIMEOUT;
    let (loading, ready) = runtime().block_on(async {
        let http = reqwest::Client::new();
        let mut loading = 0;
        loop {
            assert!(Instant::now() < deadline, "the model never finished loading; stderr:\n{}", server.stderr());
            // The token is checked first, loading or not.
            let anonymous = http.get(format!("{base}/health")).send().await.expect("a refused connection after the listening line");
            assert_eq!(anonymous.status().as_u16(), 401);
            let reply = http.get(format!("{base}/health")).bearer_auth(TOKEN).send().await.expect("a refused connection");
            let status = reply.status().as_u16();
            let retry = reply.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            let body: Value = serde_json::from_str(&reply.text().await.unwrap()).unwrap();
            match status {
                503 => {
                    assert_eq!(retry.as_deref(), Some("1"));
                    assert_eq!(body["error"]["type"], "unavailable_error", "{body}");
                    assert!(body["error"]["message"].as_str().unwrap().contains("loading"), "{body}");
                    loading += 1;
                }
                200 => break (loading, body),
                other => panic!("status {other} while loading: {body}"),
            }
        }
    });
    assert_eq!(ready, json!({"status": "ok"}));
    assert!(server.stderr_all().contains("serving MCP on "), "ready, but not said: {}", server.stderr());
    eprintln!("{loading} requests were answered 503 while the model loaded");
    stop(server);
}

/// A bridge started together with its remote (as a launcher may start
/// both): its first message waits while the remote answers 503 for its
/// loading model, and the session begins once it has loaded. Whether the
/// bridge had to wait depends on the machine's speed; the session does not.
#[test]
fn a_bridge_started_with_its_remote_waits_for_the_model() {
    let server = Server::spawn_raw(&[("ELPIS_SERVER_HTTP_TOKEN", TOKEN)], &["--http", "127.0.0.1:0"]);
    let base = url_after(&server, "listening on ");
    let url = format!("{base}/mcp");
    let mut relay = bridge(&url, &[("ELPIS_SERVER_HTTP_TOKEN", TOKEN)]);
    relay.initialize();
    let tools = relay.call("tools/list", json!({}));
    assert_eq!(tools["tools"].as_array().unwrap().len(), TOOL_NAMES.len(), "{tools}");
    let reply = relay.tool("generate", greedy_args("Hello", 2)).ok();
    assert!(reply["content"].is_string(), "{reply}");
    let waited = relay.stderr_all().contains("is loading its model");
    eprintln!("the bridge {} for the remote's model", if waited { "waited" } else { "did not need to wait" });
    relay.close_stdin();
    assert!(relay.wait_exit(TIMEOUT).success(), "bridge stderr:\n{}", relay.stderr());
    stop(server);
}

#[test]
fn exposure_without_its_protection_is_refused_at_start() {
    // Refused before the model loads: no model is needed to see it.
    for (env, args, says) in [
        (vec![], vec!["--http", "0.0.0.0:0"], "bearer token"),
        (vec![("ELPIS_SERVER_HTTP_TOKEN", TOKEN)], vec!["--http", "0.0.0.0:0"], "--insecure-http"),
        (vec![], vec!["--http", "127.0.0.1:0", "--remote", "http://127.0.0.1:1/mcp"], "not both"),
        (vec![("ELPIS_SERVER_HTTP_TLS_CERT", "/nonexistent.pem")], vec!["--http", "127.0.0.1:0"], "go together"),
    ] {
        let mut server = Server::spawn_raw(&env, &args);
        let status = server.wait_exit(TIMEOUT);
        assert!(!status.success(), "{args:?} started");
        assert!(server.stderr_all().contains(says), "{args:?}: {}", server.stderr());
    }
}

/// Issue 33: a page served from the listener's own loopback origin (a
/// browser MCP client) may call it; any other origin still gets 403, and
/// `server.http_allowed_origins` adds others.
#[test]
fn the_servers_own_loopback_origins_are_accepted_and_foreign_ones_refused() {
    let (server, url) = http_server(&[("ELPIS_SERVER_HTTP_ALLOWED_ORIGINS", "https://app.example:443")]);
    let port = url.trim_start_matches("http://127.0.0.1:").split('/').next().unwrap().to_string();
    runtime().block_on(async {
        let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}});
        let probe = Client::new(&url, None);
        for (origin, status) in [
            (format!("http://127.0.0.1:{port}"), 200),
            (format!("http://localhost:{port}"), 200),
            (format!("http://[::1]:{port}"), 200),
            ("https://app.example".to_string(), 200),
            ("http://127.0.0.1:1".to_string(), 403),
            (format!("http://evil.example:{port}"), 403),
            (format!("https://127.0.0.1:{port}"), 403),
        ] {
            assert_eq!(probe.post(&init, &[("origin", &origin)]).await.status, status, "Origin: {origin}");
        }
    });
    stop(server);
}

#[test]
fn refusals_and_the_life_of_a_session() {
    let (server, url) = http_server(&[
        ("ELPIS_SERVER_HTTP_TOKEN", TOKEN),
        ("ELPIS_SERVER_MAX_SESSIONS", "2"),
        ("ELPIS_SERVER_MAX_LINE_BYTES", "4096"),
    ]);
    runtime().block_on(async {
        // No token, a wrong token: 401 with the scheme to use.
        for token in [None, Some("wrong-token-7c1f")] {
            let reply = Client::new(&url, token).initialize().await;
            assert_eq!(reply.status, 401, "token {token:?}");
            let challenge = reply.headers["www-authenticate"].to_str().unwrap();
            assert!(challenge.starts_with("Bearer"), "{challenge}");
        }
        // A foreign Origin or Host (DNS rebinding): 403.
        let probe = Client::new(&url, Some(TOKEN));
        let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}});
        assert_eq!(probe.post(&init, &[("origin", "http://evil.example")]).await.status, 403);
        assert_eq!(probe.post(&init, &[("host", "evil.example")]).await.status, 403);
        // A body over server.max_line_bytes: 413.
        let big = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"pad": "a".repeat(8000)}});
        assert_eq!(probe.post(&big, &[]).await.status, 413);

        let mut a = Client::new(&url, Some(TOKEN));
        assert_eq!(a.initialize().await.status, 200);
        let tools = a.call("tools/list", json!({})).await;
        let mut names: Vec<&str> = tools["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        names.sort();
        let mut expected = TOOL_NAMES.to_vec();
        expected.sort();
        assert_eq!(names, expected);
        // An unknown session: 404.
        let mut stranger = Client::new(&url, Some(TOKEN));
        stranger.session = Some("no-such-session".into());
        let list = stranger.message("tools/list", json!({}));
        assert_eq!(stranger.post(&list, &[]).await.status, 404);
        // server.max_sessions = 2: a third session waits for one to end.
        let mut b = Client::new(&url, Some(TOKEN));
        assert_eq!(b.initialize().await.status, 200);
        let mut c = Client::new(&url, Some(TOKEN));
        let refused = c.initialize().await;
        assert_eq!(refused.status, 503);
        // DELETE ends a session: its id is unknown after, and a place is free.
        assert!((200..300).contains(&a.delete().await));
        let list = a.message("tools/list", json!({}));
        assert_eq!(a.post(&list, &[]).await.status, 404);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut c = Client::new(&url, Some(TOKEN));
            let status = c.initialize().await.status;
            if status == 200 {
                break;
            }
            assert_eq!(status, 503);
            assert!(Instant::now() < deadline, "the ended session's place was never freed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(b.tool("get_capabilities", json!({})).await.ok()["context_length"].as_u64().unwrap() > 0);
    });
    stop(server);
}

#[test]
fn sessions_are_apart_and_an_ended_session_stops_its_generations() {
    // Loopback needs no token.
    let (server, url) = http_server(&[]);
    runtime().block_on(async {
        let mut a = Client::new(&url, None);
        let mut b = Client::new(&url, None);
        assert_eq!(a.initialize().await.status, 200);
        assert_eq!(b.initialize().await.status, 200);
        // A long stream, far from done when the session ends.
        let start = a.tool("generate_stream_start", json!({"messages": user("Count slowly."), "max_tokens": 3000})).await.ok();
        let stream_id = start["stream_id"].as_str().unwrap().to_string();
        // Another session sees an unknown stream, for reading and cancelling.
        for tool in ["generate_stream_read", "generate_stream_cancel"] {
            let e = b.tool(tool, json!({"stream_id": stream_id})).await.err();
            assert!(e.contains("unknown stream_id"), "{tool}: {e}");
        }
        let read = a.tool("generate_stream_read", json!({"stream_id": stream_id})).await.ok();
        assert_eq!(read["is_complete"], false, "{read}");
        // The emotional state is one, shared: the model's mood, not a client's.
        let before = b.tool("get_emotion", json!({})).await.ok()["update_count"].as_u64().unwrap();
        a.tool("update_emotion", json!({"event_type": "success", "intensity": 0.4})).await.ok();
        assert_eq!(b.tool("get_emotion", json!({})).await.ok()["update_count"].as_u64().unwrap(), before + 1);

        let cancelled_before = metrics(&mut b).await["cancelled"].as_u64().unwrap();
        assert!((200..300).contains(&a.delete().await));
        // The ended session's stream is cancelled (not left to run 3000 tokens).
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let m = metrics(&mut b).await;
            if m["cancelled"].as_u64().unwrap() > cancelled_before {
                assert_eq!(m["finished"].as_u64().unwrap(), 0, "{m}");
                break;
            }
            assert!(Instant::now() < deadline, "the ended session's generation kept running: {m}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // B goes on.
        let out = b.tool("generate", json!({"messages": user("Hi"), "max_tokens": 4, "temperature": 0})).await.ok();
        assert!(out["content"].is_string());
    });
    assert!(server.stderr_all().contains("HTTP session ended"), "{}", server.stderr());
    stop(server);
}

/// A bridge (`elpis-server` with ELPIS_SERVER_REMOTE) in front of `url`.
fn bridge(url: &str, env: &[(&str, &str)]) -> Server {
    let mut all = vec![("ELPIS_SERVER_REMOTE", url)];
    all.extend_from_slice(env);
    Server::spawn_raw(&all, &[])
}

#[test]
fn the_bridge_keeps_every_stdio_rule() {
    let (server, url) = http_server(&[("ELPIS_SERVER_HTTP_TOKEN", TOKEN)]);
    let mut relay = bridge(&url, &[("ELPIS_SERVER_HTTP_TOKEN", TOKEN)]);
    // Answered here before the session begins, as stdio answers them.
    let early = relay.request("tools/list", json!({}));
    assert!(relay.wait(&early)["error"]["message"].as_str().unwrap().contains("send initialize first"));
    relay.send_line("{not json");
    relay.initialize();
    let tools = relay.call("tools/list", json!({}));
    assert_eq!(tools["tools"].as_array().unwrap().len(), TOOL_NAMES.len());
    // Progress notifications come through, before the answer.
    let id = relay.request(
        "tools/call",
        json!({"name": "generate", "arguments": greedy_args("Hello", 6), "_meta": {"progressToken": "p1"}}),
    );
    let reply = parse_tool_response(&relay.wait(&id)).ok();
    assert!(reply["content"].is_string(), "{reply}");
    let progress = relay.notifications().iter().filter(|n| n["method"] == "notifications/progress").count();
    assert!(progress >= 1, "no progress came through: {:?}", relay.notifications());
    // A polled stream, end to end.
    let start = relay.tool("generate_stream_start", greedy_args("Hi", 6)).ok();
    let (text, last) = poll_stream(&mut relay, start["stream_id"].as_str().unwrap(), Duration::from_millis(20));
    assert_eq!(last["full_content"].as_str().unwrap(), text);
    // A generation in flight at stdin's end: answered, and the remote
    // session ends (its generation stops there).
    let long = relay.request_tool("generate", json!({"messages": user("Count slowly."), "max_tokens": 3000}));
    relay.close_stdin();
    let answer = relay.wait(&long);
    assert!(answer.get("error").is_some() || answer.get("result").is_some(), "{answer}");
    let status = relay.wait_exit(TIMEOUT);
    assert!(status.success(), "bridge exit {status:?}; stderr:\n{}", relay.stderr());
    let deadline = Instant::now() + TIMEOUT;
    while !server.stderr_all().contains("HTTP session ended") {
        assert!(Instant::now() < deadline, "the remote session did not end; stderr:\n{}", server.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every line on the bridge's stdout was JSON-RPC (checked as read), and
    // the parse error was answered.
    stop(server);
}

#[test]
fn the_bridge_says_when_the_remote_is_lost_or_absent() {
    // Absent: nothing listens on the port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut relay = bridge(&format!("http://127.0.0.1:{port}/mcp"), &[]);
    let id = relay.request("initialize", json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}));
    let e = relay.wait(&id)["error"]["message"].as_str().unwrap().to_string();
    assert!(e.contains("cannot be reached") && e.contains(&port.to_string()), "{e}");
    let later = relay.request("tools/list", json!({}));
    let e = relay.wait(&later)["error"]["message"].as_str().unwrap().to_string();
    assert!(e.contains("lost") && e.contains("send initialize"), "{e}");
    // The remote comes up: the client's next initialize connects.
    let up = Server::spawn_raw(&[], &["--http", &format!("127.0.0.1:{port}")]);
    let deadline = Instant::now() + TIMEOUT;
    while !up.stderr_all().contains("serving MCP on ") {
        assert!(Instant::now() < deadline, "the remote did not start; stderr:\n{}", up.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let init = json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}});
    let answer = loop {
        let id = relay.request("initialize", init.clone());
        let answer = relay.wait(&id);
        if answer.get("result").is_some() {
            break answer;
        }
        assert!(Instant::now() < deadline, "initialize did not connect: {answer}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(answer["result"]["serverInfo"].is_object(), "{answer}");
    relay.notify("notifications/initialized", json!({}));
    assert_eq!(relay.call("tools/list", json!({}))["tools"].as_array().unwrap().len(), TOOL_NAMES.len());
    relay.close_stdin();
    assert!(relay.wait_exit(TIMEOUT).success());
    stop(up);

    // Lost: the remote dies while a generation is in flight.
    let (mut server, url) = http_server(&[]);
    let mut relay = bridge(&url, &[]);
    relay.initialize();
    let long = relay.request_tool("generate", json!({"messages": user("Count slowly."), "max_tokens": 3000}));
    // Started there (its progress is what the bridge is waiting on).
    relay.tool("get_capabilities", json!({})).ok();
    server.kill_signal("KILL");
    server.wait_exit(TIMEOUT);
    let answer = relay.wait(&long);
    let e = answer["error"]["message"].as_str().unwrap_or_else(|| panic!("{answer}"));
    assert!(e.contains("lost") || e.contains("cannot be reached"), "{e}");
    let later = relay.request("tools/list", json!({}));
    assert!(relay.wait(&later)["error"]["message"].as_str().unwrap().contains("lost"));
    relay.close_stdin();
    assert!(relay.wait_exit(TIMEOUT).success());
}

#[test]
fn the_bridge_connects_again_when_the_remote_is_back() {
    let (mut server, url) = http_server(&[]);
    let addr = url.trim_start_matches("http://").trim_end_matches("/mcp").to_string();
    let mut relay = bridge(&url, &[]);
    relay.initialize();
    let start = relay.tool("generate_stream_start", greedy_args("Hi", 400)).ok();
    let old_stream = start["stream_id"].as_str().unwrap().to_string();
    // The remote goes away and comes back on the same address, a new process.
    server.kill_signal("KILL");
    server.wait_exit(TIMEOUT);
    let meanwhile = relay.request("tools/list", json!({}));
    let e = relay.wait(&meanwhile)["error"]["message"].as_str().unwrap().to_string();
    assert!(e.contains("lost") || e.contains("cannot be reached"), "{e}");
    let back = Server::spawn_raw(&[], &["--http", &addr]);
    let deadline = Instant::now() + TIMEOUT;
    while !back.stderr_all().contains("serving MCP on ") {
        assert!(Instant::now() < deadline, "the remote did not come back; stderr:\n{}", back.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    // A request connects again (tries are at most once a second: until one
    // is made, the error says so).
    let tools = loop {
        let id = relay.request("tools/list", json!({}));
        let answer = relay.wait(&id);
        if answer.get("result").is_some() {
            break answer["result"].clone();
        }
        let e = answer["error"]["message"].as_str().unwrap_or_else(|| panic!("{answer}")).to_string();
        assert!(e.contains("lost"), "{e}");
        assert!(Instant::now() < deadline, "the bridge did not connect again: {e}; stderr:\n{}", relay.stderr());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(tools["tools"].as_array().unwrap().len(), TOOL_NAMES.len());
    assert!(relay.stderr_all().contains("connected to the remote Elpis at "), "{}", relay.stderr());
    // The new session works end to end; the old session's stream is gone.
    let reply = relay.tool("generate", greedy_args("Hello", 4)).ok();
    assert!(reply["content"].is_string(), "{reply}");
    let gone = relay.tool("generate_stream_read", json!({"stream_id": old_stream})).err();
    assert!(gone.contains("unknown stream"), "{gone}");
    relay.close_stdin();
    assert!(relay.wait_exit(TIMEOUT).success(), "bridge stderr:\n{}", relay.stderr());
    while !back.stderr_all().contains("HTTP session ended") {
        assert!(Instant::now() < deadline + TIMEOUT, "the new remote session did not end; stderr:\n{}", back.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    stop(back);
}

#[test]
fn https_with_a_certificate_the_bridge_trusts() {
    let dir = std::env::temp_dir().join(format!("elpis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let (cert_s, key_s) = (cert_path.to_str().unwrap(), key_path.to_str().unwrap());
    let (server, url) = http_server(&[
        ("ELPIS_SERVER_HTTP_TOKEN", TOKEN),
        ("ELPIS_SERVER_HTTP_TLS_CERT", cert_s),
        ("ELPIS_SERVER_HTTP_TLS_KEY", key_s),
    ]);
    assert!(url.starts_with("https://"), "{url}");
    // Trusted: it works.
    let mut relay = bridge(&url, &[("ELPIS_SERVER_HTTP_TOKEN", TOKEN), ("ELPIS_SERVER_REMOTE_CA", cert_s)]);
    relay.initialize();
    assert!(relay.tool("get_capabilities", json!({})).ok()["context_length"].as_u64().unwrap() > 0);
    relay.shutdown();
    // Not trusted: a clear error, no session.
    let mut relay = bridge(&url, &[("ELPIS_SERVER_HTTP_TOKEN", TOKEN)]);
    let id = relay.request("initialize", json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}));
    assert!(relay.wait(&id).get("error").is_some());
    relay.close_stdin();
    assert!(relay.wait_exit(TIMEOUT).success());
    // Plain HTTP to the TLS port gets nowhere.
    let plain = url.replacen("https://", "http://", 1);
    let refused = runtime().block_on(async { Client::new(&plain, Some(TOKEN)).http.get(&plain).send().await });
    assert!(refused.is_err() || refused.unwrap().status().as_u16() >= 400);
    stop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
