//! Emotion steering on the live context: find (or compute) the loaded
//! model's four quadrant vector sets, then, before a decode step, set the
//! blend Σ coefficient × direction on the context whenever the mood's
//! coefficients moved by more than [`RESET_THRESHOLD`] since the last set.
//!
//! Setup is background work, done in slices (see the engine's loop): the
//! cache folder is named by the model's identity (its sha256, known once
//! [`super::identity`] has it), and when vectors are missing and
//! `steering = "auto"`, the contrastive pairs are decoded one text a slice
//! on a small second context that captures every layer's output.

use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_sys_2 as ffi;
use serde::Serialize;

use super::sys::{self, CaptureContext, RawPtrs};
use super::vectors::{self, DirectionSet, QUADRANTS};

/// Coefficients are set again when one moved by more than this.
const RESET_THRESHOLD: f32 = 0.01;
/// Context size of the capture context (a pair's text is far shorter).
const CAPTURE_CTX: u32 = 256;

/// How steering is configured (`[emotion]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SteeringSettings {
    /// `steering = "auto"`: steer when vectors exist, compute missing ones.
    pub enabled: bool,
    /// A folder holding `excited.gguf`, `frustrated.gguf`, `calm.gguf`,
    /// `depleted.gguf` (`vectors_path`, or the old `emotion_vectors_dir`);
    /// None: the cache folder named by the model file's hash.
    pub vectors_path: Option<PathBuf>,
    /// Where computed vectors go: `<cache>/vectors/<sha256 of the model>/`.
    pub cache_dir: PathBuf,
    /// Inclusive layer range; None: the middle third of the layers.
    pub layers: Option<(usize, usize)>,
    /// Compute missing vectors (the server does; a one-shot `chat` does not).
    pub compute_missing: bool,
}

/// Where steering stands, for `get_capabilities`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SteeringReport {
    /// Steering is on: vectors are loaded and set on the context.
    pub enabled: bool,
    /// `off`, `identifying` (hashing the model file), `computing`, `on`.
    pub state: String,
    /// Why steering is not on (absent when it is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The folder the vectors are read from (or written to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vectors_path: Option<String>,
    /// Steered layers, inclusive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<[usize; 2]>,
    /// The coefficients last set on the context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied: Option<[f32; 4]>,
    /// Share of the contrastive pairs read while computing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
}

/// The vectors of one model, four quadrant sets in a folder.
pub fn load_sets(dir: &Path, n_embd: usize, n_layer: usize) -> Result<[DirectionSet; 4], String> {
    let mut sets = Vec::with_capacity(4);
    for q in QUADRANTS {
        let path = dir.join(format!("{q}.gguf"));
        if !path.exists() {
            return Err(format!("no {q} vectors at {}", path.display()));
        }
        let set = vectors::read_gguf(&path)?;
        vectors::check_fits(&set, n_embd, n_layer, &path.display().to_string())?;
        sets.push(set);
    }
    Ok(sets.try_into().expect("four sets"))
}

/// The middle third of `n_layer` layers (at least one layer, never 0).
pub fn default_layers(n_layer: usize) -> (usize, usize) {
    let start = (n_layer / 3).max(1);
    let end = (2 * n_layer / 3).saturating_sub(1).max(start);
    (start, end.min(n_layer.saturating_sub(1)))
}

/// Reads the contrastive pairs on a capture context, one text per slice.
pub struct VectorJob {
    capture: CaptureContext,
    /// Tokens of every pair's two texts, with its quadrant.
    texts: Vec<(usize, Vec<LlamaToken>, Vec<LlamaToken>)>,
    next: usize,
    /// The quadrant voice's hidden states of the pair in progress.
    pending: Option<Vec<Vec<f32>>>,
    diffs: [Vec<Vec<Vec<f32>>>; 4],
    n_embd: usize,
    n_layer: usize,
    model_hint: String,
    dest: PathBuf,
}

impl VectorJob {
    pub fn new(model: &LlamaModel, model_ptr: NonNull<ffi::llama_model>, threads: i32, dest: PathBuf) -> Result<VectorJob, String> {
        let capture = CaptureContext::new(model_ptr, CAPTURE_CTX, threads)?;
        let vocab = model.vocab();
        let texts = vectors::pairs()
            .into_iter()
            .map(|(q, pos, neg)| (q, vocab.tokenize(pos.as_bytes(), true, false), vocab.tokenize(neg.as_bytes(), true, false)))
            .collect();
        Ok(VectorJob {
            capture,
            texts,
            next: 0,
            pending: None,
            diffs: Default::default(),
            n_embd: model.n_embd() as usize,
            n_layer: model.n_layer() as usize,
            model_hint: model.meta_val_str("general.architecture").unwrap_or_default(),
            dest,
        })
    }

    /// Texts decoded so far, of all.
    pub fn progress(&self) -> (usize, usize) {
        (self.next * 2 + usize::from(self.pending.is_some()), self.texts.len() * 2)
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Decode one text (`between` runs between its graph nodes). Returns
    /// true when every pair has been read.
    pub fn slice(&mut self, between: &mut dyn FnMut()) -> Result<bool, String> {
        let Some((q, pos, neg)) = self.texts.get(self.next) else { return Ok(true) };
        match self.pending.take() {
            None => self.pending = Some(self.capture.hidden_states(pos, between)?),
            Some(positive) => {
                let negative = self.capture.hidden_states(neg, between)?;
                let diff = positive
                    .iter()
                    .zip(&negative)
                    .map(|(p, n)| if p.len() == n.len() { p.iter().zip(n).map(|(a, b)| a - b).collect() } else { Vec::new() })
                    .collect();
                self.diffs[*q].push(diff);
                self.next += 1;
            }
        }
        Ok(self.next >= self.texts.len())
    }

    /// Reduce to the four sets and write them (each file atomically).
    pub fn finish(self) -> Result<([DirectionSet; 4], Vec<(usize, Vec<vectors::Reduction>)>), String> {
        let mut sets = Vec::with_capacity(4);
        let mut reports = Vec::new();
        for (q, diffs) in self.diffs.iter().enumerate() {
            let (set, report) = vectors::reduce(diffs, self.n_layer, self.n_embd, &self.model_hint);
            sets.push(set);
            reports.push((q, report));
        }
        for (q, set) in QUADRANTS.iter().zip(&sets) {
            let path = self.dest.join(format!("{q}.gguf"));
            vectors::write_gguf(set, &path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        Ok((sets.try_into().expect("four sets"), reports))
    }
}

enum State {
    Off(String),
    /// Waiting for the model's identity, which names the cache folder.
    Identifying,
    Computing(Box<VectorJob>),
    On { sets: Box<[DirectionSet; 4]>, applied: Option<[f32; 4]> },
}

/// Steering of one engine: its state and the context it steers.
pub struct Steering {
    state: State,
    settings: SteeringSettings,
    model_ptr: Option<NonNull<ffi::llama_model>>,
    ctx_ptr: Option<NonNull<ffi::llama_context>>,
    n_embd: usize,
    n_layer: usize,
    layers: (usize, usize),
    threads: i32,
    /// The folder vectors are read from or written to, once known.
    dir: Option<PathBuf>,
}

impl Steering {
    /// Decide how to start: off (and why), straight to loading a configured
    /// folder, or waiting for the model's identity to find its cached vectors.
    pub fn new(settings: SteeringSettings, model: &LlamaModel, ptrs: Result<RawPtrs, String>, threads: i32) -> Steering {
        let n_embd = model.n_embd() as usize;
        let n_layer = model.n_layer() as usize;
        let layers = settings.layers.unwrap_or_else(|| default_layers(n_layer));
        let mut s = Steering {
            state: State::Off(String::new()),
            settings,
            model_ptr: None,
            ctx_ptr: None,
            n_embd,
            n_layer,
            layers,
            threads,
            dir: None,
        };
        s.state = s.start(ptrs);
        if let State::Off(reason) = &s.state {
            tracing::info!("emotion steering is off: {reason}");
        }
        s
    }

    fn start(&mut self, ptrs: Result<RawPtrs, String>) -> State {
        if !self.settings.enabled {
            return State::Off("emotion.steering = \"off\"".into());
        }
        let (start, end) = self.layers;
        if start == 0 || start > end || end >= self.n_layer {
            return State::Off(format!(
                "the steered layers {start}..{end} are outside this model's steerable layers 1..{}",
                self.n_layer - 1
            ));
        }
        match ptrs {
            Ok(p) => {
                self.model_ptr = Some(p.model);
                self.ctx_ptr = Some(p.ctx);
            }
            Err(e) => {
                tracing::warn!("emotion steering turned itself off: {e}");
                return State::Off(format!("llama-cpp-2's internals did not pass the startup check: {e}"));
            }
        }
        if let Some(dir) = self.settings.vectors_path.clone() {
            self.dir = Some(dir.clone());
            return self.load(&dir);
        }
        State::Identifying
    }

    /// Waiting for the model's identity (to find its cached vectors).
    pub fn wants_identity(&self) -> bool {
        matches!(self.state, State::Identifying)
    }

    /// The model is identified (its sha256), or cannot be: load its cached
    /// vectors, or start computing them when missing and allowed.
    pub fn identified(&mut self, model: &LlamaModel, sha256: Result<&str, &str>) {
        if !self.wants_identity() {
            return;
        }
        let state = match sha256 {
            Ok(hash) => {
                let dir = self.settings.cache_dir.join("vectors").join(hash);
                self.dir = Some(dir.clone());
                let complete = QUADRANTS.iter().all(|q| dir.join(format!("{q}.gguf")).exists());
                if complete || !self.settings.compute_missing {
                    self.load(&dir)
                } else {
                    self.compute(model, dir)
                }
            }
            Err(why) => State::Off(why.to_string()),
        };
        if let State::Off(reason) = &state {
            tracing::warn!("emotion steering is off: {reason}");
        }
        self.state = state;
    }

    fn load(&mut self, dir: &Path) -> State {
        match load_sets(dir, self.n_embd, self.n_layer) {
            Ok(sets) => {
                tracing::info!(path = %dir.display(), layers = ?self.layers, "emotion steering is on");
                State::On { sets: Box::new(sets), applied: None }
            }
            Err(e) => State::Off(e),
        }
    }

    /// Vectors are being computed (background work is left).
    pub fn busy(&self) -> bool {
        matches!(self.state, State::Computing(_))
    }

    /// One slice of the computation (`between` runs between graph nodes).
    pub fn setup_slice(&mut self, between: &mut dyn FnMut()) {
        let State::Computing(job) = &mut self.state else { return };
        let state = match job.slice(between) {
            Ok(false) => return,
            Ok(true) => {
                let State::Computing(job) = std::mem::replace(&mut self.state, State::Off(String::new())) else {
                    return;
                };
                let dir = job.dest().to_path_buf();
                match job.finish() {
                    Ok(_) => {
                        tracing::info!(path = %dir.display(), "emotion vectors computed");
                        self.load(&dir)
                    }
                    Err(e) => State::Off(e),
                }
            }
            Err(e) => State::Off(format!("computing the vectors failed: {e}")),
        };
        if let State::Off(reason) = &state {
            tracing::warn!("emotion steering is off: {reason}");
        }
        self.state = state;
    }

    fn compute(&mut self, model: &LlamaModel, dir: PathBuf) -> State {
        let Some(model_ptr) = self.model_ptr else { return State::Off("no model pointer".into()) };
        tracing::info!(path = %dir.display(), "no emotion vectors for this model yet: computing them while serving");
        match VectorJob::new(model, model_ptr, self.threads, dir) {
            Ok(job) => State::Computing(Box::new(job)),
            Err(e) => State::Off(e),
        }
    }

    /// Before a step: set the blend for `coefficients` when they moved.
    pub fn apply(&mut self, coefficients: [f32; 4]) {
        let (start, end) = self.layers;
        let (n_embd, n_layer) = (self.n_embd, self.n_layer);
        let State::On { sets, applied } = &mut self.state else { return };
        let moved = applied.is_none_or(|a| a.iter().zip(&coefficients).any(|(x, y)| (x - y).abs() > RESET_THRESHOLD));
        if !moved {
            return;
        }
        let Some(ctx) = self.ctx_ptr else { return };
        let data = vectors::blend(sets, coefficients, start, end, n_layer);
        match sys::set_control_vector(ctx, Some(&data), n_embd as i32, start as i32, end as i32) {
            Ok(()) => *applied = Some(coefficients),
            Err(e) => {
                tracing::warn!("emotion steering is off: {e}");
                self.state = State::Off(e);
            }
        }
    }

    /// The folder this model's vectors belong in (`vectors_path`, else the
    /// cache folder named by the model file's hash), once known: after
    /// setup has identified the model.
    pub fn folder(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Model pointer and thread count, to start a [`VectorJob`].
    pub fn job_parts(&self) -> Option<(NonNull<ffi::llama_model>, i32)> {
        self.model_ptr.map(|m| (m, self.threads))
    }

    /// Use these sets now (measurements, or vectors just computed).
    pub fn install(&mut self, sets: [DirectionSet; 4], dir: PathBuf) {
        self.dir = Some(dir);
        if self.ctx_ptr.is_some() {
            self.state = State::On { sets: Box::new(sets), applied: None };
        }
    }

    /// Take the vectors off the context (for measurements).
    pub fn clear(&mut self) -> Result<(), String> {
        if let State::On { applied, .. } = &mut self.state {
            *applied = None;
        }
        match self.ctx_ptr {
            Some(ctx) => sys::set_control_vector(ctx, None, self.n_embd as i32, 0, 0),
            None => Ok(()),
        }
    }

    pub fn is_on(&self) -> bool {
        matches!(self.state, State::On { .. })
    }

    pub fn report(&self) -> SteeringReport {
        let (state, reason, applied, progress) = match &self.state {
            State::Off(reason) => ("off", Some(reason.clone()), None, None),
            State::Identifying => ("identifying", Some("identifying the model file (sha256)".to_string()), None, None),
            State::Computing(job) => {
                let (done, all) = job.progress();
                ("computing", Some(format!("computing this model's vectors ({done} of {all} texts read)")), None, Some(done as f64 / all.max(1) as f64))
            }
            State::On { applied, .. } => ("on", None, *applied, None),
        };
        SteeringReport {
            enabled: state == "on",
            state: state.into(),
            reason,
            vectors_path: self.dir.as_ref().map(|d| d.display().to_string()),
            layers: (state != "off" || self.dir.is_some()).then_some([self.layers.0, self.layers.1]),
            applied,
            progress,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_middle_third() {
        assert_eq!(default_layers(24), (8, 15));
        assert_eq!(default_layers(18), (6, 11));
        assert_eq!(default_layers(30), (10, 19));
        assert_eq!(default_layers(2), (1, 1));
    }
}
