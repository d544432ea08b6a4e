//! [`DecodeStep`]: one batch built from the slot table, one `decode`, and
//! the samples it makes possible. A step carries the last sampled token of
//! every generating slot and then prompt chunks, oldest job first, within
//! the step's budget. While any work a client waits on exists, streams
//! nobody reads pause (their tokens would only slow the batch down).

use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;

use super::planner::{StepBudget, MAX_BATCH, MIN_CHUNK};
use super::slots::SlotTable;

/// The batch one step decodes, kept between steps.
pub(super) struct DecodeStep {
    batch: LlamaBatch<'static>,
}

/// What a step did, for the planner and the log.
pub(super) struct StepReport {
    /// Rows decoded (0: nothing to do).
    pub rows: usize,
    pub prompt_rows: usize,
    pub elapsed_ms: f64,
}

impl DecodeStep {
    pub fn new(parallel: u32) -> DecodeStep {
        DecodeStep { batch: LlamaBatch::new(MAX_BATCH, parallel as i32) }
    }

    /// Build the step's batch, decode it, and sample every slot that now
    /// has logits to sample from.
    pub fn run(
        &mut self,
        now: Instant,
        slots: &mut SlotTable,
        budget: &StepBudget,
        ctx: &mut LlamaContext<'static>,
        model: &'static LlamaModel,
        n_ctx_seq: usize,
    ) -> StepReport {
        self.batch.clear();
        // Per slot: whether its job is attended (None: no job).
        let attended: Vec<Option<bool>> = slots.slots.iter().map(|s| s.job.as_ref().map(|j| j.attended(now))).collect();
        let urgent = attended.contains(&Some(true)) || slots.queue_attended(now);
        let paused: Vec<bool> = attended.iter().map(|a| urgent && *a == Some(false)).collect();
        // (slot index, batch index) of every position whose logits we sample.
        let mut sample_at: Vec<(usize, i32)> = Vec::new();
        let mut generating = 0;
        for (i, slot) in slots.slots.iter_mut().enumerate() {
            if paused[i] {
                continue;
            }
            let Some(job) = slot.job.as_mut() else { continue };
            let Some(token) = job.pending.take() else { continue };
            let pos = slot.cached.len() as i32;
            if self.batch.add(token, pos, &[slot.seq], true).is_err() {
                job.pending = Some(token);
                continue;
            }
            slot.cached.push(token);
            sample_at.push((i, self.batch.n_tokens() - 1));
            generating += 1;
        }
        let mut room = budget.tokens().saturating_sub(generating).max(MIN_CHUNK);
        let mut prefilling: Vec<(u64, usize)> = slots
            .slots
            .iter()
            .enumerate()
            .filter(|(i, _)| !paused[*i])
            .filter_map(|(i, s)| {
                s.job.as_ref().filter(|j| j.pending.is_none() && s.cached.len() < j.prompt.len()).map(|j| (j.id, i))
            })
            .collect();
        prefilling.sort_unstable();
        let mut prompt_rows = 0;
        for (_, i) in prefilling {
            if room == 0 {
                break;
            }
            let slot = &mut slots.slots[i];
            let Some(job) = slot.job.as_ref() else { continue };
            let start = slot.cached.len();
            let end = job.prompt.len().min(start + room);
            for pos in start..end {
                let last = pos + 1 == job.prompt.len();
                if self.batch.add(job.prompt[pos], pos as i32, &[slot.seq], last).is_err() {
                    break;
                }
                slot.cached.push(job.prompt[pos]);
                if last {
                    sample_at.push((i, self.batch.n_tokens() - 1));
                }
            }
            let fed = slot.cached.len() - start;
            prompt_rows += fed;
            room = room.saturating_sub(fed);
        }
        let rows = self.batch.n_tokens() as usize;
        if rows == 0 {
            return StepReport { rows: 0, prompt_rows: 0, elapsed_ms: 0.0 };
        }
        let started = Instant::now();
        if let Err(e) = ctx.decode(&mut self.batch) {
            tracing::error!("decode failed: {e}");
            slots.fail_running(&e.to_string(), ctx);
            return StepReport { rows, prompt_rows, elapsed_ms: f64::NAN };
        }
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::trace!(rows, prompt_rows, elapsed_ms, "decode step");
        for (i, batch_index) in sample_at {
            sample_slot(slots, i, batch_index, ctx, model, n_ctx_seq);
        }
        StepReport { rows, prompt_rows, elapsed_ms }
    }
}

/// Sample slot `i`'s next token from the logits at `batch_index`, and end
/// its job when that token finishes it.
fn sample_slot(slots: &mut SlotTable, i: usize, batch_index: i32, ctx: &mut LlamaContext, model: &LlamaModel, n_ctx_seq: usize) {
    let slot = &mut slots.slots[i];
    let cells = slot.cached.len();
    let Some(job) = slot.job.as_mut() else { return };
    let finish = match job.sampler.sample(ctx, batch_index) {
        Ok(token) => job.take_token(model, token, cells, n_ctx_seq),
        Err(e) => {
            slots.fail(i, e, ctx);
            return;
        }
    };
    if let Some(reason) = finish {
        slots.finish(i, reason, ctx);
    }
}
