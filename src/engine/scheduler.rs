//! [`Engine`]: the owner of llama.cpp (model, context) and the loop that
//! steps every running generation one batch at a time, on the thread that
//! loaded the model.
//!
//! [`Engine::drive`] is that loop. Each turn runs the runtime's tasks
//! (requests are read, answered and written), takes the commands that
//! arrived, reaps cancelled jobs, gives queued jobs slots ([`SlotTable`]),
//! does a slice of background work when its share allows, sets the mood's
//! steering blend, and runs one [`DecodeStep`]. Inside a long step the
//! runtime's tasks run too, between the step's graph nodes, so a request
//! never waits for a prompt chunk to finish. The engine itself is not a
//! task: nothing the tasks do can reach it except through its channel.
//! A slot remembers the tokens in its cells, so a prompt that extends an
//! earlier one only decodes the new suffix.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::admission::Admission;
use super::handle::{Command, EngineHandle, EngineLoad, SteeringSource};
use super::identity::Identity;
use super::model::{self, EngineSettings};
use super::planner::StepPlanner;
use super::probes::Probe;
use super::prompt_cache::{Fingerprint, PromptCache, LLAMA_BUILD};
use super::request::{EngineError, GenerationEvent};
use super::slots::SlotTable;
use super::steering::Steering;
use super::speculative::Speculation;
use super::step::DecodeStep;
use super::sys::RawPtrs;

/// Yields that let the runtime's tasks run their course (read, dispatch,
/// answer, write: each hop is a task woken in turn, one yield lets one
/// round run; a yield costs microseconds).
const YIELDS_PER_TURN: usize = 8;
/// Inside a step, the runtime's tasks run at most this often,
const ANSWER_EVERY: Duration = Duration::from_millis(5);
/// and for about this long (rounds of ready tasks stop once it is spent;
/// what is left runs at the next chance, 5 ms later).
const ANSWER_BUDGET: Duration = Duration::from_micros(500);
/// Background work (identifying the model, computing its vectors) takes at
/// most this share of the engine's time while generations run or wait; an
/// idle engine gives it all.
const BACKGROUND_SHARE: f64 = 0.08;

/// The owner of llama.cpp. `!Send` by construction (see `_not_send`).
pub struct Engine {
    /// The thread that created the engine; every llama call asserts it.
    owner: ThreadId,
    model: &'static LlamaModel,
    ctx: LlamaContext<'static>,
    /// The model's and context's raw pointers, when llama-cpp-2's layout
    /// passed the startup check (steering and answering inside a step need them).
    ptrs: Option<RawPtrs>,
    /// Requests become jobs here (render, tokenise, fit, sampler).
    admission: Admission,
    slots: SlotTable,
    /// One batch at a time, with what steps cost and how drafts fare.
    step: DecodeStep,
    /// Tokens one sequence may hold.
    n_ctx_seq: usize,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Set by a step that decoded something; cleared when the engine, idle
    /// again, has handed the memory its work no longer needs back to the OS.
    worked_since_trim: bool,
    /// Which model file this is (names its cache folders).
    identity: Identity,
    /// Where the cache folders are.
    cache_dir: std::path::PathBuf,
    /// Prompt prefixes beyond the slots: in RAM, and on disk across restarts.
    cache: PromptCache,
    /// Work was done since the slots' cells were last queued for the disk.
    worked_since_save: bool,
    /// Emotion steering: control vectors on the context.
    steering: Steering,
    /// Where the mood's steering coefficients are read.
    steering_source: Option<SteeringSource>,
    /// Milliseconds spent on generations and on background work (decayed),
    /// to keep background work to its share.
    foreground_ms: f64,
    background_ms: f64,
    /// The server is shutting down: every generation ends as cancelled.
    closing: bool,
    /// Reply tokens sampled since start, whoever waited for them (a
    /// generation whose client left included, up to the step that saw it).
    tokens_generated: u64,
    /// The load as the last turn left it, for a handle that cannot wait
    /// for the step under way (see `EngineHandle::load`).
    last_load: Arc<Mutex<Option<EngineLoad>>>,
    /// Raw pointers are neither Send nor Sync: this makes `Engine` `!Send`.
    _not_send: PhantomData<*const ()>,
}

impl Engine {
    /// Load the model and create the context on the calling thread, which
    /// from then on is the only thread that may touch them. `between` runs
    /// on it while the weights are read (see [`model::load`]).
    pub fn load(settings: &EngineSettings, between: Option<Box<dyn FnMut()>>) -> Result<(Engine, EngineHandle), EngineError> {
        let loaded = model::load(settings, between)?;
        let ptrs = RawPtrs::recover(loaded.model, &loaded.ctx);
        if let Err(e) = &ptrs {
            tracing::warn!("llama-cpp-2's internals did not pass the startup check ({e}): no steering, and requests wait for long steps");
        }
        let threads = loaded.info.threads as i32;
        let steering = Steering::new(settings.steering.clone(), loaded.model, ptrs.clone(), threads);
        let (tx, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let parallel = loaded.info.slots;
        let engine = Engine {
            owner: std::thread::current().id(),
            model: loaded.model,
            ctx: loaded.ctx,
            ptrs: ptrs.as_ref().ok().copied(),
            admission: Admission::new(
                loaded.model,
                loaded.renderer,
                loaded.n_ctx_seq,
                settings.truncate_overflow,
                loaded.info.speculative != Speculation::Off,
            ),
            slots: SlotTable::new(parallel, Arc::clone(&waiting), loaded.swa_limited),
            step: DecodeStep::new(parallel, StepPlanner::new(settings.max_step_ms, ptrs.is_ok() && loaded.all_on_cpu), loaded.info.speculative),
            n_ctx_seq: loaded.n_ctx_seq,
            commands: rx,
            worked_since_trim: false,
            identity: Identity::start(&settings.model_path, &settings.cache_dir),
            cache_dir: settings.cache_dir.clone(),
            cache: PromptCache::new(
                ptrs.as_ref().ok().map(|p| p.ctx).filter(|_| !loaded.swa_limited),
                Fingerprint {
                    model_sha256: String::new(),
                    n_ctx: loaded.info.context_length * parallel,
                    n_seq: parallel,
                    kv_type: settings.kv_cache_type.name().into(),
                    swa_full: settings.swa_full,
                    build: LLAMA_BUILD.into(),
                },
                settings.prompt_cache_ram_mib,
                settings.prompt_cache_disk_mib,
            )
            .within(loaded.info.model_size_bytes + loaded.info.kv_bytes),
            worked_since_save: false,
            steering,
            steering_source: None,
            foreground_ms: 0.0,
            background_ms: 0.0,
            closing: false,
            tokens_generated: 0,
            last_load: Arc::new(Mutex::new(None)),
            _not_send: PhantomData,
        };
        let mut engine = engine;
        engine.cache_knows_the_model();
        let handle = EngineHandle::new(tx, Arc::new(loaded.info), waiting, engine.last_load.clone());
        Ok((engine, handle))
    }

    /// The thread invariant: llama.cpp is only ever entered from the thread
    /// that created it. Cheap, always on.
    fn assert_owner_thread(&self) {
        assert_eq!(
            std::thread::current().id(),
            self.owner,
            "llama.cpp entered from a thread other than the engine's owner"
        );
        // The tasks that run inside a decode hold only the engine's
        // channel; were a path to reach the context from there, this says so.
        assert!(!super::sys::decoding(), "the context was reached from inside a decode (a task run between graph nodes)");
    }

    /// Drive the engine on this thread, with the runtime's tasks run between
    /// steps and inside them, until `stop` is cancelled or every handle is
    /// gone. Then every generation still running ends as cancelled.
    pub fn drive(mut self, runtime: &tokio::runtime::Runtime, local: &tokio::task::LocalSet, stop: &CancellationToken) {
        let mut last = Instant::now();
        // Time the tasks took inside steps (what a step costs is its compute).
        let answering = Cell::new(Duration::ZERO);
        let mut answer_requests = || {
            if last.elapsed() >= ANSWER_EVERY {
                // Inside a decode ggml's other threads wait meanwhile: a
                // bounded run, however many requests are ready.
                let started = Instant::now();
                local.block_on(runtime, yield_rounds_within(ANSWER_BUDGET));
                last = Instant::now();
                answering.set(answering.get() + (last - started));
            }
        };
        while local.block_on(runtime, self.next_turn(stop)) {
            self.turn(&mut answer_requests, &answering);
        }
        self.assert_owner_thread();
        self.slots.cancel_all(&mut self.ctx);
        // What the slots hold survives the restart (the model identified
        // first, should that still be under way: it names the folder).
        self.identity.settle();
        self.cache_knows_the_model();
        for (seq, tokens) in self.slots.holdings() {
            self.cache.save(seq, &tokens);
        }
        self.cache.flush();
    }

    /// Once the model's identity is known, the prompt cache opens its folder.
    fn cache_knows_the_model(&mut self) {
        if let Some(Ok(sha256)) = self.identity.sha256() {
            self.cache.identified(&self.cache_dir, sha256);
        }
    }

    /// Let the runtime's tasks run; when there is nothing to do, wait for a
    /// command. Takes every command that arrived. False: stop.
    async fn next_turn(&mut self, stop: &CancellationToken) -> bool {
        yield_rounds().await;
        if self.slots.is_idle() && !self.background_busy() {
            if std::mem::take(&mut self.worked_since_trim) {
                // Sampling and grammar temporaries over a large
                // vocabulary are megabytes each; glibc keeps freed heap
                // pages, so a finished tool would hold them for good.
                super::sys::release_free_heap();
            }
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => return false,
                },
                _ = stop.cancelled() => return false,
            }
        }
        loop {
            match self.commands.try_recv() {
                Ok(command) => self.handle(command),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
        !stop.is_cancelled()
    }

    /// One turn of work: reap, assign, background work within its share,
    /// steering, one decode step.
    fn turn(&mut self, answer_requests: &mut dyn FnMut(), answering: &Cell<Duration>) {
        self.assert_owner_thread();
        let now = Instant::now();
        self.slots.reap_cancelled(&mut self.ctx);
        self.slots.assign(now, &mut self.ctx, &mut self.cache, answer_requests);
        // What a load read during this turn's work sees: the jobs as it starts.
        self.publish_load();
        let idle = self.slots.is_idle();
        if idle && std::mem::take(&mut self.worked_since_save) {
            // Idle after work: what the slots hold goes to the disk tier.
            for (seq, tokens) in self.slots.holdings() {
                self.cache.save(seq, &tokens);
            }
        }
        if self.background_busy() && (idle || self.background_ms <= BACKGROUND_SHARE * self.foreground_ms) {
            let started = Instant::now();
            self.background_slice(answer_requests);
            self.background_ms += started.elapsed().as_secs_f64() * 1000.0;
        }
        if let (true, Some(source)) = (self.steering.is_on(), &self.steering_source) {
            self.steering.apply(source());
        }
        let llama = (&mut self.ctx, self.ptrs.map(|p| p.ctx), self.model);
        let report = self.step.run(now, &mut self.slots, llama, self.n_ctx_seq, (answer_requests, answering));
        self.tokens_generated += report.tokens as u64;
        if report.rows > 0 {
            self.worked_since_trim = true;
            self.worked_since_save = true;
            self.foreground_ms += report.elapsed_ms;
        }
        // The share is over recent time, not the whole life.
        self.foreground_ms *= 0.995;
        self.background_ms *= 0.995;
        // ... and inside the next turn's work, as this one left it.
        self.publish_load();
    }

    /// Leave the load for reads that cannot wait for a step's end.
    fn publish_load(&self) {
        let load = self.load_report();
        *self.last_load.lock().unwrap_or_else(|p| p.into_inner()) = Some(load);
    }

    /// Background work is left: identifying the model, computing its
    /// vectors, writing prompts to disk.
    fn background_busy(&self) -> bool {
        self.identity.busy() || self.steering.busy() || (self.steering.wants_identity() && !self.identity.busy()) || self.cache.busy()
    }

    fn background_slice(&mut self, answer_requests: &mut dyn FnMut()) {
        if self.identity.busy() {
            self.identity.slice();
            if !self.identity.busy() {
                self.cache_knows_the_model();
            }
        } else if self.cache.busy() {
            self.cache.slice();
        } else if self.steering.wants_identity() {
            if let Some(sha256) = self.identity.sha256() {
                self.steering.identified(self.model, sha256);
            }
        } else if self.steering.busy() {
            self.steering.setup_slice(answer_requests);
        }
    }

    fn handle(&mut self, command: Command) {
        self.assert_owner_thread();
        match command {
            Command::Generate { request, events, cancel } => {
                if self.closing {
                    // Shutting down: answered at once, as cancelled.
                    cancel.cancel();
                }
                match self.admission.admit(request, events.clone(), cancel) {
                    Ok(job) => self.slots.enqueue(job),
                    Err(e) => {
                        self.slots.refused();
                        let _ = events.send(GenerationEvent::Failed(e));
                    }
                }
            }
            Command::Load(reply) => {
                let _ = reply.send(self.load_report());
            }
            Command::SteeringSource(source) => self.steering_source = Some(source),
            Command::SchemaGrammar(schema, reply) => {
                let grammar = llama_cpp_2::json_schema_to_grammar(&schema)
                    .map_err(|e| EngineError::Grammar(format!("the tools' JSON schemas cannot be converted ({e})")));
                let _ = reply.send(grammar);
            }
            Command::CancelAll => {
                self.closing = true;
                self.slots.cancel_all(&mut self.ctx);
            }
        }
    }

    fn load_report(&self) -> EngineLoad {
        let (active, queued, cached_tokens, slots) = self.slots.report(&self.ctx);
        let mut steering = self.steering.report();
        if let (true, Some((done, all))) = (self.steering.wants_identity(), self.identity.progress()) {
            steering.reason = Some(format!("identifying the model file (sha256, {done} of {all} MiB)"));
        }
        let (prompt_cache, tokens_generated) = (self.cache.report(), self.tokens_generated);
        EngineLoad { active, queued, cached_tokens, slots, steering, prompt_cache, tokens_generated, from_last_turn: false }
    }

    /// The measurements' access to this engine (it is not serving: the
    /// probe borrows it whole).
    pub fn probe(&mut self) -> Probe<'_> {
        self.assert_owner_thread();
        Probe {
            model: self.model,
            ctx: &mut self.ctx,
            slots: &mut self.slots,
            identity: &mut self.identity,
            steering: &mut self.steering,
            admission: &self.admission,
        }
    }
}

/// A few rounds of yielding: every task woken meanwhile runs its course.
async fn yield_rounds() {
    for _ in 0..YIELDS_PER_TURN {
        tokio::task::yield_now().await;
    }
}

/// As [`yield_rounds`], but no new round once `budget` is spent.
async fn yield_rounds_within(budget: Duration) {
    let started = Instant::now();
    for _ in 0..YIELDS_PER_TURN {
        tokio::task::yield_now().await;
        if started.elapsed() >= budget {
            break;
        }
    }
}
