//! [`SlotTable`]: the KV sequences and the jobs on them, and the queue of
//! jobs waiting for one. It owns every rule about who holds which cells:
//! assignment by longest cached prefix, a stream nobody reads yielding its
//! slot to work a client waits on (parking), trimming a sequence to what a
//! job keeps, and reaping cancelled jobs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::token::LlamaToken;

use super::handle::SlotReport;
use super::job::Job;
use super::prompt_cache::{common_prefix, PromptCache};
use super::request::{EngineError, FinishReason};

/// One KV sequence and what it holds.
pub(super) struct Slot {
    pub seq: i32,
    /// Exactly the tokens whose cells are in this sequence, by position.
    pub cached: Vec<LlamaToken>,
    pub job: Option<Job>,
    /// Tick of the last assignment, for least-recently-used choice.
    last_used: u64,
}

pub(super) struct SlotTable {
    pub slots: Vec<Slot>,
    queue: VecDeque<Job>,
    /// Shared with the handles: generations not yet given a slot.
    waiting: Arc<AtomicUsize>,
    tick: u64,
    /// The model has sliding-window attention without full-size caches: a
    /// cached sequence cannot be cut in the middle, only cleared.
    swa_limited: bool,
}

impl SlotTable {
    pub fn new(parallel: u32, waiting: Arc<AtomicUsize>, swa_limited: bool) -> SlotTable {
        let slots = (0..parallel as i32).map(|seq| Slot { seq, cached: Vec::new(), job: None, last_used: 0 }).collect();
        SlotTable { slots, queue: VecDeque::new(), waiting, tick: 0, swa_limited }
    }

    /// A job admitted: it waits for a slot.
    pub fn enqueue(&mut self, job: Job) {
        self.queue.push_back(job);
    }

    /// A request that never became a job no longer waits.
    pub fn refused(&self) {
        self.waiting.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.slots.iter().all(|s| s.job.is_none())
    }

    /// Whether any queued job is one a client waits on right now.
    pub fn queue_attended(&self, now: Instant) -> bool {
        self.queue.iter().any(|j| j.attended(now))
    }

    /// Keep the first `keep` cells of slot `i`, removing the rest. Falls back
    /// to clearing the whole sequence when llama.cpp cannot cut it there.
    pub fn trim(&mut self, i: usize, keep: usize, ctx: &mut LlamaContext) {
        let slot = &mut self.slots[i];
        let seq = slot.seq as u32;
        if keep >= slot.cached.len() {
            return;
        }
        let partial_ok =
            keep > 0 && !self.swa_limited && matches!(ctx.clear_kv_cache_seq(Some(seq), Some(keep as u32), None), Ok(true));
        if partial_ok {
            slot.cached.truncate(keep);
        } else {
            let _ = ctx.clear_kv_cache_seq(Some(seq), None, None);
            slot.cached.clear();
        }
    }

    /// Give queued jobs slots, those a client waits on first: the free slot
    /// whose cells share the longest prefix with the prompt, else the least
    /// recently used. When none is free, a job a client waits on takes the
    /// slot of a stream nobody is reading, and a call (a client blocked on
    /// the answer) the slot of the stream read least recently, which yields
    /// (see [`Self::park`]). Cells a slot gives up for another conversation
    /// are kept in the prompt cache, and a prompt that the cache covers
    /// better than the slot's own cells gets them back from there.
    pub fn assign(&mut self, now: Instant, ctx: &mut LlamaContext, cache: &mut PromptCache, between: &mut dyn FnMut()) {
        loop {
            let Some(q) = self.queue.iter().position(|j| j.attended(now)).or((!self.queue.is_empty()).then_some(0)) else {
                return;
            };
            let best = {
                let job = &self.queue[q];
                self.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.job.is_none())
                    .max_by_key(|(_, s)| (common_prefix(&s.cached, &job.prompt), std::cmp::Reverse(s.last_used)))
                    .map(|(i, _)| i)
            };
            let i = match best {
                Some(i) => i,
                None if self.queue[q].attended(now) => match self.stream_to_yield(now, self.queue[q].interest.is_none()) {
                    Some(i) => {
                        self.park(i);
                        i
                    }
                    None => return,
                },
                None => return,
            };
            // The parked job went to the back of the queue: `q` still points at ours.
            let Some(mut job) = self.queue.remove(q) else { return };
            self.fill_from_cache(i, &job.prompt, ctx, cache, between);
            // Keep at least one prompt token to decode: its logits start the reply.
            let reuse = common_prefix(&self.slots[i].cached, &job.prompt).min(job.prompt.len() - 1);
            self.trim(i, reuse, ctx);
            if !job.started {
                job.usage.cached_tokens = self.slots[i].cached.len() as u32;
                job.started = true;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
            }
            self.tick += 1;
            let slot = &mut self.slots[i];
            slot.last_used = self.tick;
            tracing::debug!(seq = slot.seq, prompt = job.prompt.len(), cached = slot.cached.len(), "generation starts");
            slot.job = Some(job);
        }
    }

    /// Before slot `i` takes `prompt`: what it holds of another conversation
    /// goes to the cache, and a kept prefix that covers more of `prompt`
    /// than its cells do comes back from there.
    fn fill_from_cache(&mut self, i: usize, prompt: &[LlamaToken], ctx: &mut LlamaContext, cache: &mut PromptCache, between: &mut dyn FnMut()) {
        if self.swa_limited {
            return;
        }
        let seq = self.slots[i].seq;
        let own = common_prefix(&self.slots[i].cached, prompt);
        if self.slots[i].cached.len() > own {
            cache.keep(seq, &self.slots[i].cached);
        }
        let Some((found, _)) = cache.best(prompt, own) else { return };
        let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        self.slots[i].cached.clear();
        match cache.restore(found, seq, between) {
            Ok(tokens) => {
                tracing::debug!(seq, tokens = tokens.len(), "prompt cells from the cache");
                self.slots[i].cached = tokens;
            }
            Err(e) => {
                tracing::warn!("a kept prompt could not be loaded ({e}): computing it instead");
                let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            }
        }
    }

    /// The busy slot a waiting job may take: a stream's whose reader has
    /// gone quiet (the one unread the longest); for a call, failing that,
    /// the stream read least recently.
    fn stream_to_yield(&self, now: Instant, for_call: bool) -> Option<usize> {
        let streams = || {
            self.slots.iter().enumerate().filter_map(|(i, s)| {
                let interest = s.job.as_ref()?.interest.as_ref()?;
                Some((i, interest.attended(now), interest.idle_s(now)))
            })
        };
        let longest_unread = |list: Vec<(usize, bool, f64)>| list.into_iter().max_by(|a, b| a.2.total_cmp(&b.2)).map(|(i, _, _)| i);
        longest_unread(streams().filter(|(_, attended, _)| !attended).collect())
            .or_else(|| if for_call { longest_unread(streams().collect()) } else { None })
    }

    /// The cells every idle slot holds, for the disk tier: `(seq, tokens)`.
    pub fn holdings(&self) -> Vec<(i32, Vec<LlamaToken>)> {
        self.slots.iter().filter(|s| s.job.is_none()).map(|s| (s.seq, s.cached.clone())).collect()
    }

    /// Take slot `i`'s job off it and queue it again, resumable: its cells
    /// stay as cache, and its prompt becomes everything decoded so far plus
    /// the token it sampled last, so it continues exactly where it stopped
    /// (sampler, grammar and decoder state travel with it).
    fn park(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(mut job) = slot.job.take() else { return };
        if let Some(token) = job.pending.take() {
            let mut tokens = slot.cached.clone();
            tokens.push(token);
            job.prompt = tokens;
        }
        tracing::debug!(seq = slot.seq, tokens = job.prompt.len(), "an unread stream yields its slot");
        self.queue.push_back(job);
    }

    /// Remove slot `i`'s cells at positions `keep..written` (a draft's
    /// rejected tokens; `cached` already holds `keep` tokens). A cache that
    /// cannot drop them fails the job rather than keep cells it does not
    /// account for.
    pub fn drop_tail(&mut self, i: usize, keep: usize, written: usize, ctx: &mut LlamaContext) {
        let seq = self.slots[i].seq as u32;
        if keep < written && !matches!(ctx.clear_kv_cache_seq(Some(seq), Some(keep as u32), None), Ok(true)) {
            self.fail(i, EngineError::Decode("the KV cache could not drop a draft's rejected cells".into()), ctx);
        }
    }

    /// End the job on slot `i` (finished): its prompt stays as cache.
    pub fn finish(&mut self, i: usize, reason: FinishReason, ctx: &mut LlamaContext) {
        if let Some(job) = self.slots[i].job.take() {
            if reason == FinishReason::Cancelled {
                // The reply's cells are of no use to anyone: free them.
                let keep = job.prompt_len.min(self.slots[i].cached.len());
                self.trim(i, keep, ctx);
            }
            job.finish(reason);
        }
    }

    /// End the job on slot `i` with an error, keeping only its prompt's cells.
    pub fn fail(&mut self, i: usize, error: EngineError, ctx: &mut LlamaContext) {
        if let Some(job) = self.slots[i].job.take() {
            let keep = job.prompt_len.min(self.slots[i].cached.len());
            self.trim(i, keep, ctx);
            job.fail(error);
        }
    }

    /// A decode failed: every running job's cells are suspect. Fail them and
    /// clear their sequences.
    pub fn fail_running(&mut self, reason: &str, ctx: &mut LlamaContext) {
        for i in 0..self.slots.len() {
            if let Some(job) = self.slots[i].job.take() {
                self.trim(i, 0, ctx);
                job.fail(EngineError::Decode(reason.to_string()));
            }
        }
    }

    /// Stop cancelled jobs (queued or running) and free their reply cells.
    pub fn reap_cancelled(&mut self, ctx: &mut LlamaContext) {
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue[i].cancelled() {
                if let Some(job) = self.queue.remove(i) {
                    if !job.started {
                        self.waiting.fetch_sub(1, Ordering::Relaxed);
                    }
                    job.finish(FinishReason::Cancelled);
                }
            } else {
                i += 1;
            }
        }
        for i in 0..self.slots.len() {
            if self.slots[i].job.as_ref().is_some_and(Job::cancelled) {
                self.finish(i, FinishReason::Cancelled, ctx);
            }
        }
    }

    /// Cancel every job, queued or running.
    pub fn cancel_all(&mut self, ctx: &mut LlamaContext) {
        for job in &self.queue {
            job.cancel.cancel();
        }
        for slot in &self.slots {
            if let Some(job) = &slot.job {
                job.cancel.cancel();
            }
        }
        self.reap_cancelled(ctx);
    }

    /// Jobs running, jobs queued, cells cached by idle slots, and each slot
    /// as the engine accounts for it and as llama.cpp's memory sees it.
    pub fn report(&self, ctx: &LlamaContext) -> (usize, usize, usize, Vec<SlotReport>) {
        let active = self.slots.iter().filter(|s| s.job.is_some()).count();
        let cached = self.slots.iter().filter(|s| s.job.is_none()).map(|s| s.cached.len()).sum();
        let slots = self
            .slots
            .iter()
            .map(|s| SlotReport { seq: s.seq, busy: s.job.is_some(), tokens: s.cached.len(), kv_pos_max: ctx.kv_cache_seq_pos_max(s.seq) })
            .collect();
        (active, self.queue.len(), cached, slots)
    }
}

