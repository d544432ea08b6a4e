//! [`StepPlanner`]: how many prompt rows one decode step carries, from what
//! steps really cost on this machine and model.
//!
//! A step's cost is far from linear in its rows: the weights (and, per row
//! with logits, the output layer) are read once per step, and the CPU
//! kernels prefer some row counts (measured here on Qwen2.5-0.5B, 2 threads:
//! 1 row 37 ms, 2 rows 41, 4 rows 55, 8 rows 87, 16 rows 130, 128 rows 770).
//! So the planner learns the cost of a step by its row count from the steps
//! it observes (a moving average per count; between known counts it
//! interpolates, beyond them it extrapolates at the per-row slope), and
//! plans by what is waiting:
//! - **cadence**: when a token somebody reads waits on the step (an
//!   attended generation), the prompt rows are as many as keep the step
//!   within `max_step_ms`, or, where one step of the generating rows alone
//!   already costs more, within [`CADENCE_MULTIPLE`] of it; and on average
//!   the prompt adds at most [`CADENCE_SLACK`] of the generating rows' own
//!   time (a credit each step earns and prompt rows spend), so a stream
//!   keeps at least 1 / (1 + slack) of its pace even where one more row
//!   costs more than that (a long context on a CPU): then some steps carry
//!   no prompt row at all;
//! - **throughput**: when only prompts are being read, the largest chunk
//!   ([`MAX_CHUNK`]) whose step stays within [`THROUGHPUT_STEP_MS`] (or two
//!   `max_step_ms`, when that is longer). Requests are answered in the
//!   middle of such a step (between its graph nodes), so a long step costs
//!   nobody an answer.

/// Most prompt rows one step may decode (llama.cpp computes them at once:
/// the context's micro-batch).
pub(super) const MAX_CHUNK: usize = 128;
/// Rows one batch may hold: a chunk plus the generating slots' tokens and
/// their drafts.
pub(super) const MAX_BATCH: usize = MAX_CHUNK + 64;
pub(super) const MAX_UBATCH: usize = MAX_CHUNK;
/// A step of the generating rows alone may grow by this factor to carry
/// prompt rows, where `max_step_ms` is below what one step costs anyway.
pub(super) const CADENCE_MULTIPLE: f64 = 1.25;
/// Beside generating rows somebody reads, the prompt may take on average
/// this share of their own step time: their pace stays at 1 / (1 + it).
pub(super) const CADENCE_SLACK: f64 = 0.2;
/// The prompt's unspent share is kept up to this many generating steps' time.
const CREDIT_CAP: f64 = 4.0;
/// Longest step planned when only prompts are read (a soft bound: requests
/// are answered inside it; it bounds how long a new job waits to start).
pub(super) const THROUGHPUT_STEP_MS: f64 = 1000.0;
/// Weight of a new observation in a row count's moving average.
const LEARNING_RATE: f64 = 0.3;
/// The first observations of a row count keep their minimum (warm-up).
const WARM_UP_STEPS: u32 = 3;
/// Before a wider step with logits on every row was seen, each row beyond
/// the first is assumed to cost this share of a one-row step (what a CPU
/// shows; a GPU's real, smaller cost is learned at the first draft).
const LOGIT_ROW_PRIOR: f64 = 0.3;

/// What a step is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Somebody reads the tokens this step produces: keep their pace.
    Cadence,
    /// Only prompts are read: as many rows as pay.
    Throughput,
}

pub(super) struct StepPlanner {
    max_step_ms: f64,
    /// Learned milliseconds of a step by its rows (index = rows), for steps
    /// that read prompt rows (logits on a few rows); None: not seen yet.
    cost: Vec<Option<f64>>,
    /// The same for steps whose every row has logits (decoding, drafts).
    logit_cost: Vec<Option<f64>>,
    /// Observations so far per row count (prompt curve, logit curve): the
    /// first few keep their minimum, since a batch shape's first step also
    /// pays for laying out its graph.
    seen: Vec<(u32, u32)>,
    /// Requests are answered between a step's graph nodes (else a long step
    /// holds them up, and throughput steps stay near `max_step_ms`).
    interleaved: bool,
    /// Milliseconds the prompt may still add to cadence steps (see
    /// [`CADENCE_SLACK`]).
    credit: f64,
}

impl StepPlanner {
    pub fn new(max_step_ms: u32, interleaved: bool) -> StepPlanner {
        StepPlanner {
            max_step_ms: max_step_ms as f64,
            cost: vec![None; MAX_BATCH + 1],
            logit_cost: vec![None; MAX_BATCH + 1],
            seen: vec![(0, 0); MAX_BATCH + 1],
            interleaved,
            credit: 0.0,
        }
    }

    /// A step of `rows` rows took `elapsed_ms`; `all_logits`: every row had
    /// logits (no prompt rows).
    pub fn observe(&mut self, rows: usize, elapsed_ms: f64, all_logits: bool) {
        if rows == 0 || rows > MAX_BATCH || !elapsed_ms.is_finite() || elapsed_ms <= 0.0 {
            return;
        }
        let (curve, seen) = if all_logits {
            (&mut self.logit_cost, &mut self.seen[rows].1)
        } else {
            (&mut self.cost, &mut self.seen[rows].0)
        };
        *seen += 1;
        let slot = &mut curve[rows];
        *slot = Some(match *slot {
            Some(min) if *seen <= WARM_UP_STEPS => min.min(elapsed_ms),
            Some(avg) => (1.0 - LEARNING_RATE) * avg + LEARNING_RATE * elapsed_ms,
            None => elapsed_ms,
        });
    }

    /// The expected milliseconds of a step of `rows` rows that reads prompt
    /// rows; None before any step was seen. A one-row decode step anchors
    /// the curve from below.
    pub fn predict(&self, rows: usize) -> Option<f64> {
        let mut curve = self.cost.clone();
        if curve[1].is_none() {
            curve[1] = self.logit_cost[1];
        }
        estimate(&curve, rows, None)
    }

    /// The expected milliseconds of a step of `rows` rows that all have
    /// logits (decoding with drafts); None before any decode step.
    pub fn predict_logits(&self, rows: usize) -> Option<f64> {
        estimate(&self.logit_cost, rows, Some(LOGIT_ROW_PRIOR))
    }
}

/// A curve's value at `rows`: known, interpolated between the nearest known
/// counts, or extrapolated at the per-row slope of the last two (or, from
/// one point, at `prior` of it per row when given, else proportionally).
fn estimate(cost: &[Option<f64>], rows: usize, prior: Option<f64>) -> Option<f64> {
    let rows = rows.clamp(1, MAX_BATCH);
    if let Some(known) = cost[rows] {
        return Some(known);
    }
    {
        let below = (1..rows).rev().find_map(|r| cost[r].map(|c| (r, c)));
        let above = (rows + 1..=MAX_BATCH).find_map(|r| cost[r].map(|c| (r, c)));
        match (below, above) {
            (Some((r0, c0)), Some((r1, c1))) => Some(c0 + (c1 - c0) * (rows - r0) as f64 / (r1 - r0) as f64),
            // Beyond the largest known count: its per-row slope from the
            // next known one below, else proportional (pessimistic).
            (Some((r0, c0)), None) => {
                let slope = (1..r0)
                    .rev()
                    .find_map(|r| cost[r].map(|c| (c0 - c) / (r0 - r) as f64))
                    .filter(|s| *s > 0.0)
                    .unwrap_or(match prior {
                        Some(share) => share * c0 / r0 as f64,
                        None => c0 / r0 as f64,
                    });
                Some(c0 + slope * (rows - r0) as f64)
            }
            // Below the smallest known count: proportional to it (a step is
            // never cheaper than that share).
            (None, Some((r1, c1))) => Some(c1 * rows as f64 / r1 as f64),
            (None, None) => None,
        }
    }
}

impl StepPlanner {
    /// Prompt rows the next step may carry beside `generating` rows, in `mode`.
    pub fn prompt_rows(&mut self, mode: Mode, generating: usize) -> usize {
        let room = MAX_BATCH - generating.min(MAX_BATCH);
        match mode {
            Mode::Throughput => {
                let bound = if self.interleaved {
                    THROUGHPUT_STEP_MS.max(2.0 * self.max_step_ms)
                } else {
                    // Nothing is answered inside a step: keep it short.
                    self.max_step_ms
                };
                // Before anything was seen, the full chunk (one step tells).
                let fits = |rows: usize| self.predict(generating + rows).is_none_or(|ms| ms <= bound);
                let largest = (1..=MAX_CHUNK.min(room)).rev().find(|&rows| fits(rows)).unwrap_or(1);
                largest.max(1)
            }
            Mode::Cadence => {
                let Some(alone) = self.predict_logits(generating.max(1)).or_else(|| self.predict(generating.max(1))) else {
                    return 1;
                };
                // Each step earns the prompt a share of the generating
                // rows' own time; a step spends what its rows add.
                self.credit = (self.credit + CADENCE_SLACK * alone).min(CREDIT_CAP * alone);
                let cap = if alone >= self.max_step_ms { alone * CADENCE_MULTIPLE } else { self.max_step_ms };
                let extra = |rows: usize| self.predict(generating + rows).map(|ms| (ms - alone).max(0.0));
                let fits = |rows: usize| {
                    self.predict(generating + rows).is_some_and(|ms| ms <= cap) && extra(rows).is_some_and(|e| e <= self.credit)
                };
                let mut rows = (1..=MAX_CHUNK.min(room)).rev().find(|&rows| fits(rows)).unwrap_or(0);
                // Where even one row breaks the cap, one row as the credit allows.
                if rows == 0 && extra(1).is_none_or(|e| e <= self.credit) {
                    rows = 1;
                }
                if rows > 0 {
                    self.credit -= extra(rows).unwrap_or(0.0);
                }
                rows
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The curve measured on Qwen2.5-0.5B with 2 threads (ms by rows).
    const QWEN: [(usize, f64); 8] = [(1, 37.0), (2, 41.0), (3, 55.0), (4, 55.0), (8, 87.0), (16, 130.0), (64, 398.0), (128, 770.0)];

    fn planner(points: &[(usize, f64)], max_step_ms: u32) -> StepPlanner {
        let mut p = StepPlanner::new(max_step_ms, true);
        for &(rows, ms) in points {
            p.observe(rows, ms, rows == 1);
        }
        p
    }

    #[test]
    fn the_curve_is_learned_interpolated_and_extrapolated() {
        let mut p = StepPlanner::new(50, true);
        p.observe(1, 10.0, false);
        p.observe(5, 30.0, false);
        assert_eq!(p.predict(1), Some(10.0));
        assert_eq!(p.predict(3), Some(20.0));
        assert_eq!(p.predict(9), Some(50.0), "the slope of the last two points");
        let mut p = planner(&[(4, 40.0)], 50);
        assert_eq!(p.predict(8), Some(80.0), "one point: proportional");
        assert_eq!(p.predict(2), Some(20.0));
        for _ in 0..30 {
            p.observe(4, 20.0, false);
        }
        assert!((p.predict(4).unwrap() - 20.0).abs() < 0.1, "the average follows the machine");
        assert_eq!(StepPlanner::new(50, true).predict(3), None);
        // Steps with logits on every row: from one decode step, a prior per
        // row until wider ones are seen.
        let mut p = StepPlanner::new(50, true);
        p.observe(1, 40.0, true);
        assert_eq!(p.predict_logits(3), Some(40.0 + 2.0 * 0.3 * 40.0));
        p.observe(5, 50.0, true);
        assert_eq!(p.predict_logits(3), Some(45.0));
        assert_eq!(p.predict(1), Some(40.0), "a decode step anchors the prompt curve");
    }

    #[test]
    fn cadence_keeps_the_stream_near_its_pace_and_throughput_takes_the_chunk() {
        // Qwen: one row is 37 ms, under max_step_ms 50: steps stay within 50 ms.
        let mut p = planner(&QWEN, 50);
        let plan: Vec<usize> = (0..10).map(|_| p.prompt_rows(Mode::Cadence, 1)).collect();
        assert!(plan.iter().all(|&r| r <= 1), "41 ms for two rows, 55 for three: {plan:?}");
        let added: f64 = plan.iter().map(|&r| p.predict(1 + r).unwrap() - 37.0).filter(|e| *e > 0.0).sum();
        assert!(added <= 0.2 * 37.0 * 10.0 + 1e-9, "on average the stream keeps its pace: {plan:?}");
        assert!(plan.iter().sum::<usize>() >= 5, "and the prompt moves: {plan:?}");
        assert_eq!(p.prompt_rows(Mode::Throughput, 0), MAX_CHUNK);
        // Where one more row costs much more than the slack (a long context),
        // some steps carry none, and the stream's pace holds on average.
        let mut long = planner(&[(1, 39.0), (2, 55.0), (8, 168.0), (128, 900.0)], 50);
        let plan: Vec<usize> = (0..20).map(|_| long.prompt_rows(Mode::Cadence, 1)).collect();
        let added: f64 = plan.iter().map(|&r| if r == 0 { 0.0 } else { long.predict(1 + r).unwrap() - 39.0 }).sum();
        assert!(plan.contains(&0) && plan.contains(&1), "{plan:?}");
        assert!(added <= 0.2 * 39.0 * 20.0 + 1e-9, "{plan:?}: {added} ms added");
        // A slow machine: throughput steps of about a second.
        let slow: Vec<(usize, f64)> = QWEN.iter().map(|&(r, ms)| (r, ms * 4.0)).collect();
        let mut p = planner(&slow, 50);
        assert_eq!(p.prompt_rows(Mode::Throughput, 0), 37);
        // Without answers inside a step, throughput steps stay near max_step_ms.
        let mut p = planner(&QWEN, 100);
        p.interleaved = false;
        assert_eq!(p.prompt_rows(Mode::Throughput, 0), 10, "8 rows 87 ms, 16 rows 130: about 98 ms for 10");
        // Nothing learned yet: one row beside a stream, the full chunk alone.
        let mut p = StepPlanner::new(50, true);
        assert_eq!((p.prompt_rows(Mode::Cadence, 1), p.prompt_rows(Mode::Throughput, 0)), (1, MAX_CHUNK));
    }
}
