//! The trajectory derived from the history of samples: velocity, trend,
//! momentum and spiral detection. Pure functions over explicit samples.

use serde::Serialize;

use super::EmotionParams;

/// One point of the history, appended per applied event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Unix seconds.
    pub time: f64,
    pub valence: f64,
    pub arousal: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trend {
    Improving,
    Declining,
    Stable,
    Oscillating,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Momentum {
    Positive,
    Negative,
    Neutral,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpiralDirection {
    None,
    Positive,
    Negative,
    Escalating,
    Withdrawing,
}

/// Everything the history says, before rounding for the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trajectory {
    /// Valence change per minute, clamped to [-1, 1].
    pub valence_velocity: f64,
    /// Arousal change per minute, clamped to [-1, 1].
    pub arousal_velocity: f64,
    pub trend: Trend,
    pub momentum: Momentum,
    pub spiral_detected: bool,
    pub spiral_direction: SpiralDirection,
}

impl Trajectory {
    pub const NEUTRAL: Trajectory = Trajectory {
        valence_velocity: 0.0,
        arousal_velocity: 0.0,
        trend: Trend::Stable,
        momentum: Momentum::Neutral,
        spiral_detected: false,
        spiral_direction: SpiralDirection::None,
    };
}

/// How many recent samples the velocity regression uses.
const VELOCITY_WINDOW: usize = 10;
/// Below this, the regression's denominator means "all samples at one time".
const DEGENERATE_DENOMINATOR: f64 = 1e-10;
/// Under this change over the spiral window, the direction comes from the
/// last sample's offset from the baseline instead.
const SPIRAL_SMALL_CHANGE: f64 = 0.05;

/// Derive the trajectory from `history` (oldest first).
pub fn trajectory(history: &[Sample], params: &EmotionParams) -> Trajectory {
    if history.len() < 2 {
        return Trajectory::NEUTRAL;
    }
    let window = &history[history.len().saturating_sub(VELOCITY_WINDOW)..];
    let valence_velocity = slope_per_minute(window, |s| s.valence);
    let arousal_velocity = slope_per_minute(window, |s| s.arousal);

    let trend = if oscillating(history) {
        Trend::Oscillating
    } else if valence_velocity > params.trend_improving_threshold {
        Trend::Improving
    } else if valence_velocity < params.trend_declining_threshold {
        Trend::Declining
    } else {
        Trend::Stable
    };
    let momentum = if valence_velocity > params.momentum_positive_threshold {
        Momentum::Positive
    } else if valence_velocity < params.momentum_negative_threshold {
        Momentum::Negative
    } else {
        Momentum::Neutral
    };
    let spiral_direction = spiral(history, params);
    Trajectory {
        valence_velocity,
        arousal_velocity,
        trend,
        momentum,
        spiral_detected: spiral_direction != SpiralDirection::None,
        spiral_direction,
    }
}

/// Least-squares slope of `value` over time in minutes, times measured from
/// the first sample; 0 for a degenerate fit; clamped to [-1, 1].
fn slope_per_minute(samples: &[Sample], value: impl Fn(&Sample) -> f64) -> f64 {
    let n = samples.len() as f64;
    let t0 = samples[0].time;
    let (mut st, mut sx, mut stt, mut stx) = (0.0, 0.0, 0.0, 0.0);
    for s in samples {
        let t = (s.time - t0) / 60.0;
        let x = value(s);
        st += t;
        sx += x;
        stt += t * t;
        stx += t * x;
    }
    let denominator = n * stt - st * st;
    if denominator < DEGENERATE_DENOMINATOR {
        return 0.0;
    }
    ((n * stx - st * sx) / denominator).clamp(-1.0, 1.0)
}

/// The three differences between the last four valences alternate in sign.
fn oscillating(history: &[Sample]) -> bool {
    if history.len() < 4 {
        return false;
    }
    let last = &history[history.len() - 4..];
    let d: Vec<f64> = last.windows(2).map(|w| w[1].valence - w[0].valence).collect();
    let up_down_up = d[0] > 0.0 && d[1] < 0.0 && d[2] > 0.0;
    let down_up_down = d[0] < 0.0 && d[1] > 0.0 && d[2] < 0.0;
    up_down_up || down_up_down
}

/// Spiral detection over the last `spiral_history_count` samples (needs that
/// many): the distance from the baseline grew in at least
/// `spiral_increasing_threshold` of the steps.
fn spiral(history: &[Sample], params: &EmotionParams) -> SpiralDirection {
    let count = params.spiral_history_count;
    if count < 2 || history.len() < count {
        return SpiralDirection::None;
    }
    let window = &history[history.len() - count..];
    let (bv, ba) = (params.baseline_valence, params.baseline_arousal);
    let distance = |s: &Sample| ((s.valence - bv).powi(2) + (s.arousal - ba).powi(2)).sqrt();
    let growing = window
        .windows(2)
        .filter(|w| distance(&w[1]) > distance(&w[0]))
        .count();
    if growing < params.spiral_increasing_threshold {
        return SpiralDirection::None;
    }
    let (first, last) = (window[0], window[count - 1]);
    let (dv, da) = (last.valence - first.valence, last.arousal - first.arousal);
    let (by_valence, v, a) = if dv.abs() < SPIRAL_SMALL_CHANGE && da.abs() < SPIRAL_SMALL_CHANGE {
        let (ov, oa) = (last.valence - bv, last.arousal - ba);
        (ov.abs() >= oa.abs(), ov, oa)
    } else {
        (dv.abs() >= da.abs(), dv, da)
    };
    match (by_valence, v >= 0.0, a >= 0.0) {
        (true, true, _) => SpiralDirection::Positive,
        (true, false, _) => SpiralDirection::Negative,
        (false, _, true) => SpiralDirection::Escalating,
        (false, _, false) => SpiralDirection::Withdrawing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(points: &[(f64, f64, f64)]) -> Vec<Sample> {
        points
            .iter()
            .map(|&(time, valence, arousal)| Sample { time, valence, arousal })
            .collect()
    }

    fn params() -> EmotionParams {
        EmotionParams::default()
    }

    #[test]
    fn fewer_than_two_samples_is_neutral() {
        assert_eq!(trajectory(&[], &params()), Trajectory::NEUTRAL);
        assert_eq!(trajectory(&samples(&[(0.0, 0.9, 0.9)]), &params()), Trajectory::NEUTRAL);
    }

    #[test]
    fn velocity_is_per_minute_least_squares() {
        // +0.1 valence per 30 s = 0.2 per minute, exactly linear.
        let h = samples(&[(100.0, 0.0, 0.0), (130.0, 0.1, -0.05), (160.0, 0.2, -0.1)]);
        let t = trajectory(&h, &params());
        assert!((t.valence_velocity - 0.2).abs() < 1e-12);
        assert!((t.arousal_velocity + 0.1).abs() < 1e-12);
        assert_eq!(t.trend, Trend::Improving);
        assert_eq!(t.momentum, Momentum::Positive);
    }

    #[test]
    fn velocity_uses_last_ten_samples_and_clamps() {
        // Eleven samples: the first one is an outlier that must be ignored.
        let mut points = vec![(0.0, -1.0, 0.0)];
        for i in 1..=10 {
            points.push((i as f64 * 60.0, 0.5, 0.0));
        }
        let t = trajectory(&samples(&points), &params());
        assert_eq!(t.valence_velocity, 0.0);
        // Two samples one second apart, +0.5 valence: 30/minute, clamped to 1.
        let t = trajectory(&samples(&[(0.0, 0.0, 0.0), (1.0, 0.5, -0.5)]), &params());
        assert_eq!((t.valence_velocity, t.arousal_velocity), (1.0, -1.0));
    }

    #[test]
    fn same_timestamp_gives_zero_velocity() {
        let t = trajectory(&samples(&[(5.0, 0.0, 0.0), (5.0, 0.5, 0.5)]), &params());
        assert_eq!((t.valence_velocity, t.arousal_velocity), (0.0, 0.0));
        assert_eq!(t.trend, Trend::Stable);
        assert_eq!(t.momentum, Momentum::Neutral);
    }

    #[test]
    fn trend_declining_and_momentum_negative() {
        let h = samples(&[(0.0, 0.3, 0.0), (60.0, 0.2, 0.0), (120.0, 0.1, 0.0)]);
        let t = trajectory(&h, &params());
        assert_eq!(t.trend, Trend::Declining);
        assert_eq!(t.momentum, Momentum::Negative);
    }

    #[test]
    fn trend_stable_between_thresholds_and_momentum_by_its_own() {
        // 0.015 per minute: above the momentum threshold (0.01), below the trend one (0.02).
        let h = samples(&[(0.0, 0.0, 0.0), (60.0, 0.015, 0.0)]);
        let t = trajectory(&h, &params());
        assert_eq!(t.trend, Trend::Stable);
        assert_eq!(t.momentum, Momentum::Positive);
        let h = samples(&[(0.0, 0.0, 0.0), (60.0, 0.005, 0.0)]);
        let t = trajectory(&h, &params());
        assert_eq!((t.trend, t.momentum), (Trend::Stable, Momentum::Neutral));
    }

    #[test]
    fn trend_oscillating_both_ways() {
        let up_down_up = samples(&[(0.0, 0.0, 0.0), (60.0, 0.5, 0.0), (120.0, 0.1, 0.0), (180.0, 0.6, 0.0)]);
        assert_eq!(trajectory(&up_down_up, &params()).trend, Trend::Oscillating);
        let down_up_down = samples(&[(0.0, 0.5, 0.0), (60.0, 0.0, 0.0), (120.0, 0.4, 0.0), (180.0, -0.1, 0.0)]);
        assert_eq!(trajectory(&down_up_down, &params()).trend, Trend::Oscillating);
        // A flat step breaks the alternation.
        let flat = samples(&[(0.0, 0.5, 0.0), (60.0, 0.0, 0.0), (120.0, 0.0, 0.0), (180.0, -0.1, 0.0)]);
        assert_ne!(trajectory(&flat, &params()).trend, Trend::Oscillating);
        // Three samples never oscillate.
        let three = samples(&[(0.0, 0.0, 0.0), (60.0, 0.5, 0.0), (120.0, 0.1, 0.0)]);
        assert_ne!(trajectory(&three, &params()).trend, Trend::Oscillating);
    }

    #[test]
    fn thresholds_come_from_params() {
        let h = samples(&[(0.0, 0.0, 0.0), (60.0, 0.03, 0.0)]);
        let mut p = params();
        assert_eq!(trajectory(&h, &p).trend, Trend::Improving);
        p.trend_improving_threshold = 0.05;
        p.momentum_positive_threshold = 0.05;
        let t = trajectory(&h, &p);
        assert_eq!((t.trend, t.momentum), (Trend::Stable, Momentum::Neutral));
    }

    fn spiral_of(points: &[(f64, f64, f64)]) -> (bool, SpiralDirection) {
        let t = trajectory(&samples(points), &params());
        (t.spiral_detected, t.spiral_direction)
    }

    #[test]
    fn spiral_negative_by_valence_change() {
        let s = spiral_of(&[(0.0, 0.0, 0.0), (1.0, -0.1, 0.05), (2.0, -0.2, 0.1), (3.0, -0.3, 0.1), (4.0, -0.4, 0.15)]);
        assert_eq!(s, (true, SpiralDirection::Negative));
    }

    #[test]
    fn spiral_positive_by_valence_change() {
        let s = spiral_of(&[(0.0, 0.0, 0.0), (1.0, 0.1, 0.0), (2.0, 0.2, 0.0), (3.0, 0.3, 0.0), (4.0, 0.4, 0.0)]);
        assert_eq!(s, (true, SpiralDirection::Positive));
    }

    #[test]
    fn spiral_escalating_and_withdrawing_by_arousal_change() {
        let s = spiral_of(&[(0.0, 0.0, 0.1), (1.0, 0.0, 0.2), (2.0, 0.05, 0.3), (3.0, 0.05, 0.4), (4.0, 0.05, 0.5)]);
        assert_eq!(s, (true, SpiralDirection::Escalating));
        let s = spiral_of(&[(0.0, 0.0, -0.1), (1.0, 0.0, -0.2), (2.0, 0.0, -0.3), (3.0, 0.0, -0.4), (4.0, 0.0, -0.5)]);
        assert_eq!(s, (true, SpiralDirection::Withdrawing));
    }

    #[test]
    fn spiral_tie_goes_to_valence() {
        let s = spiral_of(&[(0.0, 0.0, 0.0), (1.0, 0.1, -0.1), (2.0, 0.2, -0.2), (3.0, 0.3, -0.3), (4.0, 0.4, -0.4)]);
        assert_eq!(s, (true, SpiralDirection::Positive));
    }

    #[test]
    fn spiral_small_change_classified_by_offset() {
        // Distance grows in small steps, total change < 0.05 on both axes:
        // the last sample's offset decides (arousal offset larger, negative).
        let s = spiral_of(&[(0.0, 0.0, -0.6), (1.0, 0.0, -0.61), (2.0, 0.0, -0.62), (3.0, 0.0, -0.63), (4.0, 0.01, -0.64)]);
        assert_eq!(s, (true, SpiralDirection::Withdrawing));
        let s = spiral_of(&[(0.0, -0.7, 0.1), (1.0, -0.71, 0.1), (2.0, -0.72, 0.1), (3.0, -0.73, 0.1), (4.0, -0.74, 0.1)]);
        assert_eq!(s, (true, SpiralDirection::Negative));
    }

    #[test]
    fn no_spiral_when_distance_shrinks_or_history_short() {
        let s = spiral_of(&[(0.0, 0.5, 0.5), (1.0, 0.4, 0.4), (2.0, 0.3, 0.3), (3.0, 0.2, 0.2), (4.0, 0.1, 0.1)]);
        assert_eq!(s, (false, SpiralDirection::None));
        // Two growing steps out of four: below the threshold of three.
        let s = spiral_of(&[(0.0, 0.0, 0.0), (1.0, 0.3, 0.0), (2.0, 0.1, 0.0), (3.0, 0.4, 0.0), (4.0, 0.2, 0.0)]);
        assert_eq!(s, (false, SpiralDirection::None));
        let s = spiral_of(&[(0.0, 0.0, 0.0), (1.0, 0.1, 0.0), (2.0, 0.2, 0.0), (3.0, 0.3, 0.0)]);
        assert_eq!(s, (false, SpiralDirection::None));
    }

    #[test]
    fn spiral_distance_is_measured_from_the_baseline() {
        let mut p = params();
        p.baseline_valence = 0.5;
        // Moving from 0.5 down to 0.1 moves away from baseline 0.5.
        let h = samples(&[(0.0, 0.5, 0.0), (1.0, 0.4, 0.0), (2.0, 0.3, 0.0), (3.0, 0.2, 0.0), (4.0, 0.1, 0.0)]);
        let t = trajectory(&h, &p);
        assert_eq!((t.spiral_detected, t.spiral_direction), (true, SpiralDirection::Negative));
    }
}
