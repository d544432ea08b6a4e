//! Models over several hosts: llama.cpp's own distributed backend, ggml RPC.
//! `model.rpc_servers` names workers (`elpis-server rpc-worker` on each
//! host); their devices join ggml's before the model loads, and
//! `model.gpu_layers` layers go to them, split by their free memory.
//!
//! ggml aborts the process when it cannot reach a worker, so each is probed
//! here first: one that is down is a clear error at start. A worker that
//! dies mid-session still makes llama.cpp abort (nothing can run the layers
//! it held); the abort hook finds which worker no longer answers and says so
//! in the log and on stderr before the process ends. That process is the
//! engine half of a supervised pair (`server::bridge`): the half Psyche
//! spawned answers what was owed with that line, and starts the engine
//! again, which goes on without the workers still down.
//!
//! ggml's RPC has no authentication and no encryption: a worker is for a
//! network you trust, and `rpc-worker` refuses a non-loopback address unless
//! told `--allow-remote`.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::gpu::GpuLayers;
use super::request::EngineError;
use super::sys;

/// Set by the supervisor (see `server::bridge`) in the environment of a
/// server it restarted after losing a worker, to why it did.
pub const RESTARTED_ENV: &str = "ELPIS_RESTARTED_AFTER";

/// How long a probe waits for a worker to accept.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Probe every worker, then register them all with ggml. Called once,
/// before the model loads.
pub(super) fn attach(workers: &[String], gpu_layers: GpuLayers) -> Result<(), EngineError> {
    if workers.is_empty() {
        return Ok(());
    }
    // Restarted by the supervisor after a worker was lost: go on without
    // the workers that are still down (their layers run here).
    let restarted = std::env::var(RESTARTED_ENV).ok().filter(|why| !why.is_empty());
    let mut kept = Vec::new();
    for worker in workers {
        match (probe(worker), &restarted) {
            (Ok(()), _) => kept.push(worker.clone()),
            (Err(e), Some(why)) => tracing::warn!("restarted after an RPC worker was lost ({why}): going on without it: {e}"),
            (Err(e), None) => return Err(EngineError::Rpc(e)),
        }
    }
    let workers = &kept[..];
    if workers.is_empty() {
        return Ok(());
    }
    let names = workers.to_vec();
    sys::on_ggml_abort(Box::new(move |message| lost(&names, message)));
    for worker in workers {
        let devices = sys::add_rpc_server(worker).map_err(EngineError::Rpc)?;
        for d in &devices {
            tracing::info!(
                worker = %worker,
                device = %d.name,
                "RPC device: {} ({} MiB, {} MiB free)",
                d.description,
                d.total_bytes >> 20,
                d.free_bytes >> 20
            );
        }
        if devices.is_empty() {
            return Err(EngineError::Rpc(format!("the RPC worker at {worker} offers no device")));
        }
    }
    if matches!(gpu_layers, GpuLayers::Count(0) | GpuLayers::Auto) {
        tracing::warn!(
            "model.rpc_servers is set but model.gpu_layers = {gpu_layers} (auto fits layers on GPUs only): every \
             layer stays here; set model.gpu_layers to a count (999: all) to put layers on the workers"
        );
    }
    Ok(())
}

/// Whether the worker accepts a connection now, with what to do if not.
fn probe(worker: &str) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = worker
        .to_socket_addrs()
        .map_err(|e| format!("model.rpc_servers: cannot resolve the RPC worker {worker:?}: {e}"))?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, PROBE_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    let why = last.map(|e| e.to_string()).unwrap_or_else(|| "no address".into());
    Err(format!(
        "model.rpc_servers: the RPC worker at {worker} is not reachable ({why}); start it there with \
         `elpis-server rpc-worker --listen {worker}` (and --allow-remote off loopback), or remove it from model.rpc_servers"
    ))
}

/// Whether the worker is alive: it accepts a connection and then waits for
/// the client to speak (a dying process accepts, then drops it at once).
fn answers(worker: &str) -> bool {
    use std::io::Read;
    let Some(addr) = worker.to_socket_addrs().ok().and_then(|mut a| a.next()) else { return false };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    match stream.read(&mut [0u8; 1]) {
        // Still waiting for our hello (or busy with another client): alive.
        Err(e) => matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        // Closed on us, or it spoke first: not a worker we can use.
        Ok(_) => false,
    }
}

/// ggml is aborting: say which workers no longer answer, in the log and on
/// stderr (the log may be a file), then let it end the process.
fn lost(workers: &[String], message: &str) {
    let message = message.trim();
    // A worker that was just killed may still hold its listening socket for
    // a moment while its process is torn down: look again, briefly.
    let mut gone = Vec::new();
    for _ in 0..20 {
        gone = workers.iter().filter(|w| !answers(w)).map(String::as_str).collect();
        if !gone.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let line = if gone.is_empty() {
        format!("llama.cpp aborted: {message}")
    } else {
        format!(
            "lost the RPC worker{} at {}: it no longer accepts connections, and llama.cpp cannot go on without \
             the layers it held; this engine process stops (llama.cpp: {message})",
            if gone.len() > 1 { "s" } else { "" },
            gone.join(", ")
        )
    };
    tracing::error!("{line}");
    eprintln!("elpis-server: {line}");
}

/// `elpis-server rpc-worker`: serve this machine's CPU to other Elpis
/// servers at `listen`, until killed. A non-loopback address needs
/// `allow_remote`, with the reason printed.
pub fn serve_worker(listen: &str, threads: usize, allow_remote: bool) -> anyhow::Result<()> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| anyhow::anyhow!("--listen {listen:?} is not an address: give ip:port, for example 127.0.0.1:50052"))?;
    let warning = "ggml's RPC protocol has no authentication and no encryption: anyone who can reach this port can \
                   run computations on this machine and read or write the memory it serves (llama.cpp's own README \
                   says never to expose it)";
    if !addr.ip().is_loopback() {
        if !allow_remote {
            anyhow::bail!(
                "--listen {addr} is not a loopback address. {warning}. Listen on 127.0.0.1 (and tunnel, for example \
                 over ssh), or say --allow-remote to serve it on a network you trust"
            );
        }
        tracing::warn!("{warning}; serving on {addr} because --allow-remote was given");
        eprintln!("elpis-server: warning: {warning}; serving on {addr} because --allow-remote was given");
    }
    tracing::info!(%addr, threads, "RPC worker starting");
    eprintln!("elpis-server: RPC worker serving this machine's CPU on {addr} ({threads} threads; one server at a time)");
    sys::serve_rpc(&addr.to_string(), threads).map_err(anyhow::Error::msg)
}
