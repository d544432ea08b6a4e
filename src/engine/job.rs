//! [`Job`]: one queued or running generation: the tokens its slot must
//! hold, its sampler and detokeniser, what it has written, and the channel
//! its events go out on. A job ends exactly once, with `Done` or `Failed`.

use std::time::Instant;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::request::{Completion, EngineError, FinishReason, GenerationEvent, Interest, Usage};
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
        let completion = Completion { text: self.text, finish_reason: reason, usage: self.usage, truncated: self.truncated };
        if reason != FinishReason::Cancelled {
            tracing::info!(
                prompt_tokens = completion.usage.prompt_tokens,
                cached_tokens = completion.usage.cached_tokens,
                completion_tokens = completion.usage.completion_tokens,
                finish_reason = ?completion.finish_reason,
                "generation finished"
            );
        }
        let _ = self.events.send(GenerationEvent::Done(completion));
    }

    /// End the job with an error.
    pub fn fail(self, error: EngineError) {
        let _ = self.events.send(GenerationEvent::Failed(error));
    }
}
