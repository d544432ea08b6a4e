//! [`DecodeStep`]: one batch built from the slot table, one `decode`, and
//! the samples it makes possible. A step carries, for every generating
//! slot, its last sampled token (and, when one pays, a draft of the tokens
//! likely to follow: [`super::speculative`]), then prompt chunks, calls
//! first, then attended streams, oldest first, as many rows as the
//! [`StepPlanner`] gives from the whole cost curve: an efficient chunk
//! beside tokens somebody reads (so a waiting prompt never waits for
//! another request's end, and the decodes keep going), a full chunk when
//! only prompts are being read. A chunk that finishes one prompt goes on
//! with the next. While any work a client waits on
//! exists, streams nobody reads pause (their tokens would only slow the
//! batch down). The runtime's tasks run between the step's graph nodes, so
//! requests are answered in the middle of a long step.

use std::ptr::NonNull;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_sys_2 as ffi;

use super::planner::{Mode, StepPlanner, MAX_BATCH};
use super::slots::SlotTable;
use super::speculative::{lookup, Draft, Drafts, Speculation, LOOKBACK, MAX_DRAFT, STREAK};
use super::sys;

/// The batch one step decodes, what steps cost, and how drafts fare: kept
/// between steps.
pub(super) struct DecodeStep {
    batch: LlamaBatch<'static>,
    pub planner: StepPlanner,
    pub drafts: Drafts,
    /// When drafts are decoded (`model.speculative`; off where the KV
    /// cache cannot drop rejected cells: a cut sliding-window cache).
    speculative: Speculation,
}

/// What a step did.
pub(super) struct StepReport {
    /// Rows decoded (0: nothing to do).
    pub rows: usize,
    pub elapsed_ms: f64,
    /// Reply tokens the step's samples produced.
    pub tokens: usize,
}

/// A position (and the draft after it) whose logits a slot samples.
struct Sample {
    slot: usize,
    /// Batch row of the first logits to sample.
    row: i32,
    /// Draft tokens decoded after it, each with its own row.
    draft: Option<Draft>,
}

impl DecodeStep {
    pub fn new(parallel: u32, planner: StepPlanner, speculative: Speculation) -> DecodeStep {
        DecodeStep { batch: LlamaBatch::new(MAX_BATCH, parallel as i32), planner, drafts: Drafts::default(), speculative }
    }

    /// Build the step's batch, decode it (with `between` run between its
    /// graph nodes, when the context's pointer is known; `answering` is the
    /// time it has spent running tasks), and sample every slot that now has
    /// logits to sample from.
    pub fn run(
        &mut self,
        now: Instant,
        slots: &mut SlotTable,
        llama: (&mut LlamaContext<'static>, Option<NonNull<ffi::llama_context>>, &'static LlamaModel),
        n_ctx_seq: usize,
        (between, answering): (&mut dyn FnMut(), &std::cell::Cell<std::time::Duration>),
    ) -> StepReport {
        let (ctx, ctx_ptr, model) = llama;
        self.batch.clear();
        // Per slot: whether its job is attended (None: no job).
        let attended: Vec<Option<bool>> = slots.slots.iter().map(|s| s.job.as_ref().map(|j| j.attended(now))).collect();
        let urgent = attended.contains(&Some(true)) || slots.queue_attended(now);
        let paused: Vec<bool> = attended.iter().map(|a| urgent && *a == Some(false)).collect();
        let generating: Vec<usize> = (0..slots.slots.len())
            .filter(|&i| !paused[i] && slots.slots[i].job.as_ref().is_some_and(|j| j.pending.is_some()))
            .collect();
        // Somebody reads the tokens of this step: keep their pace.
        let cadence = generating.iter().any(|&i| attended[i] == Some(true));
        let mut samples: Vec<Sample> = Vec::new();
        let mut rows = generating.len();
        for &i in &generating {
            let (proposed, draft) =
                if self.speculative == Speculation::Off { (None, None) } else { self.draft_for(slots, i, rows, n_ctx_seq) };
            let slot = &mut slots.slots[i];
            let Some(job) = slot.job.as_mut() else { continue };
            job.proposed = proposed;
            let Some(token) = job.pending.take() else { continue };
            let pos = slot.cached.len();
            let extra = draft.as_ref().map_or(0, |d| d.tokens.len());
            if self.batch.n_tokens() as usize + 1 + extra > MAX_BATCH
                || self.batch.add(token, pos as i32, &[slot.seq], true).is_err()
            {
                job.pending = Some(token);
                continue;
            }
            slot.cached.push(token);
            let row = self.batch.n_tokens() - 1;
            if let Some(d) = &draft {
                for (j, &t) in d.tokens.iter().enumerate() {
                    // Room was checked above: these adds cannot fail.
                    let _ = self.batch.add(t, (pos + 1 + j) as i32, &[slot.seq], true);
                }
                rows += d.tokens.len();
            }
            samples.push(Sample { slot: i, row, draft });
        }
        let drafting = samples.iter().any(|s| s.draft.is_some());
        let mode = if cadence { Mode::Cadence } else { Mode::Throughput };
        // Calls first (a client is blocked on them), then attended streams,
        // then the rest; oldest first within each.
        let mut prefilling: Vec<(u8, u64, usize)> = slots
            .slots
            .iter()
            .enumerate()
            .filter(|(i, _)| !paused[*i])
            .filter_map(|(i, s)| {
                let j = s.job.as_ref().filter(|j| j.pending.is_none() && s.cached.len() < j.prompt.len())?;
                let rank = if j.interest.is_none() { 0 } else if attended[i] == Some(true) { 1 } else { 2 };
                Some((rank, j.id, i))
            })
            .collect();
        prefilling.sort_unstable();
        let waiting: usize = prefilling
            .iter()
            .filter_map(|&(_, _, i)| slots.slots[i].job.as_ref().map(|j| j.prompt.len() - slots.slots[i].cached.len()))
            .sum();
        let mut room = self.planner.prompt_rows(mode, rows, waiting).min(MAX_BATCH - self.batch.n_tokens() as usize);
        let mut prompt_rows = 0;
        for (_, _, i) in prefilling {
            if room == 0 {
                break;
            }
            let slot = &mut slots.slots[i];
            let Some(job) = slot.job.as_mut() else { continue };
            let start = slot.cached.len();
            if job.started_at.is_none() {
                // Its wait ends with its first prompt row in a batch.
                job.started_at = Some(now);
            }
            let end = job.prompt.len().min(start + room);
            for pos in start..end {
                let last = pos + 1 == job.prompt.len();
                if self.batch.add(job.prompt[pos], pos as i32, &[slot.seq], last).is_err() {
                    break;
                }
                slot.cached.push(job.prompt[pos]);
                if last {
                    samples.push(Sample { slot: i, row: self.batch.n_tokens() - 1, draft: None });
                }
            }
            let fed = slot.cached.len() - start;
            prompt_rows += fed;
            room = room.saturating_sub(fed);
        }
        let rows = self.batch.n_tokens() as usize;
        if rows == 0 {
            return StepReport { rows: 0, elapsed_ms: 0.0, tokens: 0 };
        }
        let started = Instant::now();
        let batch = &mut self.batch;
        // Time spent answering requests inside the step (`between` adds it
        // to `answering`) is not the step's cost: the planner learns compute.
        let answered_before = answering.get();
        let decoded = match ctx_ptr {
            Some(ptr) => sys::decode_between_nodes(ptr, between, || ctx.decode(batch)),
            None => ctx.decode(batch),
        };
        if let Err(e) = decoded {
            tracing::error!("decode failed: {e}");
            slots.fail_running(&e.to_string(), ctx);
            return StepReport { rows, elapsed_ms: f64::NAN, tokens: 0 };
        }
        // A device backend returns from decode once the graph is queued:
        // the step's cost is the wait for its results (on the CPU, nothing).
        ctx.synchronize();
        let elapsed = started.elapsed().saturating_sub(answering.get() - answered_before);
        if !self.planner.interleaved() {
            super::request::add_deaf_time(elapsed);
        }
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        tracing::trace!(rows, prompt_rows, elapsed_ms, ?mode, drafting, "decode step");
        // Steps where every row has logits (decoding and drafts) cost more
        // per row than prompt chunks: they are learned apart.
        self.planner.observe(rows, elapsed_ms, prompt_rows == 0);
        let mut tokens = 0;
        for sample in samples {
            tokens += self.sample(slots, sample, ctx, model, n_ctx_seq);
        }
        StepReport { rows, elapsed_ms, tokens }
    }

    /// The lookup's proposal for generating slot `i`'s next token, and a
    /// draft sized to pay on this machine with `rows` rows in the step so
    /// far (None when none does).
    fn draft_for(&mut self, slots: &SlotTable, i: usize, rows: usize, n_ctx_seq: usize) -> (Option<Draft>, Option<Draft>) {
        let slot = &slots.slots[i];
        let Some(job) = slot.job.as_ref().filter(|j| j.speculative) else { return (None, None) };
        let Some(pending) = job.pending else { return (None, None) };
        // Never past the token limit or the context: the last token there is sampled, not drafted.
        let left = job.max_tokens.saturating_sub(job.usage.completion_tokens as usize + 1);
        let room = n_ctx_seq.saturating_sub(slot.cached.len() + 2);
        let max = MAX_DRAFT.min(left).min(room);
        // Only the window drafts are looked up in, not the whole context.
        let start = slot.cached.len().saturating_sub(LOOKBACK - 1);
        let window = &slot.cached[start..];
        let mut history = Vec::with_capacity(window.len() + 1);
        history.extend_from_slice(window);
        history.push(pending);
        let input = job.prompt_len.saturating_sub(start);
        let Some(mut draft) = lookup(&history, input, &job.prediction, max) else { return (None, None) };
        draft.streak = job.copying >= STREAK;
        let proposed = Some(Draft { tokens: draft.tokens[..1].to_vec(), ..draft.clone() });
        let planner = &self.planner;
        let k = match self.speculative {
            Speculation::Always => draft.tokens.len(),
            _ => self.drafts.choose(&draft, rows, |r| planner.predict_logits(r)),
        };
        tracing::trace!(
            found = draft.tokens.len(),
            k,
            ngram = draft.ngram,
            streak = draft.streak,
            acceptance = self.drafts.acceptance(&draft),
            c1 = ?self.planner.predict_logits(rows),
            c2 = ?self.planner.predict_logits(rows + 1),
            c4 = ?self.planner.predict_logits(rows + 3),
            "draft"
        );
        if k == 0 {
            return (proposed, None);
        }
        draft.tokens.truncate(k);
        (proposed, Some(draft))
    }

    /// Sample a slot's logits: the position after its last token, then, in
    /// order, after each draft token while the samples agree with the
    /// draft. The first disagreement is the next token; the cells of the
    /// draft tokens after it are removed.
    fn sample(&mut self, slots: &mut SlotTable, s: Sample, ctx: &mut LlamaContext, model: &LlamaModel, n_ctx_seq: usize) -> usize {
        let i = s.slot;
        let drafted: &[LlamaToken] = s.draft.as_ref().map_or(&[], |d| &d.tokens);
        // Cells the step wrote for this slot: its token and the whole draft.
        let written = slots.slots[i].cached.len() + drafted.len();
        let mut accepted = 0;
        let mut first_sample = None;
        let mut taken = 0;
        let mut finish = None;
        let mut failure = None;
        {
            let slot = &mut slots.slots[i];
            let Some(job) = slot.job.as_mut() else { return 0 };
            for at in 0..=drafted.len() {
                let row = s.row + at as i32;
                let token = match job.sampler.sample(ctx, row) {
                    Ok(token) => token,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                };
                if job.logprobs.is_some() {
                    job.note_logprob(model, ctx.get_logits_ith(row), token);
                }
                if at == 0 {
                    first_sample = Some(token);
                }
                finish = job.take_token(model, token, slot.cached.len(), n_ctx_seq);
                taken += 1;
                if finish.is_some() {
                    break;
                }
                match drafted.get(at) {
                    // The draft holds: its cell is already computed.
                    Some(&d) if d == token => {
                        job.pending = None;
                        slot.cached.push(d);
                        accepted += 1;
                    }
                    // The sample is the next token to decode.
                    _ => break,
                }
            }
            if let Some(d) = &s.draft {
                job.usage.draft_tokens += drafted.len() as u32;
                job.usage.accepted_tokens += accepted as u32;
                self.drafts.observe(d, drafted.len(), accepted);
            }
            // The copy goes on while every sample is what the lookup
            // proposed: the drafted ones that held, or the one proposal
            // checked against the first sample when nothing was drafted.
            let held = match (&s.draft, job.proposed.take()) {
                (Some(_), _) => accepted == drafted.len(),
                (None, Some(p)) => {
                    let held = first_sample == Some(p.tokens[0]);
                    self.drafts.observe(&p, 1, usize::from(held));
                    held
                }
                (None, None) => false,
            };
            job.copying = if held { job.copying + accepted.max(1) as u32 } else { 0 };
        }
        if slots.slots[i].cached.len() < written {
            // Rejected draft cells go.
            let keep = slots.slots[i].cached.len();
            slots.drop_tail(i, keep, written, ctx);
        }
        if let Some(e) = failure {
            slots.fail(i, e, ctx);
        } else if let Some(reason) = finish {
            slots.finish(i, reason, ctx);
        }
        taken
    }
}
