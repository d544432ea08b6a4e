//! [`JobSampler`]: one generation's sampler chain and, for a constrained
//! reply, its grammar with the fallback that keeps grammar checking cheap.

use std::collections::VecDeque;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

use super::request::{EngineError, Grammar, SamplingParams};

/// Tokens a penalty sampler looks back over.
const PENALTY_LAST_N: i32 = 64;
/// Candidates the grammar checks at once when the sampled token was
/// rejected. llama.cpp decodes every candidate's text and, per grammar
/// level, reserves vectors the size of the whole array: over a 262k-token
/// vocabulary that was >100 MiB of temporaries the allocator then kept.
/// In chunks, best logits first, it is a few MiB, and usually one chunk.
const GRAMMAR_CHUNK: usize = 4096;

/// Samples one generation's tokens.
pub(super) struct JobSampler {
    chain: LlamaSampler,
    /// Repetition penalties, applied before the chain (None: all neutral).
    penalties: Option<Penalties>,
    /// The candidate array, kept between tokens (the vocabulary's size).
    candidates: Vec<LlamaTokenData>,
    grammar: Option<GrammarSampler>,
}

/// llama.cpp's repetition penalties, to the formula, over the last
/// [`PENALTY_LAST_N`] sampled tokens, applied to those tokens' logits
/// alone: llama.cpp's own penalty sampler looks every candidate of the
/// vocabulary up in a hash map, 0.5 ms a token over Qwen's 151,936 (2 % of
/// a decode step on this project's machine, where a peer without the
/// penalty does not pay it).
struct Penalties {
    repeat: f32,
    frequency: f32,
    presence: f32,
    recent: VecDeque<LlamaToken>,
}

impl Penalties {
    fn accept(&mut self, token: LlamaToken) {
        if self.recent.len() >= PENALTY_LAST_N as usize {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
    }

    /// `candidates` holds the whole vocabulary in token order.
    fn apply(&self, candidates: &mut [LlamaTokenData]) {
        let mut counts: Vec<(i32, u32)> = Vec::with_capacity(self.recent.len());
        for token in &self.recent {
            match counts.iter_mut().find(|(t, _)| *t == token.0) {
                Some((_, n)) => *n += 1,
                None => counts.push((token.0, 1)),
            }
        }
        for (token, count) in counts {
            let Some(c) = usize::try_from(token).ok().and_then(|i| candidates.get_mut(i)) else { continue };
            let logit = c.logit();
            let logit = if logit <= 0.0 { logit * self.repeat } else { logit / self.repeat };
            c.set_logit(logit - (count as f32 * self.frequency + self.presence));
        }
    }
}

/// Grammar-constrained sampling by rejection: the normal chain picks a token
/// and the grammar only checks it; the whole vocabulary is masked (slow with
/// a large vocabulary) only when that token is not allowed.
struct GrammarSampler {
    grammar: LlamaSampler,
    /// Picks among the grammar-allowed tokens after a rejection.
    fallback: LlamaSampler,
}

impl JobSampler {
    pub fn new(model: &LlamaModel, p: &SamplingParams, grammar: Option<&Grammar>) -> Result<JobSampler, EngineError> {
        let mut chain = Vec::new();
        let penalties = ((p.repeat_penalty - 1.0).abs() > f64::EPSILON || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0)
            .then(|| Penalties {
                repeat: p.repeat_penalty as f32,
                frequency: p.frequency_penalty as f32,
                presence: p.presence_penalty as f32,
                recent: VecDeque::with_capacity(PENALTY_LAST_N as usize),
            });
        if p.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if p.top_k > 0 {
                chain.push(LlamaSampler::top_k(p.top_k as i32));
            }
            chain.push(LlamaSampler::top_p(p.top_p as f32, 1));
            if p.min_p > 0.0 {
                chain.push(LlamaSampler::min_p(p.min_p as f32, 1));
            }
            chain.push(LlamaSampler::temp(p.temperature as f32));
            chain.push(LlamaSampler::dist(p.seed));
        }
        let grammar = match grammar {
            Some(g) => Some(GrammarSampler {
                grammar: if g.triggers.is_empty() {
                    LlamaSampler::grammar(model, &g.gbnf, "root")
                } else {
                    LlamaSampler::grammar_lazy_patterns(model, &g.gbnf, "root", &g.triggers, &[])
                }
                .map_err(|e| EngineError::Grammar(format!("llama.cpp rejected the grammar ({e})")))?,
                fallback: if p.temperature <= 0.0 {
                    LlamaSampler::greedy()
                } else {
                    LlamaSampler::chain_simple([LlamaSampler::temp(p.temperature as f32), LlamaSampler::dist(p.seed)])
                },
            }),
            None => None,
        };
        Ok(JobSampler { chain: LlamaSampler::chain_simple(chain), penalties, candidates: Vec::new(), grammar })
    }

    /// The next token from the logits at `batch_index`, accepted by the
    /// chain and the grammar. An error when no token of the vocabulary can
    /// continue the grammar (accepting one it does not allow would abort the
    /// process inside llama.cpp).
    pub fn sample(&mut self, ctx: &LlamaContext, batch_index: i32) -> Result<LlamaToken, EngineError> {
        let mut token = match self.penalties.as_mut() {
            None => self.chain.sample(ctx, batch_index),
            Some(penalties) => {
                // What llama.cpp's `llama_sampler_sample` does, with the
                // penalties applied first.
                let mut data = std::mem::take(&mut self.candidates);
                data.clear();
                let logits = ctx.get_logits_ith(batch_index);
                data.extend(logits.iter().enumerate().map(|(id, &logit)| LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0)));
                penalties.apply(&mut data);
                let mut candidates = LlamaTokenDataArray::new(data, false);
                candidates.apply_sampler(&mut self.chain);
                // The chain ends in greedy or dist, which always select.
                let token = candidates.selected_token().unwrap_or_else(|| candidates.data[0].id());
                self.candidates = candidates.data;
                self.chain.accept(token);
                penalties.accept(token);
                token
            }
        };
        if let Some(g) = self.grammar.as_mut() {
            let mut probe = LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 0.0, 0.0)], false);
            probe.apply_sampler(&mut g.grammar);
            if !probe.data[0].logit().is_finite() {
                token = grammar_fallback(ctx.get_logits_ith(batch_index), g).ok_or_else(|| {
                    EngineError::Grammar(
                        "no token of the model's vocabulary can continue the grammar-constrained reply \
                         (the grammar needs text this model cannot write)"
                            .into(),
                    )
                })?;
            }
            g.grammar.accept(token);
        }
        Ok(token)
    }
}

/// The token the grammar allows with the best chance, sampled by the job's
/// fallback among the allowed ones of the first chunk (by logit) that has
/// any; None when no token of the vocabulary is allowed.
fn grammar_fallback(logits: &[f32], g: &mut GrammarSampler) -> Option<LlamaToken> {
    let mut scratch: Vec<(f32, i32)> = logits.iter().enumerate().map(|(id, &logit)| (logit, id as i32)).collect();
    let mut rest: &mut [(f32, i32)] = &mut scratch;
    while !rest.is_empty() {
        let n = GRAMMAR_CHUNK.min(rest.len());
        if n < rest.len() {
            rest.select_nth_unstable_by(n - 1, |a, b| b.0.total_cmp(&a.0));
        }
        let (chunk, tail) = rest.split_at_mut(n);
        let data = chunk.iter().map(|&(logit, id)| LlamaTokenData::new(LlamaToken(id), logit, 0.0)).collect();
        let mut candidates = LlamaTokenDataArray::new(data, false);
        candidates.apply_sampler(&mut g.grammar);
        if candidates.data.iter().any(|d| d.logit().is_finite()) {
            candidates.apply_sampler(&mut g.fallback);
            return candidates.selected_token();
        }
        rest = tail;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(logits: &[f32]) -> Vec<LlamaTokenData> {
        logits.iter().enumerate().map(|(id, &l)| LlamaTokenData::new(LlamaToken(id as i32), l, 0.0)).collect()
    }

    #[test]
    fn penalties_follow_llama_cpp_over_the_last_n_sampled_tokens() {
        let mut p = Penalties { repeat: 2.0, frequency: 0.5, presence: 0.25, recent: VecDeque::new() };
        // Token 0 falls out of the window: only the last PENALTY_LAST_N count.
        p.accept(LlamaToken(0));
        for _ in 0..PENALTY_LAST_N - 3 {
            p.accept(LlamaToken(4));
        }
        for t in [1, 2, 2] {
            p.accept(LlamaToken(t));
        }
        let mut data = vocab(&[3.0, 3.0, -3.0, 1.0, 0.0]);
        p.apply(&mut data);
        let got: Vec<f32> = data.iter().map(LlamaTokenData::logit).collect();
        let n4 = (PENALTY_LAST_N - 3) as f32;
        // Positive logits are divided, the rest multiplied; then
        // count x frequency + presence is taken off.
        assert_eq!(got, vec![3.0, 3.0 / 2.0 - 0.75, -3.0 * 2.0 - 1.25, 1.0, 0.0 - (n4 * 0.5 + 0.25)]);
    }
}
