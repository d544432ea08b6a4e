//! The engine: the one owner of llama.cpp (model, context, batches,
//! samplers) and the scheduler that steps generations on the runtime's only
//! thread.
//!
//! Everything here that touches llama.cpp belongs to [`Engine`], which is
//! `!Send`: it cannot be moved to another thread, so the crash of the Python
//! predecessor (a context used from two threads) cannot be written. The rest
//! of the program talks to it through [`EngineHandle`] (cheap to clone, `Send`),
//! which queues [`GenerationRequest`]s and hands back a [`Generation`]: a
//! channel of [`GenerationEvent`]s plus a cancellation token.
//!
//! The rooms, by what each owns:
//! - `scheduler`: the [`Engine`] itself (model, context, the loop);
//! - `model`: loading the model and context, [`ModelInfo`]; `identity`:
//!   which model file it is (its sha256, remembered);
//! - `admission`: a request becomes a job (render, tokenise, fit);
//! - `job`, `sampler`: one generation, and its sampler chain and grammar;
//! - `slots`: the KV sequences and the queue (assignment, parking, trimming);
//!   `prompt_cache`: prompt prefixes kept in RAM and on disk beyond them;
//! - `widen`: Q5_0 weights held as Q8_0 (the same values; faster CPU
//!   kernels), in a copy of the model file made once;
//!   `affinity`: compute threads held one to a CPU;
//! - `step`, `planner`: one batch built and decoded, and how much it
//!   carries; `speculative`: drafts from the text, and when they pay;
//! - `steering`, `vectors`, `sys`: emotion steering with control vectors,
//!   their files, and the raw llama.cpp calls (the one file that calls C directly);
//!   `rpc`: layers on other hosts' workers (ggml RPC), probed before use;
//!   `gpu`: layers on the GPU (how many fit, which devices);
//! - `text`: detokenisation; `probes`: what the person's commands measure;
//!   `raw`: the benchmark's bare llama-cpp-2 loop;
//! - `request`, `handle`: the plain data the server sends and receives, and
//!   the `Send` handle.

mod admission;
mod affinity;
mod gpu;
mod huge_pages;
mod handle;
mod identity;
mod job;
mod meminfo;
mod model;
mod planner;
mod probes;
mod prompt_cache;
mod raw;
mod request;
mod rpc;
mod sampler;
mod scheduler;
mod slots;
mod speculative;
mod steering;
mod step;
mod sys;
mod text;
mod vectors;
mod widen;

pub use affinity::PinThreads;
pub use gpu::{GpuDevice, GpuInfo, GpuLayers};
pub use handle::{EngineHandle, EngineLoad, Generation, SlotReport, SteeringSource};
pub use model::{route_llama_logs, EngineSettings, KvType, ModelInfo};
pub use prompt_cache::CacheReport;
pub use probes::Probe;
pub use raw::{raw_speed, RawSpeed};
pub use request::{
    Completion, EngineError, FinishReason, GenerationEvent, GenerationRequest, Grammar, Interest, SamplingParams, Timings,
    TokenLogprob, TopLogprob, Usage,
};
pub use rpc::{serve_worker, RESTARTED_ENV};
pub use scheduler::Engine;

/// Whether the caller runs inside a decode step: a task the engine's
/// thread runs between the graph nodes of a step (ggml's other threads
/// waiting). Nothing there may touch the context; this only says where a
/// request was answered.
pub fn inside_a_step() -> bool {
    sys::decoding()
}
pub use speculative::Speculation;
pub use steering::{default_layers, SteeringReport, SteeringSettings};
pub use text::TextDecoder;
pub use vectors::{read_gguf, write_gguf, DirectionSet, Reduction, QUADRANTS};
