//! [`Job`]: one queued or running generation: the tokens its slot must
//! hold, its sampler and detokeniser, what it has written, and the channel
//! its events go out on. A job ends exactly once, with `Done` or `Failed`.

use std::time::Instant;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::speculative::Draft;
use super::request::{Completion, EngineError, FinishReason, GenerationEvent, Interest, Timings, TokenLogprob, TopLogprob, Usage};
use super::sampler::JobSampler;
use super::text::TextDecoder;

pub(super) struct Job {
    /// Admission order: prompt chunks are served oldest first.
    pub id: u64,
    /// The tokens the slot must hold before the next sample: the prompt, or,
    /// for a job that yielded its slot, the prompt and the reply so far.
    pub prompt: Vec<LlamaToken>,
    /// Length of the prompt proper (cells kept as cache when the job ends).
    pub prompt_len: usize,
    /// Set once the job first had a slot (its cached-token count is final).
    pub started: bool,
    /// A polled stream's reader; None when a client waits on the call.
    pub interest: Option<Interest>,
    pub max_tokens: usize,
    /// Drafts may be decoded for this job (see `speculative`).
    pub speculative: bool,
    /// The request's predicted output, tokenised: a draft source.
    pub prediction: Vec<LlamaToken>,
    /// What the text lookup proposed at the last step, cut to its first
    /// token (decoded as a draft or not: a proposal not drafted is still
    /// checked against the sample, so acceptance is learned without paying
    /// for drafts), and how many sampled tokens in a row matched such
    /// proposals: a reply copying its input (see `speculative`).
    pub proposed: Option<Draft>,
    pub copying: u32,
    pub sampler: JobSampler,
    pub decoder: TextDecoder,
    /// Sampled but not yet decoded: the input of this job's next step.
    pub pending: Option<LlamaToken>,
    pub text: String,
    pub usage: Usage,
    /// Old turns were dropped to fit the context.
    pub truncated: bool,
    pub events: mpsc::UnboundedSender<GenerationEvent>,
    pub cancel: CancellationToken,
    /// The request's own stop strings (the decoder also has the template's).
    pub stop: Vec<String>,
    /// Log-probabilities asked for (top alternatives), and those so far.
    pub logprobs: Option<(usize, Vec<TokenLogprob>)>,
    /// When the engine took the request, a step first read a row of its
    /// prompt, and its first reply token came (for `timings`).
    pub admitted: Instant,
    pub started_at: Option<Instant>,
    pub first_token_at: Option<Instant>,
}

impl Job {
    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled() || self.events.is_closed()
    }

    /// Whether a client is waiting on this job right now: a call always, a
    /// stream while its reader keeps polling.
    pub fn attended(&self, now: Instant) -> bool {
        self.interest.as_ref().is_none_or(|i| i.attended(now))
    }

    /// A token was sampled: count it, hand out its text, and say whether
    /// the job is done (`cells`: what the slot holds; `n_ctx_seq`: what it
    /// may hold). A job that goes on keeps the token as its next input.
    pub fn take_token(&mut self, model: &LlamaModel, token: LlamaToken, cells: usize, n_ctx_seq: usize) -> Option<FinishReason> {
        let vocab = model.vocab();
        self.usage.completion_tokens += 1;
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
        }
        let _ = self.events.send(GenerationEvent::Tokens(self.usage.completion_tokens));
        if vocab.is_eog(token) {
            return Some(FinishReason::Stop);
        }
        let piece = vocab.token_to_piece(token, true, None);
        let decoded = self.decoder.push(&piece);
        if !decoded.text.is_empty() {
            self.text.push_str(&decoded.text);
            let _ = self.events.send(GenerationEvent::Text(decoded.text));
        }
        if decoded.stopped {
            Some(FinishReason::Stop)
        } else if self.usage.completion_tokens as usize >= self.max_tokens || cells >= n_ctx_seq {
            Some(FinishReason::Length)
        } else {
            self.pending = Some(token);
            None
        }
    }

    /// End the job: what the detokeniser held back goes out, then `Done`.
    pub fn finish(mut self, reason: FinishReason) {
        let tail = self.decoder.finish();
        if !tail.is_empty() {
            self.text.push_str(&tail);
            let _ = self.events.send(GenerationEvent::Text(tail));
        }
        let stop_sequence = self.decoder.stopped_by().filter(|s| self.stop.iter().any(|own| own == s)).map(str::to_string);
        let timings = Timings::of(self.admitted, self.started_at, self.first_token_at, Instant::now(), &self.usage);
        let completion = Completion {
            text: self.text,
            finish_reason: reason,
            stop_sequence,
            usage: self.usage,
            truncated: self.truncated,
            timings,
            logprobs: self.logprobs.map(|(_, l)| l),
        };
        if reason != FinishReason::Cancelled {
            tracing::info!(
                prompt_tokens = completion.usage.prompt_tokens,
                cached_tokens = completion.usage.cached_tokens,
                completion_tokens = completion.usage.completion_tokens,
                draft_tokens = completion.usage.draft_tokens,
                accepted_tokens = completion.usage.accepted_tokens,
                finish_reason = ?completion.finish_reason,
                ttft_ms = format!("{:.0}", timings.time_to_first_token_ms),
                reply_tps = format!("{:.1}", timings.reply_tokens_per_s),
                "generation finished"
            );
        }
        let _ = self.events.send(GenerationEvent::Done(completion));
    }

    /// Note the log-probability of `token` under `logits` (and the top
    /// alternatives), when the request asked for them.
    pub fn note_logprob(&mut self, model: &LlamaModel, logits: &[f32], token: LlamaToken) {
        let Some((top, list)) = self.logprobs.as_mut() else { return };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_z = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
        let piece = |t: LlamaToken| model.vocab().token_to_piece(t, true, None);
        let entry = |t: LlamaToken| {
            let bytes = piece(t);
            (String::from_utf8_lossy(&bytes).into_owned(), logits.get(t.0 as usize).map_or(f32::NEG_INFINITY, |&l| l - log_z), bytes)
        };
        let mut ids: Vec<usize> = (0..logits.len()).collect();
        let n = (*top).min(ids.len());
        if n > 0 && n < ids.len() {
            ids.select_nth_unstable_by(n - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        }
        ids.truncate(n);
        ids.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let (token_text, logprob, bytes) = entry(token);
        let top_logprobs = ids
            .into_iter()
            .map(|id| {
                let (token, logprob, bytes) = entry(LlamaToken(id as i32));
                TopLogprob { token, logprob, bytes }
            })
            .collect();
        list.push(TokenLogprob { token: token_text, logprob, bytes, top_logprobs });
    }

    /// End the job with an error.
    pub fn fail(self, error: EngineError) {
        let _ = self.events.send(GenerationEvent::Failed(error));
    }
}
