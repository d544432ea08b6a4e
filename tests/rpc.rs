//! A model split over hosts with ggml RPC, on loopback: `elpis-server
//! rpc-worker` processes on 127.0.0.1 take the layers (`model.rpc_servers`,
//! `model.gpu_layers = 999`). Greedy replies through one and two workers
//! match the same model served locally; a worker down at start is a clear
//! error; a worker killed mid-generation fails the request in flight with
//! its name, and the server (its engine process started again) goes on.

mod common;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// An `elpis-server rpc-worker` on a free loopback port.
struct Worker {
    child: Child,
    addr: String,
    stderr_path: std::path::PathBuf,
}

impl Worker {
    fn start() -> Worker {
        // Ports below the ephemeral range, never the same twice in this
        // process: tests running at once cannot take each other's worker
        // for their own (a free port from bind(0) can be handed out twice).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        for attempt in 0..20 {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let port = (20_000 + (std::process::id() % 500) * 20 + n) as u16;
            let addr = format!("127.0.0.1:{port}");
            let stderr_path = std::env::temp_dir().join(format!("elpis-rpc-{}-{port}-{attempt}.stderr", std::process::id()));
            let stderr = std::fs::File::create(&stderr_path).unwrap();
            let mut child = Command::new(env!("CARGO_BIN_EXE_elpis-server"))
                .args(["rpc-worker", "--listen", &addr, "--threads", "1"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(stderr))
                .spawn()
                .unwrap();
            let deadline = Instant::now() + TIMEOUT;
            loop {
                if TcpStream::connect(&addr).is_ok() && child.try_wait().unwrap().is_none() {
                    return Worker { child, addr, stderr_path };
                }
                if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                    // The port was taken meanwhile (or the worker failed): another.
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("no RPC worker could start");
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
        let mut out = String::new();
        if let Some(stdout) = self.child.stdout.as_mut() {
            let _ = std::io::Read::read_to_string(stdout, &mut out);
        }
        assert!(out.is_empty() || std::thread::panicking(), "the RPC worker wrote to stdout: {out:?}");
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

const PROMPTS: [&str; 3] = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a village by the sea,"];

/// Greedy replies, with each token's two best candidates.
fn replies(server: &mut Server) -> Vec<Value> {
    PROMPTS
        .iter()
        .map(|p| {
            server.tool("generate", compared_args(user(p), 24)).ok()
        })
        .collect()
}

/// The same text, or a first difference at a near-tie: where the two
/// diverge, the local model's two best tokens were within `margin` nats
/// (a multi-device graph rounds differently from a one-device one).
fn assert_same_or_near_tie(local: &[Value], split: &[Value], how: &str) {
    const MARGIN: f32 = 0.25;
    for (i, (a, b)) in local.iter().zip(split).enumerate() {
        if a["content"] == b["content"] {
            continue;
        }
        let ta = a["logprobs"]["content"].as_array().unwrap();
        let tb = b["logprobs"]["content"].as_array().unwrap();
        let at = ta.iter().zip(tb).position(|(x, y)| x["token"] != y["token"]).expect("texts differ, tokens do not");
        let top = ta[at]["top_logprobs"].as_array().unwrap();
        let gap = top[0]["logprob"].as_f64().unwrap() - top[1]["logprob"].as_f64().unwrap();
        assert!(
            gap.abs() < f64::from(MARGIN),
            "{how}: reply {i} differs at token {at} where the local model was sure (gap {gap:.3}):\n local {}\n split {}",
            a["content"],
            b["content"]
        );
    }
}

fn split_over(workers: &[&Worker]) -> Server {
    let list = workers.iter().map(|w| w.addr.as_str()).collect::<Vec<_>>().join(",");
    Server::start(&[("ELPIS_MODEL_RPC_SERVERS", &list), ("ELPIS_MODEL_GPU_LAYERS", "999")])
}

#[test]
fn greedy_replies_match_the_local_model_through_one_and_two_workers() {
    let mut local = Server::start(&[]);
    let expected = replies(&mut local);
    local.shutdown();

    let first = Worker::start();
    let mut one = split_over(&[&first]);
    let got = replies(&mut one);
    let log = one.stderr_all();
    one.shutdown();
    assert!(log.contains(&format!("RPC device: {}", first.addr)), "the worker's device was not used:\n{log}");
    assert_same_or_near_tie(&expected, &got, "one worker");

    let second = Worker::start();
    let mut two = split_over(&[&first, &second]);
    let got = replies(&mut two);
    let log = two.stderr_all();
    two.shutdown();
    for w in [&first, &second] {
        assert!(log.contains(&format!("RPC device: {}", w.addr)), "{} was not used:\n{log}", w.addr);
    }
    assert_same_or_near_tie(&expected, &got, "two workers");
}

#[test]
fn a_worker_down_at_start_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = Server::spawn_raw(&[("ELPIS_MODEL_RPC_SERVERS", &addr), ("ELPIS_MODEL_GPU_LAYERS", "999")], &[]);
    let status = server.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(1), "a clean error exit, not an abort: {status:?}");
    let stderr = server.stderr_all();
    assert!(stderr.contains(&format!("the RPC worker at {addr} is not reachable")), "{stderr}");
    assert!(stderr.contains("rpc-worker --listen"), "says how to start it: {stderr}");
}

#[test]
fn a_worker_lost_mid_generation_fails_that_request_and_serving_goes_on() {
    let mut worker = Worker::start();
    let mut server = split_over(&[&worker]);
    let start = server.tool("generate_stream_start", json!({"messages": user("Count slowly to a thousand."), "max_tokens": 3000})).ok();
    let stream_id = start["stream_id"].as_str().unwrap().to_string();
    // Decoding through the worker has begun.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let read = server.tool("generate_stream_read", json!({"stream_id": stream_id})).ok();
        assert_eq!(read["is_complete"], false, "the generation ended before the worker was killed: {read}");
        if !read["new_content"].as_str().unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no token came through the worker");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A whole reply in flight too: it is owed when the worker goes.
    let owed = server.request_tool("generate", json!({"messages": user("Write a long story about the sea."), "max_tokens": 3000}));
    std::thread::sleep(Duration::from_millis(300));
    let addr = worker.addr.clone();
    worker.kill();
    // That request gets an error that names the lost worker.
    let answer = server.wait(&owed);
    let error = answer["error"]["message"].as_str().unwrap_or_else(|| panic!("not an error: {answer}\n{}", server.stderr()));
    assert!(error.contains(&format!("lost the RPC worker at {addr}")), "{error}");
    // The stream of before is gone, and reading it says why.
    let read = server.tool("generate_stream_read", json!({"stream_id": stream_id})).err();
    assert!(read.contains("restarted") && read.contains(&addr), "{read}");
    eprintln!("the request in flight: {error}\nthe stream of before: {read}");
    // The server goes on, with the layers here now.
    let out = server.tool("generate", greedy_args("The capital of France is", 4)).ok();
    assert!(out["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{out}");
    let caps = server.tool("get_capabilities", json!({})).ok();
    assert_eq!(caps["gpu"]["offloaded_layers"], 0, "{caps}");
    server.tool("get_emotion", json!({})).ok();
    let stderr = server.stderr_all();
    assert!(stderr.contains("going on without it"), "{stderr}");
    server.shutdown();
}
