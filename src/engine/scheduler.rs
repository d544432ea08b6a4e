//! [`Engine`]: the owner of llama.cpp (model, context) and the loop that
//! steps every running generation one batch at a time on the runtime's one
//! thread.
//!
//! Each turn of the loop takes the commands that arrived, reaps cancelled
//! jobs, gives queued jobs slots ([`SlotTable`]), does a slice of setup
//! work (steering), sets the mood's steering blend, runs one
//! [`DecodeStep`], and yields so MCP requests are answered between tokens.
//! A slot remembers the tokens in its cells, so a prompt that extends an
//! earlier one only decodes the new suffix.

use std::marker::PhantomData;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use tokio::sync::mpsc;

use super::admission::Admission;
use super::handle::{Command, EngineHandle, EngineLoad, SteeringSource};
use super::model::{self, EngineSettings};
use super::planner::StepBudget;
use super::probes::Probe;
use super::request::{EngineError, GenerationEvent};
use super::slots::SlotTable;
use super::steering::Steering;
use super::step::DecodeStep;

/// Yields between two decode steps (a yield costs microseconds).
const YIELDS_PER_STEP: usize = 8;

/// The owner of llama.cpp. `!Send` by construction (see `_not_send`).
pub struct Engine {
    /// The thread that created the engine; every llama call asserts it.
    owner: ThreadId,
    model: &'static LlamaModel,
    ctx: LlamaContext<'static>,
    /// Requests become jobs here (render, tokenise, fit, sampler).
    admission: Admission,
    slots: SlotTable,
    step: DecodeStep,
    budget: StepBudget,
    /// Tokens one sequence may hold.
    n_ctx_seq: usize,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Set by a step that decoded something; cleared when the engine, idle
    /// again, has handed the memory its work no longer needs back to the OS.
    worked_since_trim: bool,
    /// Emotion steering: control vectors on the context.
    steering: Steering,
    /// Where the mood's steering coefficients are read.
    steering_source: Option<SteeringSource>,
    /// The server is shutting down: every generation ends as cancelled.
    closing: bool,
    /// Raw pointers are neither Send nor Sync: this makes `Engine` `!Send`.
    _not_send: PhantomData<*const ()>,
}

impl Engine {
    /// Load the model and create the context on the calling thread, which
    /// from then on is the only thread that may touch them.
    pub fn load(settings: &EngineSettings) -> Result<(Engine, EngineHandle), EngineError> {
        let loaded = model::load(settings)?;
        let threads = loaded.info.threads as i32;
        let steering = Steering::new(settings.steering.clone(), loaded.model, &loaded.ctx, &settings.model_path, threads);
        let (tx, rx) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let parallel = loaded.info.slots;
        let engine = Engine {
            owner: std::thread::current().id(),
            model: loaded.model,
            ctx: loaded.ctx,
            admission: Admission::new(loaded.model, loaded.renderer, loaded.n_ctx_seq, settings.truncate_overflow),
            slots: SlotTable::new(parallel, Arc::clone(&waiting), loaded.swa_limited),
            step: DecodeStep::new(parallel),
            budget: StepBudget::new(settings.max_step_ms),
            n_ctx_seq: loaded.n_ctx_seq,
            commands: rx,
            worked_since_trim: false,
            steering,
            steering_source: None,
            closing: false,
            _not_send: PhantomData,
        };
        Ok((engine, EngineHandle::new(tx, Arc::new(loaded.info), waiting)))
    }

    /// The thread invariant: llama.cpp is only ever entered from the thread
    /// that created it. Cheap, always on.
    fn assert_owner_thread(&self) {
        assert_eq!(
            std::thread::current().id(),
            self.owner,
            "llama.cpp entered from a thread other than the engine's owner"
        );
    }

    /// Serve commands until every handle is dropped. Yields after each step.
    pub async fn run(mut self) {
        loop {
            if self.slots.is_idle() && !self.steering.busy() {
                if std::mem::take(&mut self.worked_since_trim) {
                    // Sampling and grammar temporaries over a large
                    // vocabulary are megabytes each; glibc keeps freed heap
                    // pages, so a finished tool would hold them for good.
                    super::sys::release_free_heap();
                }
                match self.commands.recv().await {
                    Some(command) => self.handle(command),
                    None => break,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(command) => self.handle(command),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.assert_owner_thread();
                        self.slots.cancel_all(&mut self.ctx);
                        return;
                    }
                }
            }
            self.assert_owner_thread();
            let now = Instant::now();
            self.slots.reap_cancelled(&mut self.ctx);
            self.slots.assign(now, &mut self.ctx);
            if self.steering.busy() {
                self.steering.setup_slice(self.model);
            }
            if let (true, Some(source)) = (self.steering.is_on(), &self.steering_source) {
                self.steering.apply(source());
            }
            let report = self.step.run(now, &mut self.slots, &self.budget, &mut self.ctx, self.model, self.n_ctx_seq);
            if report.rows > 0 {
                self.worked_since_trim = true;
                if report.prompt_rows > 0 {
                    self.budget.observe(report.rows, report.elapsed_ms);
                }
            }
            // Let every request that arrived during the step run its course
            // (read, dispatch, answer, write) before the next step: each hop
            // is a task woken in turn, and one yield only lets one round run.
            for _ in 0..YIELDS_PER_STEP {
                tokio::task::yield_now().await;
            }
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
        EngineLoad { active, queued, cached_tokens, slots, steering: self.steering.report() }
    }

    /// The measurements' access to this engine (it is not serving: the
    /// probe borrows it whole).
    pub fn probe(&mut self) -> Probe<'_> {
        self.assert_owner_thread();
        Probe {
            model: self.model,
            ctx: &mut self.ctx,
            slots: &mut self.slots,
            steering: &mut self.steering,
            admission: &self.admission,
        }
    }
}
