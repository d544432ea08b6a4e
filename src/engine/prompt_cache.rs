//! [`PromptCache`]: prompt prefixes kept beyond the slots, in two tiers.
//!
//! - **RAM**: when a slot is given to another conversation, the cells it
//!   held (their KV state, with the tokens they cover) move to host memory,
//!   and come back when a prompt starting with those tokens returns.
//! - **Disk**: when the engine goes idle after work, and when it shuts
//!   down, the slots' cells are written under
//!   `<cache>/prompt-cache/<model sha256>/`, so a restarted server reads a
//!   known system prompt from disk instead of computing it again.
//!
//! An entry is only ever loaded into the context it fits: its header names
//! the model file (sha256), the context settings, the KV type and the
//! llama.cpp build, and a trailer holds the sha256 of everything before it.
//! Anything else (a foreign, truncated or corrupt file) is skipped with a
//! warning and removed. Files are written under a temporary name and
//! renamed when complete, in slices of background work. Both tiers are
//! bounded, least recently used out first. Cells keep the activations they
//! were computed with, steering included.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_2::token::LlamaToken;
use llama_cpp_sys_2 as ffi;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::sys;

const MAGIC: &[u8; 8] = b"ELPISKV1";
/// The llama.cpp build the states come from (a test checks it against
/// Cargo.lock): states of another build are not loaded.
pub(super) const LLAMA_BUILD: &str = "llama-cpp-sys-2 0.1.161";
/// Fewer cells than this are not worth keeping.
const MIN_KEEP: usize = 32;
/// A kept prefix replaces a slot's own cells when it covers this many more tokens.
const MIN_GAIN: usize = 16;
/// Bytes written or hashed per slice.
const IO_CHUNK: usize = 4 << 20;

/// What a state must match to be loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Fingerprint {
    pub model_sha256: String,
    pub n_ctx: u32,
    pub n_seq: u32,
    pub kv_type: String,
    pub swa_full: bool,
    pub build: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    fingerprint: Fingerprint,
    tokens: usize,
    payload: usize,
}

struct RamEntry {
    tokens: Vec<LlamaToken>,
    state: Arc<Vec<u8>>,
    last_used: u64,
}

struct DiskEntry {
    path: PathBuf,
    tokens: Vec<LlamaToken>,
    bytes: u64,
    last_used: u64,
}

/// A file being written, a slice at a time.
struct Save {
    tokens: Vec<LlamaToken>,
    state: Arc<Vec<u8>>,
    tmp: PathBuf,
    path: PathBuf,
    file: File,
    hasher: Sha256,
    written: usize,
}

/// Where a kept prefix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    Ram(usize),
    Disk(usize),
}

/// The settings and what the cache holds, for `get_capabilities`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CacheReport {
    pub ram_entries: usize,
    pub ram_mib: f64,
    /// `server.prompt_cache_ram_mib`.
    pub ram_cap_mib: usize,
    /// The RSS the RAM tier keeps the process under (model + KV + its cap +
    /// 64 MiB), giving way to what else the process holds.
    pub ceiling_mib: Option<u64>,
    pub disk_entries: usize,
    pub disk_mib: f64,
    /// Why the disk tier is off, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_off: Option<String>,
}

pub(super) struct PromptCache {
    ctx: Option<NonNull<ffi::llama_context>>,
    ram: Vec<RamEntry>,
    ram_budget: usize,
    disk: Vec<DiskEntry>,
    disk_budget: u64,
    /// The disk tier's folder and the fingerprint, once the model is known.
    dir: Option<(PathBuf, Fingerprint)>,
    disk_off: Option<String>,
    /// The fingerprint without the model's identity.
    base: Fingerprint,
    saves: std::collections::VecDeque<Save>,
    tick: u64,
    /// The process's memory ceiling: the model, its KV cache, the RAM tier's
    /// budget and [`SLACK`]. The RAM tier gives way to whatever else the
    /// process holds (compute buffers, repacked weights, the heap), so the
    /// server's RSS stays under it. None: no ceiling (RSS unreadable).
    ceiling: Option<u64>,
}

/// What the process may hold beyond the model, its KV cache and the RAM
/// tier's entries, before the RAM tier gives way.
const SLACK: u64 = 64 << 20;
/// Left under the ceiling for what is allocated between two of the cache's
/// checks (a request's buffers); its own buffers make room before they exist.
const HEADROOM: u64 = 16 << 20;

impl PromptCache {
    /// `ctx`: the context's pointer (None: no cache at all); budgets in MiB.
    pub fn new(ctx: Option<NonNull<ffi::llama_context>>, base: Fingerprint, ram_mib: usize, disk_mib: usize) -> PromptCache {
        let disk_off = (disk_mib == 0).then(|| "server.prompt_cache_disk_mib = 0".to_string());
        PromptCache {
            ctx,
            ram: Vec::new(),
            ram_budget: ram_mib << 20,
            disk: Vec::new(),
            disk_budget: (disk_mib as u64) << 20,
            dir: None,
            disk_off,
            base,
            saves: Default::default(),
            tick: 0,
            ceiling: None,
        }
    }

    /// Keep the process's RSS within `fixed` (the model and its KV cache)
    /// + the RAM tier's budget + [`SLACK`].
    pub fn within(mut self, fixed: u64) -> PromptCache {
        if super::meminfo::resident().is_some() {
            self.ceiling = Some(fixed + self.ram_budget as u64 + SLACK);
        }
        self
    }

    /// Make room for `extra` bytes about to be allocated: least recently used
    /// RAM entries go until the tier and `extra` fit its budget and the
    /// ceiling less [`HEADROOM`]. False when `extra` cannot fit even then.
    fn make_room(&mut self, extra: usize) -> bool {
        let room = match (self.ceiling, super::meminfo::resident()) {
            (Some(ceiling), Some(rss)) => {
                let rest = rss.saturating_sub(self.ram_bytes() as u64);
                (ceiling.saturating_sub(HEADROOM + rest) as usize).min(self.ram_budget)
            }
            _ => self.ram_budget,
        };
        let mut dropped = false;
        while self.ram_bytes() + extra > room && !self.ram.is_empty() {
            let oldest = (0..self.ram.len()).min_by_key(|&i| self.ram[i].last_used).unwrap_or(0);
            self.ram.swap_remove(oldest);
            dropped = true;
        }
        if dropped {
            // Freed entries go back to the system, not to glibc's arenas.
            sys::release_free_heap();
        }
        extra <= room
    }

    fn ram_bytes(&self) -> usize {
        self.ram.iter().map(|e| e.state.len()).sum()
    }

    fn enabled(&self) -> bool {
        self.ctx.is_some() && (self.ram_budget > 0 || self.disk_budget > 0)
    }

    /// The model is identified: open its folder and index the entries that
    /// fit this context (others are removed, with a warning each).
    pub fn identified(&mut self, cache_dir: &Path, sha256: &str) {
        if self.disk_budget == 0 || self.ctx.is_none() || self.dir.is_some() {
            return;
        }
        let fingerprint = Fingerprint { model_sha256: sha256.to_string(), ..self.base.clone() };
        let dir = cache_dir.join("prompt-cache").join(&sha256[..sha256.len().min(32)]);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            self.disk_off = Some(format!("cannot create {}: {e}", dir.display()));
            return;
        }
        let mut entries: Vec<(std::time::SystemTime, DiskEntry)> = Vec::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.ends_with(".partial") {
                if partial_is_stale(&name) {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            match read_header(&path) {
                Ok((header, tokens, bytes)) if header.fingerprint == fingerprint => {
                    let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                    entries.push((modified, DiskEntry { path, tokens, bytes, last_used: 0 }));
                }
                Ok(_) => skip(&path, "it was made for another model, context or build"),
                Err(why) => skip(&path, &why),
            }
        }
        entries.sort_by_key(|(modified, _)| *modified);
        self.disk = entries.into_iter().map(|(_, e)| e).collect();
        for e in &mut self.disk {
            self.tick += 1;
            e.last_used = self.tick;
        }
        tracing::info!(entries = self.disk.len(), path = %dir.display(), "prompt cache on disk");
        self.dir = Some((dir, fingerprint));
    }

    /// The kept prefix sharing the most tokens with `prompt`, when it
    /// covers at least [`MIN_GAIN`] more than `have` (a slot's own cells).
    pub fn best(&self, prompt: &[LlamaToken], have: usize) -> Option<(Found, usize)> {
        if !self.enabled() {
            return None;
        }
        let common = |t: &[LlamaToken]| common_prefix(t, prompt);
        let ram = self.ram.iter().enumerate().map(|(i, e)| (Found::Ram(i), common(&e.tokens)));
        let disk = self.disk.iter().enumerate().map(|(i, e)| (Found::Disk(i), common(&e.tokens)));
        ram.chain(disk).filter(|(_, c)| *c >= have + MIN_GAIN).max_by_key(|(f, c)| (*c, matches!(f, Found::Ram(_))))
    }

    /// Keep the cells of sequence `seq` (covering `tokens`) in RAM, before
    /// they are overwritten. A prefix already kept is not kept twice.
    pub fn keep(&mut self, seq: i32, tokens: &[LlamaToken]) {
        let Some(ctx) = self.ctx else { return };
        if tokens.len() < MIN_KEEP || self.ram_budget == 0 || self.ram.iter().any(|e| e.tokens.starts_with(tokens)) {
            return;
        }
        // An entry this one extends is superseded by it.
        self.ram.retain(|e| !tokens.starts_with(&e.tokens));
        // Room first, then the copy; an entry that cannot fit is not kept.
        let state = match sys::seq_state(ctx, seq, &mut |size| self.make_room(size)) {
            Ok(Some(state)) => state,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("cannot keep a prompt's cells: {e}");
                return;
            }
        };
        self.tick += 1;
        self.ram.push(RamEntry { tokens: tokens.to_vec(), state: Arc::new(state), last_used: self.tick });
    }

    /// Load a kept prefix into the empty sequence `seq`; the tokens it covers.
    /// `between` runs between the slices of reading a file.
    pub fn restore(&mut self, found: Found, seq: i32, between: &mut dyn FnMut()) -> Result<Vec<LlamaToken>, String> {
        let ctx = self.ctx.ok_or("no context")?;
        self.tick += 1;
        match found {
            Found::Ram(i) => {
                let entry = self.ram.get_mut(i).ok_or("no such entry")?;
                entry.last_used = self.tick;
                sys::set_seq_state(ctx, seq, &entry.state)?;
                Ok(entry.tokens.clone())
            }
            Found::Disk(i) => {
                // The file is read whole: the RAM tier gives way first.
                self.make_room(self.disk.get(i).map_or(0, |e| e.bytes as usize));
                let entry = self.disk.get_mut(i).ok_or("no such entry")?;
                let payload = match read_payload(&entry.path, entry.tokens.len(), between) {
                    Ok(payload) => payload,
                    Err(why) => {
                        skip(&entry.path, &why);
                        self.disk.remove(i);
                        return Err(why);
                    }
                };
                entry.last_used = self.tick;
                let tokens = entry.tokens.clone();
                // Touch it: least recently used goes first, across restarts too.
                let _ = File::options().append(true).open(&entry.path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
                sys::set_seq_state(ctx, seq, &payload)?;
                Ok(tokens)
            }
        }
    }

    /// Queue the cells of sequence `seq` (covering `tokens`) for the disk,
    /// unless an entry there already covers them.
    pub fn save(&mut self, seq: i32, tokens: &[LlamaToken]) {
        let (Some(ctx), Some(dir)) = (self.ctx, self.dir.as_ref().map(|(dir, _)| dir.clone())) else { return };
        let covered = |t: &[LlamaToken]| t.starts_with(tokens);
        if tokens.len() < MIN_KEEP || self.disk.iter().any(|e| covered(&e.tokens)) || self.saves.iter().any(|s| covered(&s.tokens)) {
            return;
        }
        let state = match self.ram.iter().find(|e| e.tokens == tokens) {
            Some(e) => Arc::clone(&e.state),
            // A copy held until it is written: the RAM tier gives way first.
            None => match sys::seq_state(ctx, seq, &mut |size| {
                self.make_room(size);
                true
            }) {
                Ok(Some(state)) => Arc::new(state),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("cannot save a prompt's cells: {e}");
                    return;
                }
            },
        };
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.0.to_le_bytes()).collect();
        let name: String = Sha256::digest(&bytes).iter().take(16).map(|b| format!("{b:02x}")).collect();
        let path = dir.join(format!("{name}.kv"));
        let tmp = dir.join(format!(".{name}.kv.{}.partial", std::process::id()));
        match self.begin(&tmp, tokens, &state) {
            Ok((file, hasher)) => self.saves.push_back(Save { tokens: tokens.to_vec(), state, tmp, path, file, hasher, written: 0 }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!("cannot save a prompt to {}: {e}", dir.display());
            }
        }
    }

    fn begin(&self, tmp: &Path, tokens: &[LlamaToken], state: &[u8]) -> std::io::Result<(File, Sha256)> {
        let fingerprint = self.dir.as_ref().map(|(_, f)| f.clone()).unwrap_or_else(|| self.base.clone());
        let header = serde_json::to_vec(&Header { fingerprint, tokens: tokens.len(), payload: state.len() }).map_err(std::io::Error::other)?;
        let mut head = Vec::with_capacity(12 + header.len() + tokens.len() * 4);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(header.len() as u32).to_le_bytes());
        head.extend_from_slice(&header);
        for t in tokens {
            head.extend_from_slice(&t.0.to_le_bytes());
        }
        let mut file = File::create(tmp)?;
        file.write_all(&head)?;
        let mut hasher = Sha256::new();
        hasher.update(&head);
        Ok((file, hasher))
    }

    /// Saves are being written (background work is left).
    pub fn busy(&self) -> bool {
        !self.saves.is_empty()
    }

    /// Write one slice of the oldest save; a finished file is renamed into
    /// place and the disk bound kept.
    pub fn slice(&mut self) {
        let Some(save) = self.saves.front_mut() else { return };
        let end = (save.written + IO_CHUNK).min(save.state.len());
        let chunk = &save.state[save.written..end];
        let step = save.file.write_all(chunk).map(|_| save.hasher.update(chunk));
        save.written = end;
        let done = step.is_err() || save.written == save.state.len();
        if !done {
            return;
        }
        let Some(mut save) = self.saves.pop_front() else { return };
        let finished = step.and_then(|_| {
            let digest = std::mem::take(&mut save.hasher).finalize();
            save.file.write_all(&digest)?;
            save.file.sync_all()?;
            std::fs::rename(&save.tmp, &save.path)
        });
        match finished {
            Ok(()) => {
                // Entries this one extends are superseded by it.
                let (superseded, kept): (Vec<DiskEntry>, Vec<DiskEntry>) =
                    std::mem::take(&mut self.disk).into_iter().partition(|e| save.tokens.starts_with(&e.tokens) || e.path == save.path);
                self.disk = kept;
                for e in superseded.iter().filter(|e| e.path != save.path) {
                    let _ = std::fs::remove_file(&e.path);
                }
                self.tick += 1;
                let bytes = std::fs::metadata(&save.path).map(|m| m.len()).unwrap_or(0);
                self.disk.push(DiskEntry { path: save.path, tokens: save.tokens, bytes, last_used: self.tick });
                self.keep_disk_bound();
            }
            Err(e) => {
                let _ = std::fs::remove_file(&save.tmp);
                tracing::warn!("cannot save a prompt: {e}");
            }
        }
    }

    /// Write every queued save now (shutdown).
    pub fn flush(&mut self) {
        while self.busy() {
            self.slice();
        }
    }

    fn keep_disk_bound(&mut self) {
        while self.disk.iter().map(|e| e.bytes).sum::<u64>() > self.disk_budget && !self.disk.is_empty() {
            let oldest = (0..self.disk.len()).min_by_key(|&i| self.disk[i].last_used).unwrap_or(0);
            let entry = self.disk.swap_remove(oldest);
            let _ = std::fs::remove_file(&entry.path);
        }
    }

    pub fn report(&self) -> CacheReport {
        CacheReport {
            ram_entries: self.ram.len(),
            ram_mib: self.ram_bytes() as f64 / (1 << 20) as f64,
            ram_cap_mib: self.ram_budget >> 20,
            ceiling_mib: self.ceiling.map(|c| c >> 20),
            disk_entries: self.disk.len(),
            disk_mib: self.disk.iter().map(|e| e.bytes).sum::<u64>() as f64 / (1 << 20) as f64,
            disk_off: self.disk_off.clone(),
        }
    }
}

/// How many leading tokens two lists share.
pub(super) fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// One warning and the file is gone.
fn skip(path: &Path, why: &str) {
    tracing::warn!("prompt cache: skipped and removed {}: {why}", path.display());
    let _ = std::fs::remove_file(path);
}

/// A temporary file whose writer (the pid in its name) is gone.
fn partial_is_stale(name: &str) -> bool {
    let pid = name.trim_end_matches(".partial").rsplit('.').next().and_then(|p| p.parse::<u32>().ok());
    pid.is_none_or(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists())
}

/// An entry's header and tokens, and its length, checked against the
/// layout its header promises.
fn read_header(path: &Path) -> Result<(Header, Vec<LlamaToken>, u64), String> {
    let mut f = File::open(path).map_err(|e| format!("cannot read it ({e})"))?;
    let length = f.metadata().map(|m| m.len()).map_err(|e| e.to_string())?;
    let mut fixed = [0u8; 12];
    f.read_exact(&mut fixed).map_err(|_| "it is truncated".to_string())?;
    if &fixed[..8] != MAGIC {
        return Err("it is not an Elpis prompt-cache file".into());
    }
    let header_len = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]) as usize;
    if header_len as u64 > length {
        return Err("it is truncated".into());
    }
    let mut header = vec![0u8; header_len];
    f.read_exact(&mut header).map_err(|_| "it is truncated".to_string())?;
    let header: Header = serde_json::from_slice(&header).map_err(|e| format!("its header is corrupt ({e})"))?;
    // Sizes from the file are checked, never trusted to fit: a corrupt
    // header must not overflow the sum (nor allocate what it claims).
    let expected = (header.tokens as u64)
        .checked_mul(4)
        .and_then(|t| t.checked_add(header.payload as u64))
        .and_then(|n| n.checked_add(12 + header_len as u64 + 32));
    if expected != Some(length) {
        return Err(format!("it is {length} bytes where its header says {} (truncated or corrupt)", expected.map_or("more".to_string(), |e| e.to_string())));
    }
    let mut raw = vec![0u8; header.tokens * 4];
    f.read_exact(&mut raw).map_err(|_| "it is truncated".to_string())?;
    let tokens = raw.chunks_exact(4).map(|b| LlamaToken(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect();
    Ok((header, tokens, length))
}

/// The state payload of an entry, its whole file checked against the sha256
/// trailer (read and hashed in slices, `between` run between them).
fn read_payload(path: &Path, tokens: usize, between: &mut dyn FnMut()) -> Result<Vec<u8>, String> {
    let (header, _, length) = read_header(path)?;
    if header.tokens != tokens {
        return Err("it changed on disk".into());
    }
    let mut f = File::open(path).map_err(|e| format!("cannot read it ({e})"))?;
    let body_len = (length - 32) as usize;
    let mut body = vec![0u8; body_len];
    let mut hasher = Sha256::new();
    let mut at = 0;
    while at < body_len {
        let end = (at + IO_CHUNK).min(body_len);
        f.read_exact(&mut body[at..end]).map_err(|_| "it is truncated".to_string())?;
        hasher.update(&body[at..end]);
        at = end;
        between();
    }
    let mut trailer = [0u8; 32];
    f.read_exact(&mut trailer).map_err(|_| "it is truncated".to_string())?;
    if hasher.finalize().as_slice() != trailer {
        return Err("its checksum does not match (corrupt)".into());
    }
    Ok(body.split_off(body_len - header.payload))
}

#[cfg(test)]
#[path = "prompt_cache_tests.rs"]
mod tests;
