//! [`Admission`]: the step that turns a [`GenerationRequest`] into a
//! [`Job`]: the conversation rendered (the model's [`Renderer`]), tokenised
//! (special tokens parsed in template text only), checked against the
//! context (or truncated, oldest turns first), and given its sampler.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::prompt::{Message, Renderer, Segment};

use super::job::Job;
use super::request::{EngineError, GenerationEvent, GenerationRequest, Usage};
use super::sampler::JobSampler;
use super::text::TextDecoder;

pub(super) struct Admission {
    model: &'static LlamaModel,
    pub renderer: Renderer,
    /// Tokens one sequence may hold.
    n_ctx_seq: usize,
    /// Longest byte length of any token: bounds how few tokens a text can be.
    max_token_bytes: usize,
    /// Drop old turns instead of refusing a prompt that does not fit.
    truncate_overflow: bool,
    /// Speculative decoding is available on this engine.
    speculative: bool,
    next_id: u64,
}

impl Admission {
    pub fn new(model: &'static LlamaModel, renderer: Renderer, n_ctx_seq: usize, truncate_overflow: bool, speculative: bool) -> Admission {
        let vocab = model.vocab();
        let max_token_bytes = vocab.tokens().map(|t| vocab.token_to_piece(t, true, None).len()).max().unwrap_or(64).max(1);
        Admission { model, renderer, n_ctx_seq, max_token_bytes, truncate_overflow, speculative, next_id: 0 }
    }

    /// Render, tokenise and check a request; build its sampler.
    pub fn admit(
        &mut self,
        request: GenerationRequest,
        events: mpsc::UnboundedSender<GenerationEvent>,
        cancel: CancellationToken,
    ) -> Result<Job, EngineError> {
        let limit = self.n_ctx_seq.saturating_sub(1);
        let mut messages = request.messages;
        let mut truncated = false;
        let raw = request.text.is_some();
        let prompt = loop {
            if let Some(text) = &request.text {
                // Raw text, as a completion takes it: never cut.
                let tokens = self.tokenize(&[Segment { text: text.clone(), special: true }]);
                if tokens.len() > limit {
                    return Err(EngineError::PromptTooLong { prompt: tokens.len(), limit, context: self.n_ctx_seq as u32 });
                }
                break tokens;
            }
            let segments = self.render(&messages, request.tools.as_deref())?;
            let text_len: usize = segments.iter().map(|s| s.text.len()).sum();
            // A text longer than this cannot fit, whatever its tokens: refuse
            // it before spending time tokenising megabytes.
            let too_long_for_sure = text_len > limit.saturating_mul(self.max_token_bytes);
            let tokens = if too_long_for_sure { None } else { Some(self.tokenize(&segments)) };
            match tokens {
                Some(tokens) if tokens.len() <= limit => break tokens,
                _ if self.truncate_overflow && droppable(&messages).is_some() => {
                    // Drop, in one cut, the oldest turns that hold the
                    // excess, each measured once (not one turn per render
                    // and tokenisation of the whole conversation). Usually
                    // one more render then fits; at worst a second cut,
                    // with the markup's share then known, does.
                    let total = tokens.as_ref().map(Vec::len);
                    let cut = self.turns_covering(&messages, limit, total);
                    if let Some(first) = droppable(&messages) {
                        // Never the last message.
                        messages.drain(first..(first + cut).min(messages.len() - 1));
                    }
                    truncated = true;
                }
                tokens => {
                    let prompt = tokens.map(|t| t.len()).unwrap_or(text_len / self.max_token_bytes);
                    return Err(EngineError::PromptTooLong { prompt, limit, context: self.n_ctx_seq as u32 });
                }
            }
        };
        let sampler = JobSampler::new(self.model, &request.sampling, request.grammar.as_ref())?;
        let prediction = match (&request.prediction, request.speculative && self.speculative) {
            (Some(text), true) => self.model.vocab().tokenize(text.as_bytes(), false, false),
            _ => Vec::new(),
        };
        let id = self.next_id;
        self.next_id += 1;
        Ok(Job {
            id,
            usage: Usage { prompt_tokens: prompt.len() as u32, ..Usage::default() },
            prompt_len: prompt.len(),
            prompt,
            started: false,
            interest: request.interest,
            max_tokens: request.max_tokens.max(1) as usize,
            speculative: request.speculative && self.speculative,
            prediction,
            proposed: None,
            copying: 0,
            sampler,
            // A raw prompt has no template, so no turn markers to stop at.
            decoder: TextDecoder::new(self.renderer.stops().iter().filter(|_| !raw).chain(&request.stop).cloned().collect()),
            pending: None,
            text: String::new(),
            truncated,
            events,
            cancel,
            stop: request.stop,
            logprobs: request.logprobs.map(|top| (top, Vec::new())),
            admitted: std::time::Instant::now(),
            started_at: None,
            first_token_at: None,
        })
    }

    /// The prompt as segments (see [`Renderer::render`]).
    pub fn render(&self, messages: &[Message], tools: Option<&[serde_json::Value]>) -> Result<Vec<Segment>, EngineError> {
        self.renderer.render(messages, tools).map_err(EngineError::Template)
    }

    /// Tokenise a prompt: special-token strings are parsed in the
    /// template's segments only; BOS (when the model wants one) first.
    pub fn tokenize(&self, segments: &[Segment]) -> Vec<LlamaToken> {
        let vocab = self.model.vocab();
        let mut tokens = Vec::new();
        for (i, segment) in segments.iter().enumerate() {
            tokens.extend(vocab.tokenize(segment.text.as_bytes(), i == 0, segment.special));
        }
        // A template that writes the BOS text itself would double it.
        if tokens.len() >= 2 && tokens[0] == vocab.bos() && tokens[1] == vocab.bos() {
            tokens.remove(0);
        }
        tokens
    }

    /// How many of the oldest droppable messages to drop so the prompt fits
    /// in `limit` tokens. Each message's text is tokenised once; the
    /// template's markup is shared out evenly from the whole prompt's `total`
    /// tokens when known (else guessed, for a prompt too long to tokenise).
    fn turns_covering(&self, messages: &[Message], limit: usize, total: Option<usize>) -> usize {
        const GUESSED_MARKUP_TOKENS: usize = 6;
        let Some(first) = droppable(messages) else { return 0 };
        let vocab = self.model.vocab();
        let sizes: Vec<usize> = messages.iter().map(|m| vocab.tokenize(m.content.as_bytes(), false, false).len()).collect();
        let text_tokens: usize = sizes.iter().sum();
        let markup = match total {
            Some(total) => total.saturating_sub(text_tokens).div_ceil(messages.len().max(1)),
            None => GUESSED_MARKUP_TOKENS,
        };
        let mut estimate = total.unwrap_or(text_tokens + markup * messages.len());
        let mut count = 0;
        for size in &sizes[first..messages.len() - 1] {
            if estimate <= limit {
                break;
            }
            estimate = estimate.saturating_sub(size + markup);
            count += 1;
        }
        count.max(1)
    }
}

/// Index of the oldest message that truncation may drop: not a leading
/// system message, not the last message.
fn droppable(messages: &[Message]) -> Option<usize> {
    let first = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    (first + 1 < messages.len()).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str) -> Message {
        Message::new(role, "x")
    }

    #[test]
    fn truncation_keeps_system_and_last_message() {
        assert_eq!(droppable(&[msg("system"), msg("user"), msg("assistant"), msg("user")]), Some(1));
        assert_eq!(droppable(&[msg("user"), msg("assistant"), msg("user")]), Some(0));
        assert_eq!(droppable(&[msg("system"), msg("user")]), None);
        assert_eq!(droppable(&[msg("user")]), None);
    }
}
