//! Speculative decoding from the text itself (prompt-lookup decoding): for a
//! generating slot, the longest recent suffix of its tokens (prompt plus
//! reply) that occurred earlier, in the request's predicted output or in
//! those tokens, proposes the tokens that followed it as a draft. The step
//! decodes `[last, d1..dk]` at once and samples each position in order with
//! the job's own sampler (and grammar), keeping drafts up to the first
//! mismatch (see `step`): the reply is what one-token decoding would write,
//! up to the rounding of batched arithmetic at near-ties.
//!
//! It pays only when acceptance is high enough for what a wider step costs
//! on this machine, so [`Drafts`] keeps the acceptance seen per draft
//! source, match length and streak: whether the slot's last [`STREAK`]
//! tokens were what the lookup proposed, drafted or not. Inside a copied run
//! the next draft nearly always holds, while drafts in free text mostly
//! fail; pooled, the copies' acceptance would be diluted and their drafts
//! cut short or never tried. [`Drafts::choose`] takes the draft length with
//! the best expected tokens per millisecond from the planner's cost curve,
//! or none when no length beats one token a step by a margin. Free chat,
//! where drafts rarely hold, stays at one token a step.

use llama_cpp_2::token::LlamaToken;

/// Longest and shortest suffix looked up.
const MAX_NGRAM: usize = 6;
const MIN_NGRAM: usize = 2;
/// Longest draft one slot proposes in a step: with its pending token, 16
/// rows, where a CPU step is cheapest per row (ggml's kernels take columns
/// in fours and read the weights once per pass; on this project's 2-core
/// machine, Qwen2.5-0.5B, a step with logits on 4 rows costs 2.45x one
/// row, 8 rows 3.96x, 12 rows 4.98x, 16 rows 5.87x): inside a copied run
/// a long draft pays most.
pub(super) const MAX_DRAFT: usize = 15;
/// How far back in a slot's tokens a match is looked for.
pub(super) const LOOKBACK: usize = 8192;
/// Speculate only for a gain of at least this (the cost curve is an estimate).
const MARGIN: f64 = 1.08;
/// Acceptance assumed before anything was seen, outside a copied run and
/// inside one (optimistic enough to try). A copy of the input or of the
/// predicted output goes on: its drafts held 95 % of the time in the
/// bench's grounded edit, so a fresh server's first copied reply drafts
/// long from its start, where a neutral prior would spend the copy learning
/// what copies are. A reply repeating itself is free text: its drafts
/// prove out first.
const PRIOR_ACCEPTANCE: [f64; 2] = [0.6, 0.9];
/// Weight of the prior, in draft positions.
const PRIOR_WEIGHT: f64 = 8.0;
/// Old observations fade: counts are multiplied by this on each new one.
const FORGET: f64 = 0.995;
/// One choice in this many tries a draft a token longer than the best.
const EXPLORE_EVERY: u64 = 16;
/// A slot whose last this many sampled tokens were what the lookup
/// proposed is copying: its drafts are judged by copies' acceptance.
pub(super) const STREAK: u32 = 2;

/// When drafts are decoded (`model.speculative`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Speculation {
    /// Never.
    Off,
    /// When a draft is expected to pay on this machine.
    Auto,
    /// Whenever one is found, whatever it costs (for tests and
    /// measurements: the drafts then depend on the text alone).
    Always,
}

/// Where a draft came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// The request's predicted output.
    Prediction,
    /// The request's input (its prompt): a reply grounded in it copies it.
    Input,
    /// The reply so far: free text repeating itself (a refrain, a loop),
    /// which holds far less often than a copy of the input.
    Reply,
}

/// A proposed continuation.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Draft {
    pub tokens: Vec<LlamaToken>,
    pub source: Source,
    /// Length of the suffix that matched.
    pub ngram: usize,
    /// The slot's last [`STREAK`] tokens were the lookup's proposals (a
    /// copied run goes on); set by the caller.
    pub streak: bool,
}

/// Look up a draft continuing `history` (a slot's cells and its pending
/// token, of which the first `input` are the request's input): the
/// predicted output first, then the history itself.
pub(super) fn lookup(history: &[LlamaToken], input: usize, prediction: &[LlamaToken], max: usize) -> Option<Draft> {
    if max == 0 || history.len() < MIN_NGRAM {
        return None;
    }
    for n in (MIN_NGRAM..=MAX_NGRAM.min(history.len())).rev() {
        let suffix = &history[history.len() - n..];
        if let Some((_, tokens)) = continuation(prediction, suffix, prediction.len(), max) {
            return Some(Draft { tokens, source: Source::Prediction, ngram: n, streak: false });
        }
        // In the history, an earlier occurrence (not the suffix itself).
        let from = history.len().saturating_sub(LOOKBACK);
        if let Some((at, tokens)) = continuation(&history[from..], suffix, history.len() - from - 1, max) {
            let source = if from + at < input { Source::Input } else { Source::Reply };
            return Some(Draft { tokens, source, ngram: n, streak: false });
        }
    }
    None
}

/// Where the tokens after the most recent occurrence of `needle` in `hay`
/// that ends before `limit` and has at least one token after it start,
/// and those tokens.
fn continuation(hay: &[LlamaToken], needle: &[LlamaToken], limit: usize, max: usize) -> Option<(usize, Vec<LlamaToken>)> {
    let n = needle.len();
    let last_end = limit.min(hay.len().saturating_sub(1));
    (n..=last_end).rev().find(|&end| hay[end - n..end] == *needle).map(|end| (end, hay[end..(end + max).min(hay.len())].to_vec()))
}

/// Acceptance seen so far, per source, streak and match length.
#[derive(Debug, Clone)]
pub(super) struct Drafts {
    /// (accepted, reached) draft positions, decayed, by [source][streak][ngram].
    seen: [[[(f64, f64); MAX_NGRAM + 1]; 2]; 3],
    /// Draft lengths chosen so far (for exploring).
    choices: u64,
}

impl Default for Drafts {
    fn default() -> Self {
        Drafts { seen: [[[(0.0, 0.0); MAX_NGRAM + 1]; 2]; 3], choices: 0 }
    }
}

impl Drafts {
    fn bucket(&mut self, draft: &Draft) -> &mut (f64, f64) {
        &mut self.seen[draft.source as usize][usize::from(draft.streak)][draft.ngram.min(MAX_NGRAM)]
    }

    /// The chance that a position of a draft like `draft` is accepted once
    /// the one before it was.
    pub fn acceptance(&self, draft: &Draft) -> f64 {
        let (accepted, reached) = self.seen[draft.source as usize][usize::from(draft.streak)][draft.ngram.min(MAX_NGRAM)];
        let copy = draft.streak && draft.source != Source::Reply;
        let prior = PRIOR_ACCEPTANCE[usize::from(copy)];
        (accepted + prior * PRIOR_WEIGHT) / (reached + PRIOR_WEIGHT)
    }

    /// `draft` was verified: the first `accepted` of its `drafted` tokens held.
    pub fn observe(&mut self, draft: &Draft, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        for b in self.seen.iter_mut().flatten().flatten() {
            b.0 *= FORGET;
            b.1 *= FORGET;
        }
        // Positions reached: every accepted one, and the first rejected.
        let reached = accepted + usize::from(accepted < drafted);
        let b = self.bucket(draft);
        b.0 += accepted as f64;
        b.1 += reached as f64;
    }

    /// How many of `draft`'s tokens to decode, given `cost(rows)`: the
    /// milliseconds of a step of that many rows with logits (None: unknown),
    /// and `base` rows the step has without this draft. 0: do not speculate.
    /// Now and then ([`EXPLORE_EVERY`] choices) one token more than the best
    /// is taken, so the cost of a wider step is measured, not only guessed.
    pub fn choose(&mut self, draft: &Draft, base: usize, cost: impl Fn(usize) -> Option<f64>) -> usize {
        let best = self.best(draft, base, cost);
        self.choices += 1;
        if best > 0 && self.choices % EXPLORE_EVERY == 0 {
            return (best + 1).min(draft.tokens.len()).min(MAX_DRAFT);
        }
        best
    }

    fn best(&self, draft: &Draft, base: usize, cost: impl Fn(usize) -> Option<f64>) -> usize {
        let a = self.acceptance(draft);
        let Some(alone) = cost(base) else { return 0 };
        let (mut best, mut best_gain) = (0, MARGIN);
        let mut expected = 0.0;
        let mut reach = 1.0;
        for k in 1..=draft.tokens.len().min(MAX_DRAFT) {
            reach *= a;
            expected += reach;
            let Some(wide) = cost(base + k) else { break };
            let gain = (1.0 + expected) * alone / wide;
            if gain > best_gain {
                (best, best_gain) = (k, gain);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ids: &[i32]) -> Vec<LlamaToken> {
        ids.iter().map(|&i| LlamaToken(i)).collect()
    }

    /// Milliseconds of a step of `rows` rows on a measured curve of (rows,
    /// ms) points: between two of them, on the line through them; past the
    /// last, on the line through the last two.
    fn curve(points: &[(usize, f64)], rows: usize) -> Option<f64> {
        let i = points.iter().position(|&(n, _)| n >= rows).unwrap_or(points.len() - 1).max(1);
        let ((r0, c0), (r1, c1)) = (points[i - 1], points[i]);
        Some(c0 + (c1 - c0) * (rows as f64 - r0 as f64) / (r1 - r0) as f64)
    }

    #[test]
    fn the_longest_recent_suffix_proposes_what_followed_it() {
        // ... 1 2 3 4 5 ... 9 1 2 3 -> 4 5 9 1 2 3 (the most recent occurrence wins).
        let history = t(&[7, 1, 2, 3, 4, 5, 9, 1, 2, 3]);
        let d = lookup(&history, 6, &[], 4).unwrap();
        assert_eq!((d.tokens, d.source, d.ngram), (t(&[4, 5, 9, 1]), Source::Input, 3));
        // Found after the input: the reply repeats itself.
        assert_eq!(lookup(&history, 4, &[], 4).unwrap().source, Source::Reply);
        assert_eq!(lookup(&history, 5, &[], 4).unwrap().source, Source::Input);
        // The prediction goes first, and a draft never runs past what is known.
        let d = lookup(&history, 6, &t(&[0, 1, 2, 3, 8, 8]), 4).unwrap();
        assert_eq!((d.tokens, d.source, d.ngram), (t(&[8, 8]), Source::Prediction, 3));
        assert_eq!(lookup(&t(&[1, 2, 3, 4]), 4, &[], 4), None, "nothing repeats");
        assert_eq!(lookup(&t(&[5, 5]), 2, &[], 4).map(|d| d.tokens), None, "a suffix needs an earlier occurrence with a token after it");
        assert_eq!(lookup(&t(&[5, 5, 5]), 3, &[], 4).map(|d| d.tokens), Some(t(&[5])));
    }

    #[test]
    fn drafts_are_taken_only_when_they_pay() {
        let draft = Draft { tokens: t(&[1; 12]), source: Source::Input, ngram: 4, streak: false };
        // A CPU: a step of r rows with logits costs 38 (1 + 0.4 (r - 1)) ms.
        let cpu = |r: usize| Some(38.0 * (1.0 + 0.4 * (r as f64 - 1.0)));
        let mut d = Drafts::default();
        for _ in 0..200 {
            d.observe(&draft, 8, 8);
        }
        assert!(d.acceptance(&draft) > 0.95);
        assert!(d.choose(&draft, 1, cpu) >= 4, "near-certain drafts pay for a wide step");
        for _ in 0..1000 {
            d.observe(&draft, 4, 1);
        }
        assert!((d.acceptance(&draft) - 0.5).abs() < 0.05);
        assert_eq!(d.choose(&draft, 1, cpu), 0, "drafts that hold half the time are not worth a wider step here");
        // On hardware where width is nearly free, they are.
        let gpu = |r: usize| Some(10.0 + 0.05 * r as f64);
        assert!(d.choose(&draft, 1, gpu) >= 1);
        assert_eq!(Drafts::default().choose(&draft, 1, |_| None), 0, "unknown cost: no speculation");
        // Copies apart from free text: drafts that mostly fail elsewhere
        // still go long inside a copied run (the batch curve measured on
        // this project's machine: 2 rows 2.27x one, 4 rows 2.34x, 8 4.52x,
        // 16 7.33x).
        let measured = |r: usize| curve(&[(1, 37.0), (2, 84.0), (4, 86.6), (8, 167.2), (16, 271.2)], r);
        let streak = Draft { streak: true, ..draft.clone() };
        let mut d = Drafts::default();
        for _ in 0..300 {
            d.observe(&draft, 4, 1);
            d.observe(&streak, 12, 12);
        }
        assert_eq!(d.choose(&draft, 1, measured), 0, "free text: no draft");
        assert!(d.choose(&streak, 1, measured) >= 8, "a copy: long drafts");
        // A fresh server's first copy of its input drafts from its start (on
        // the curve measured there with the weights widened: 16 rows with
        // logits 5.87x one); free text, and a reply repeating itself, wait
        // for their drafts to prove out.
        let widened =
            |r: usize| curve(&[(1, 22.8), (2, 41.0), (3, 48.9), (4, 55.9), (5, 75.3), (6, 84.3), (8, 90.2), (12, 113.6), (16, 133.9)], r);
        let long = Draft { tokens: t(&[1; MAX_DRAFT]), ..streak.clone() };
        assert!(Drafts::default().choose(&long, 1, widened) >= 3);
        assert_eq!(Drafts::default().choose(&Draft { streak: false, ..long.clone() }, 1, widened), 0);
        let refrain = Draft { source: Source::Reply, ..long.clone() };
        assert_eq!(Drafts::default().choose(&refrain, 1, widened), 0, "a reply repeating itself is free text");
        let mut d = Drafts::default();
        for _ in 0..100 {
            d.observe(&long, MAX_DRAFT, MAX_DRAFT);
        }
        assert_eq!(d.choose(&long, 1, widened), MAX_DRAFT, "a copy that holds: the widest draft");
        // Now and then one token longer, to measure the wider step.
        let mut d = Drafts::default();
        let picks: Vec<usize> = (0..EXPLORE_EVERY).map(|_| d.choose(&draft, 1, cpu)).collect();
        assert_eq!(picks[picks.len() - 1], picks[0] + 1, "{picks:?}");
    }
}
