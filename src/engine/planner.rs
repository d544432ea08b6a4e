//! How much one decode step may carry: the prompt chunk adapts to the
//! measured cost of a step so that a step stays near `max_step_ms`.

/// Smallest and largest prompt chunk one step may decode.
pub(super) const MIN_CHUNK: usize = 8;
pub(super) const MAX_CHUNK: usize = 128;
/// Rows one batch may hold (a chunk plus one token per generating slot),
/// and rows llama.cpp computes at once.
pub(super) const MAX_BATCH: usize = MAX_CHUNK + 64;
pub(super) const MAX_UBATCH: usize = MAX_CHUNK;
/// Steps are planned at this share of `max_step_ms`: the estimate lags, and
/// later prompt tokens cost more than earlier ones (attention grows).
const STEP_HEADROOM: f64 = 0.8;

/// Adapts the prompt chunk to the measured cost of a token.
pub(super) struct StepBudget {
    target_ms: f64,
    /// Moving average of milliseconds per batch token.
    ms_per_token: f64,
}

impl StepBudget {
    pub fn new(max_step_ms: u32) -> StepBudget {
        StepBudget { target_ms: max_step_ms as f64 * STEP_HEADROOM, ms_per_token: 2.0 }
    }

    /// Batch tokens one step may hold.
    pub fn tokens(&self) -> usize {
        ((self.target_ms / self.ms_per_token) as usize).clamp(MIN_CHUNK, MAX_CHUNK)
    }

    /// A step of `tokens` rows took `elapsed_ms`.
    pub fn observe(&mut self, tokens: usize, elapsed_ms: f64) {
        if tokens >= 4 && elapsed_ms.is_finite() && elapsed_ms > 0.0 {
            let sample = elapsed_ms / tokens as f64;
            self.ms_per_token = 0.7 * self.ms_per_token + 0.3 * sample;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_budget_adapts_to_measured_speed() {
        let mut b = StepBudget { target_ms: 50.0, ms_per_token: 2.0 };
        assert_eq!(b.tokens(), 25);
        for _ in 0..50 {
            b.observe(100, 50.0); // 0.5 ms a token
        }
        assert!((95..=100).contains(&b.tokens()), "{}", b.tokens());
        for _ in 0..50 {
            b.observe(10, 1000.0);
        }
        assert_eq!(b.tokens(), MIN_CHUNK);
    }
}
