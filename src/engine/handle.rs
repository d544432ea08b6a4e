//! [`EngineHandle`]: the `Send` side of the engine. It queues work on the
//! engine's channel ([`Command`]) and hands back a [`Generation`]: a channel
//! of events plus a cancellation token. All the locking between the server's
//! tasks and the engine is here (an atomic counter, the channel, and the
//! load the engine's last turn left).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::model::ModelInfo;
use super::request::{EngineError, GenerationEvent, GenerationRequest};
use super::prompt_cache::CacheReport;
use super::steering::SteeringReport;

/// A running generation, as the caller sees it.
pub struct Generation {
    pub events: mpsc::UnboundedReceiver<GenerationEvent>,
    /// Cancel to stop decoding at the next step. Dropping `events` does too.
    pub cancel: CancellationToken,
}

/// What the engine's channel carries.
pub(crate) enum Command {
    Generate {
        request: GenerationRequest,
        events: mpsc::UnboundedSender<GenerationEvent>,
        cancel: CancellationToken,
    },
    /// Reply with the number of busy slots and queued requests.
    Load(tokio::sync::oneshot::Sender<EngineLoad>),
    /// Build a GBNF grammar from a JSON schema.
    SchemaGrammar(String, tokio::sync::oneshot::Sender<Result<String, EngineError>>),
    /// Where the mood's four steering coefficients are read, before a step.
    SteeringSource(SteeringSource),
    /// Stop every queued and running generation (each ends as cancelled).
    CancelAll,
}

/// Reads the current steering coefficients (excited, frustrated, calm,
/// depleted), which drift as the mood decays.
pub type SteeringSource = Box<dyn Fn() -> [f32; 4] + Send>;

/// How busy the engine is.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EngineLoad {
    pub active: usize,
    pub queued: usize,
    /// KV cells held by slots for finished work (the prompt cache).
    pub cached_tokens: usize,
    pub slots: Vec<SlotReport>,
    pub steering: SteeringReport,
    pub prompt_cache: CacheReport,
    /// Reply tokens the engine sampled since start.
    pub tokens_generated: u64,
    /// Read from what the engine's last turn left (it was inside a step).
    #[serde(skip)]
    pub from_last_turn: bool,
}

/// One slot, as the engine accounts for it and as llama.cpp's memory sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SlotReport {
    pub seq: i32,
    pub busy: bool,
    /// Tokens the slot believes its cells hold.
    pub tokens: usize,
    /// Highest position llama.cpp holds for the sequence (-1 when empty):
    /// `tokens - 1` when the accounting is right.
    pub kv_pos_max: i32,
}

/// The `Send` side of the engine: queue work, read model facts.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::UnboundedSender<Command>,
    info: Arc<ModelInfo>,
    /// Generations sent that have not had a slot yet (nor failed or been
    /// cancelled): raised here, lowered by the engine.
    waiting: Arc<AtomicUsize>,
    /// The load at the end of the engine's last turn (None before one).
    last_load: Arc<Mutex<Option<EngineLoad>>>,
}

/// How long [`EngineHandle::load`] waits for the engine before it takes
/// the load its last turn left (Psyche polls a stream every 50 ms).
const LOAD_PATIENCE: Duration = Duration::from_millis(50);

impl EngineHandle {
    pub(super) fn new(
        commands: mpsc::UnboundedSender<Command>,
        info: Arc<ModelInfo>,
        waiting: Arc<AtomicUsize>,
        last_load: Arc<Mutex<Option<EngineLoad>>>,
    ) -> Self {
        EngineHandle { commands, info, waiting, last_load }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Generations waiting for a slot (or still to be read by the engine).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Queue a generation; events arrive as the engine steps it.
    pub fn generate(&self, request: GenerationRequest) -> Generation {
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let command = Command::Generate { request, events: tx.clone(), cancel: cancel.clone() };
        self.waiting.fetch_add(1, Ordering::Relaxed);
        if self.commands.send(command).is_err() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(GenerationEvent::Failed(EngineError::Stopped));
        }
        Generation { events: rx, cancel }
    }

    /// Busy slots, queue length and cached cells.
    ///
    /// Between steps the engine answers at once. Inside a long one (a
    /// prompt chunk can take seconds) the answer is the load the last turn
    /// left: a client waiting on it would stop reading its streams, which
    /// then count as unattended and get no rows in the next steps.
    pub async fn load(&self) -> Result<EngineLoad, EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands.send(Command::Load(tx)).map_err(|_| EngineError::Stopped)?;
        let mut rx = std::pin::pin!(rx);
        tokio::select! {
            fresh = &mut rx => return fresh.map_err(|_| EngineError::Stopped),
            () = tokio::time::sleep(LOAD_PATIENCE) => {}
        }
        let last = self.last_load.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match last {
            Some(load) => Ok(EngineLoad { from_last_turn: true, ..load }),
            None => rx.await.map_err(|_| EngineError::Stopped),
        }
    }

    /// Stop every generation, queued or running: each ends as `cancelled`.
    pub fn cancel_all(&self) {
        let _ = self.commands.send(Command::CancelAll);
    }

    /// Steer with the coefficients `source` reads (when vectors exist).
    pub fn steer_with(&self, source: SteeringSource) {
        let _ = self.commands.send(Command::SteeringSource(source));
    }

    /// Convert a JSON schema to a GBNF grammar (llama.cpp's converter).
    pub async fn schema_grammar(&self, schema: &serde_json::Value) -> Result<String, EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::SchemaGrammar(schema.to_string(), tx))
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}
