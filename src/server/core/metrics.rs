//! [`Metrics`]: the server's cumulative figures since it started, served as
//! the `elpis://metrics` resource: generations by how they ended, tokens in
//! and out and the seconds each took, and the refusals. The engine's
//! present load (busy slots, queue, KV cells) is added when it is read.

use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::engine::{Completion, FinishReason};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Generations queued on the engine (calls and streams).
    pub generations: u64,
    pub finished: u64,
    pub cancelled: u64,
    pub abandoned: u64,
    pub failed: u64,
    /// Refused before queueing: the queue was full (`server.max_queued`).
    pub refused_busy: u64,
    /// Prompt tokens decoded, and served from the cache instead.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub draft_tokens: u64,
    pub accepted_tokens: u64,
    pub queue_seconds: f64,
    pub prompt_seconds: f64,
    pub reply_seconds: f64,
    /// Quick calls (mood, stream reads and cancels, metrics, capabilities)
    /// answered, and how many of them inside a decode step rather than
    /// between steps.
    pub quick_calls: u64,
    pub quick_calls_inside_steps: u64,
    /// Engine loads (capabilities, metrics) answered inside a step with
    /// what the engine's last turn left, rather than at the step's end.
    pub loads_from_last_turn: u64,
}

pub struct Metrics {
    started: Instant,
    totals: Mutex<Totals>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics { started: Instant::now(), totals: Mutex::default() }
    }
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Totals) -> T) -> T {
        f(&mut self.totals.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn queued(&self) {
        self.with(|t| t.generations += 1);
    }

    pub fn refused(&self) {
        self.with(|t| t.refused_busy += 1);
    }

    /// A quick call is being answered, inside a decode step or not.
    pub fn quick_call(&self) {
        let inside = crate::engine::inside_a_step();
        self.with(|t| {
            t.quick_calls += 1;
            t.quick_calls_inside_steps += u64::from(inside);
        });
    }

    /// An engine load was read; `from_last_turn`: inside a step.
    pub fn load_read(&self, from_last_turn: bool) {
        self.with(|t| t.loads_from_last_turn += u64::from(from_last_turn));
    }

    pub fn failed(&self) {
        self.with(|t| t.failed += 1);
    }

    /// A generation ended with `completion`.
    pub fn ended(&self, c: &Completion) {
        self.with(|t| {
            match c.finish_reason {
                FinishReason::Cancelled => t.cancelled += 1,
                FinishReason::Abandoned => t.abandoned += 1,
                FinishReason::Stop | FinishReason::Length => t.finished += 1,
            }
            t.prompt_tokens += u64::from(c.usage.prompt_tokens.saturating_sub(c.usage.cached_tokens));
            t.cached_tokens += u64::from(c.usage.cached_tokens);
            t.completion_tokens += u64::from(c.usage.completion_tokens);
            t.draft_tokens += u64::from(c.usage.draft_tokens);
            t.accepted_tokens += u64::from(c.usage.accepted_tokens);
            t.queue_seconds += c.timings.queue_ms / 1000.0;
            t.prompt_seconds += c.timings.prompt_ms / 1000.0;
            t.reply_seconds += c.timings.reply_ms / 1000.0;
        });
    }

    /// The totals, and the seconds since the server started.
    pub fn snapshot(&self) -> (Totals, f64) {
        (self.with(|t| t.clone()), self.started.elapsed().as_secs_f64())
    }
}
