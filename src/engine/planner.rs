//! [`StepPlanner`]: how many prompt rows one decode step carries, from what
//! steps really cost on this machine and model.
//!
//! A step's cost is far from linear in its rows: the weights (and, per row
//! with logits, the output layer) are read once per step, and the CPU
//! kernels prefer some row counts (measured on this project's 2-core
//! machine, Qwen2.5-0.5B, 2 threads, k decode rows against one: 2 rows
//! 2.27x, 4 rows 2.34x, 8 rows 4.52x, 16 rows 7.33x). So the planner learns
//! the cost of a step by its row count from the steps it observes (a moving
//! average per count; between known counts it interpolates, beyond them it
//! extrapolates at the per-row slope), and plans from the whole curve:
//! - **beside decoding rows** (somebody reads the tokens of the step, and a
//!   prompt somebody waits on is being read): the prompt takes the smallest
//!   chunk that reads it at [`CHUNK_EFFICIENCY`] of the best rate this curve
//!   allows (prompt rows per millisecond of step, the decoding rows'
//!   own cost included), or all that is left of the waiting prompts when
//!   less. A waiting call's first token so comes nearly as soon as a
//!   prompt-only step would bring it, and the decodes keep going, one token
//!   a step: where rows are nearly free (a GPU, or 2 to 4 rows on this
//!   CPU) the chunk is large, where each row costs its share it is as small
//!   as efficiency allows. A step never waits on another request's end;
//! - **prompts alone** (nobody reads a token of this step): the whole chunk
//!   ([`chunk`]), however slow steps are now (on a loaded machine every
//!   step is slower, and smaller chunks would read far less per
//!   millisecond). Requests are answered in the middle of such a step
//!   (between its graph nodes), so a long step costs nobody an answer.
//!   Where they cannot be (a device backend without ggml's abort
//!   callback), they wait one step: a device reads a whole chunk in about
//!   the time of one row. Beside decoding rows there, the chunk is also
//!   kept near `max_step_ms` (or near a decode step, where that alone is
//!   longer), so the streams' tokens and the answers keep their pace.

/// Most prompt rows one step may decode where requests are answered
/// between its graph nodes (every layer on the CPU): llama.cpp computes
/// them at once (the context's micro-batch), and a wide one reads a prompt
/// faster, most of all on a busy machine, where each of a step's graph
/// nodes waits for both threads (llama-bench here, Qwen2.5-0.5B, 2 threads,
/// pp512: 142 / 144 / 145 tok/s at 128 / 256 / 512 rows when quiet; 34 /
/// 45 / 57 tok/s beside two busy processes). llama.cpp's own default.
pub(super) const MAX_CHUNK: usize = 512;
/// Most prompt rows of a step beside tokens somebody reads (the cost of a
/// row depends on the context it attends to, which the learned curve does
/// not see: a curve learned from wide steps over a long prompt once chose
/// 512-row chunks there, and a stream read beside it stalled for seconds),
/// and of any step where nothing is answered during it (layers on a GPU or
/// RPC workers: a step is a wait for every client, and slow devices such as
/// lavapipe take seconds over a wide one).
pub(super) const CHUNK: usize = 128;
/// Rows one batch may hold: a chunk plus the generating slots' tokens and
/// their drafts.
pub(super) const MAX_BATCH: usize = MAX_CHUNK + 64;

/// The widest prompt chunk of a step (the context's micro-batch):
/// `interleaved`, requests are answered inside steps.
pub(super) fn chunk(interleaved: bool) -> usize {
    if interleaved {
        MAX_CHUNK
    } else {
        CHUNK
    }
}
/// A prompt chunk read beside decoding rows (or on a loaded machine) reads
/// at least this share of the best prompt rate the cost curve allows.
pub(super) const CHUNK_EFFICIENCY: f64 = 0.8;
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
    /// Somebody reads the tokens this step produces: prompts go in
    /// efficient chunks beside them.
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
    /// holds them up: chunks beside decoding rows stay near `max_step_ms`).
    interleaved: bool,
}

impl StepPlanner {
    pub fn new(max_step_ms: u32, interleaved: bool) -> StepPlanner {
        StepPlanner {
            max_step_ms: max_step_ms as f64,
            cost: vec![None; MAX_BATCH + 1],
            logit_cost: vec![None; MAX_BATCH + 1],
            seen: vec![(0, 0); MAX_BATCH + 1],
            interleaved,
        }
    }

    /// Requests are answered inside steps (every layer on the CPU).
    pub fn interleaved(&self) -> bool {
        self.interleaved
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
        let anchor = if self.cost[1].is_none() { self.logit_cost[1] } else { None };
        estimate(&self.cost, anchor, rows, None)
    }

    /// The expected milliseconds of a step of `rows` rows that all have
    /// logits (decoding with drafts); None before any decode step.
    pub fn predict_logits(&self, rows: usize) -> Option<f64> {
        let rows = rows.clamp(1, MAX_BATCH);
        let widest = (1..=rows).rev().find(|&r| self.logit_cost[r].is_some());
        let beyond = widest.is_some_and(|r| r < rows) && (rows + 1..=MAX_BATCH).all(|r| self.logit_cost[r].is_none());
        // Wider than any step with logits seen: scaled by the prompt curve's
        // shape, where prompt steps that wide were seen (the slope of two
        // narrow steps says little: here 2 rows cost 2.27x one, 4 rows only
        // 2.34x), from the seen count that scales cheapest, else a prior per
        // row. Cheapest, since the CPU's kernels take columns in fours and
        // read the weights once per pass: a step of 4k + 1 rows costs a
        // pass more than one of 4k (here 5 rows 3.3x one, 4 rows 2.45x, 16
        // rows 5.9x), so scaling from a dear count would hide what wide
        // steps cost; an unseen count that turns out dear is learned at
        // its first step. Not from one row: a one-row step runs other
        // kernels (a matrix-vector product).
        if beyond && (rows..=MAX_BATCH).any(|r| self.cost[r].is_some()) {
            if let Some(b) = self.predict(rows) {
                let scaled = (2..rows)
                    .filter_map(|r0| Some(self.logit_cost[r0]? * (b / self.predict(r0)?).max(1.0)))
                    .min_by(f64::total_cmp);
                if scaled.is_some() {
                    return scaled;
                }
            }
        }
        estimate(&self.logit_cost, None, rows, Some(LOGIT_ROW_PRIOR))
    }
}

/// A curve's value at `rows`: known, interpolated between the nearest known
/// counts, or extrapolated at the per-row slope of the last two (or, from
/// one point, at `prior` of it per row when given, else proportionally).
/// `anchor`: the one-row value, where the curve has none of its own.
fn estimate(cost: &[Option<f64>], anchor: Option<f64>, rows: usize, prior: Option<f64>) -> Option<f64> {
    let rows = rows.clamp(1, MAX_BATCH);
    let cost = |r: usize| if r == 1 { cost[1].or(anchor) } else { cost[r] };
    if let Some(known) = cost(rows) {
        return Some(known);
    }
    {
        let below = (1..rows).rev().find_map(|r| cost(r).map(|c| (r, c)));
        let above = (rows + 1..=MAX_BATCH).find_map(|r| cost(r).map(|c| (r, c)));
        match (below, above) {
            (Some((r0, c0)), Some((r1, c1))) => Some(c0 + (c1 - c0) * (rows - r0) as f64 / (r1 - r0) as f64),
            // Beyond the largest known count: its per-row slope from the
            // next known one below, else proportional (pessimistic).
            (Some((r0, c0)), None) => {
                let slope = (1..r0)
                    .rev()
                    .find_map(|r| cost(r).map(|c| (c0 - c) / (r0 - r) as f64))
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
    /// Prompt rows the next step may carry beside `generating` rows, in
    /// `mode`, with `waiting` prompt rows left to read (of the jobs the step
    /// may feed).
    pub fn prompt_rows(&self, mode: Mode, generating: usize, waiting: usize) -> usize {
        let room = (MAX_BATCH - generating.min(MAX_BATCH)).min(chunk(self.interleaved));
        if room == 0 || waiting == 0 {
            return 0;
        }
        let rows = match mode {
            Mode::Cadence if self.interleaved => self.efficient_chunk(generating, room.min(CHUNK)),
            // On a device nothing is answered inside a step: the efficient
            // chunk, shrunk to keep the step near max_step_ms (or near a
            // decode step, where that alone is longer).
            Mode::Cadence => {
                let bound = self.predict_logits(generating.max(1)).map_or(self.max_step_ms, |ms| ms.max(self.max_step_ms));
                let fits = |rows: usize| self.predict(generating + rows).is_none_or(|ms| ms <= bound);
                (1..=self.efficient_chunk(generating, room)).rev().find(|&rows| fits(rows)).unwrap_or(1)
            }
            // Nobody reads a token of this step: the whole chunk, the most
            // rows per millisecond, however slow the machine is now. On
            // the CPU requests are answered inside the step; on a device
            // they wait for its end, one step (a device reads a chunk
            // nearly as fast as one row, and a slow one gains the most).
            Mode::Throughput => room,
        };
        rows.clamp(1, room).min(waiting)
    }

    /// The smallest chunk beside `generating` rows that reads prompt rows
    /// at [`CHUNK_EFFICIENCY`] of the best rate (rows per millisecond of
    /// the whole step) the curve offers up to `room` rows; `room` before
    /// anything was seen (one step tells).
    fn efficient_chunk(&self, generating: usize, room: usize) -> usize {
        let rates: Vec<Option<f64>> =
            (1..=room).map(|r| self.predict(generating + r).map(|ms| r as f64 / ms.max(f64::MIN_POSITIVE))).collect();
        let best = rates.iter().flatten().copied().fold(0.0, f64::max);
        if best <= 0.0 {
            return room;
        }
        rates.iter().position(|rate| rate.is_some_and(|r| r >= CHUNK_EFFICIENCY * best)).map_or(room, |i| i + 1)
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
        // Wider than any decode step seen, where prompt steps that wide
        // were: the prompt curve's shape, not the slope of two narrow steps.
        let mut p = StepPlanner::new(50, true);
        for (rows, ms) in [(1, 37.0), (2, 84.0)] {
            p.observe(rows, ms, true);
        }
        for (rows, ms) in [(26, 200.0), (128, 770.0)] {
            p.observe(rows, ms, false);
        }
        let wide = p.predict_logits(13).unwrap();
        assert!(wide < 84.0 * 13.0 / 2.0 && wide > 84.0, "{wide}");
        // A dear count seen (5 rows: ggml's kernels take a second pass over
        // the weights for the fifth column) does not hide what wider steps
        // cost: they scale from the cheapest. Measured on this project's
        // machine, Qwen2.5-0.5B with its weights widened, 2 threads: 16
        // rows with logits 133.9 ms.
        let mut p = StepPlanner::new(50, true);
        for (rows, ms) in [(1, 22.8), (4, 55.9), (5, 75.3)] {
            p.observe(rows, ms, true);
        }
        p.observe(129, 519.0, false);
        let wide = p.predict_logits(16).unwrap();
        assert!((wide - 133.9).abs() < 0.1 * 133.9, "{wide}");
        assert_eq!(p.predict_logits(5), Some(75.3), "a count seen is what it cost");
    }

    /// Decode steps on this project's machine (Qwen2.5-0.5B, 2 threads),
    /// k rows against one: 2.27x, 2.34x, 8.52x... as measured (ms by rows).
    const QWEN_BATCH: [(usize, f64); 5] = [(1, 37.0), (2, 84.0), (4, 86.6), (8, 167.2), (16, 271.2)];

    /// Milliseconds to read `waiting` prompt rows beside `generating`
    /// decoding rows, one planned step after another, and the steps taken.
    fn catch_up(p: &StepPlanner, generating: usize, mut waiting: usize) -> (f64, usize) {
        let (mut ms, mut steps) = (0.0, 0);
        while waiting > 0 {
            let rows = p.prompt_rows(Mode::Cadence, generating, waiting);
            assert!(rows >= 1, "a waiting prompt always moves");
            ms += p.predict(generating + rows).unwrap();
            waiting -= rows;
            steps += 1;
        }
        (ms, steps)
    }

    #[test]
    fn a_waiting_prompt_is_read_beside_the_decodes_nearly_as_fast_as_alone() {
        for curve in [&QWEN[..], &QWEN_BATCH[..]] {
            let p = planner(curve, 50);
            // Three calls of 40 rows arrive while one decodes (the peer
            // benchmark's four requests at once), and a 565-row prompt.
            for waiting in [120, 565] {
                let (ms, steps) = catch_up(&p, 1, waiting);
                let alone: f64 = (0..waiting.div_ceil(MAX_CHUNK))
                    .map(|i| p.predict((waiting - i * MAX_CHUNK).min(MAX_CHUNK)).unwrap())
                    .sum();
                assert!(ms <= alone / CHUNK_EFFICIENCY * 1.05, "{curve:?}, {waiting} rows: {ms:.0} ms beside a decode, {alone:.0} alone");
                // The decode keeps going: a token every step, and steps far
                // shorter than the whole read.
                assert!(ms / steps as f64 <= 0.5 * alone, "{curve:?}: {steps} steps in {ms:.0} ms");
            }
            // Never more rows than wait.
            assert_eq!(p.prompt_rows(Mode::Cadence, 1, 3), 3);
            assert_eq!(p.prompt_rows(Mode::Cadence, 1, 0), 0);
        }
        // Where rows are nearly free (a GPU's flat curve), a waiting prompt
        // goes in whole chunks.
        let flat = planner(&[(1, 10.0), (2, 10.2), (16, 11.0), (64, 14.0), (128, 20.0)], 50);
        assert!(flat.prompt_rows(Mode::Cadence, 1, 500) >= 64);
    }

    #[test]
    fn prompts_alone_take_the_whole_chunk_even_on_a_loaded_machine() {
        let p = planner(&QWEN, 50);
        assert_eq!(p.prompt_rows(Mode::Throughput, 0, 1000), MAX_CHUNK);
        assert_eq!(p.prompt_rows(Mode::Throughput, 0, 40), 40, "no more rows than wait");
        // A machine three times slower (a compile beside it): still the
        // whole chunk, the most rows per millisecond.
        let loaded: Vec<(usize, f64)> = QWEN.iter().map(|&(r, ms)| (r, ms * 3.0)).collect();
        let p = planner(&loaded, 50);
        assert_eq!(p.prompt_rows(Mode::Throughput, 0, 1000), MAX_CHUNK);
        // Without answers inside a step (a device) too: one step's wait.
        let mut p = planner(&QWEN, 100);
        p.interleaved = false;
        assert_eq!(p.prompt_rows(Mode::Throughput, 0, 1000), CHUNK);
        // Beside a decode, never wider than CHUNK, even where wide steps
        // learned over a short context price rows cheaply (a bench run's
        // curve): those steps take seconds over a long prompt.
        let wide = planner(&[(1, 37.0), (13, 160.0), (302, 2000.0), (512, 5400.0)], 50);
        assert_eq!(wide.prompt_rows(Mode::Throughput, 0, 2000), MAX_CHUNK);
        assert!(wide.prompt_rows(Mode::Cadence, 1, 2000) <= CHUNK);
        // Nothing learned yet: the full chunk (one step tells).
        let p = StepPlanner::new(50, true);
        assert_eq!((p.prompt_rows(Mode::Cadence, 1, 1000), p.prompt_rows(Mode::Throughput, 0, 1000)), (CHUNK, MAX_CHUNK));
    }

    #[test]
    fn on_a_device_a_chunk_beside_decodes_keeps_the_step_near_max_step_ms() {
        // A GPU: rows nearly free; the whole efficient chunk fits.
        let flat: Vec<(usize, f64)> = [1, 2, 4, 16, 64, 128].iter().map(|&r| (r, 8.0 + r as f64 * 0.02)).collect();
        let mut p = planner(&flat, 50);
        p.interleaved = false;
        assert!(p.prompt_rows(Mode::Cadence, 1, 500) >= 64);
        // This CPU's curve without answers inside steps: the chunk shrinks
        // to about max_step_ms (the decode step alone costs 37 ms).
        let mut p = planner(&QWEN, 50);
        let inside = p.prompt_rows(Mode::Cadence, 1, 500);
        p.interleaved = false;
        let rows = p.prompt_rows(Mode::Cadence, 1, 500);
        assert!(rows < inside && p.predict(1 + rows).unwrap() <= 50.0, "{rows} rows, {inside} inside");
        // Slow steps (lavapipe): a decode step alone is 900 ms; chunks stay near it.
        let slow: Vec<(usize, f64)> = QWEN.iter().map(|&(r, ms)| (r, ms * 25.0)).collect();
        let mut p = planner(&slow, 50);
        p.interleaved = false;
        let rows = p.prompt_rows(Mode::Cadence, 1, 500);
        assert!(rows >= 1 && p.predict(1 + rows).unwrap() <= 25.0 * 41.0 + 1e-9, "{rows}");
    }
}
