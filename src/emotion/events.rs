//! The named emotional events and their (valence, arousal) deltas.
//!
//! The table is part of the wire contract: `emotion://events` publishes it and
//! Psyche sends these names to `update_emotion`.

/// Deltas applied for an event name that is not in [`EVENTS`]: a small rise in
/// arousal (something happened, we don't know what).
pub const UNKNOWN_EVENT_DELTA: (f64, f64) = (0.0, 0.05);

/// Every named event with its `(valence_delta, arousal_delta)` at intensity 1.
pub const EVENTS: [(&str, (f64, f64)); 15] = [
    ("success", (0.20, 0.10)),
    ("test_passed", (0.15, 0.05)),
    ("insight", (0.25, 0.20)),
    ("failure", (-0.20, 0.15)),
    ("test_failed", (-0.15, 0.10)),
    ("error", (-0.10, 0.20)),
    ("frustration", (-0.15, 0.25)),
    ("blocked", (-0.20, 0.30)),
    ("idle", (0.00, -0.10)),
    ("routine", (0.05, -0.05)),
    ("novelty", (0.10, 0.20)),
    ("exploration", (0.15, 0.15)),
    ("user_positive", (0.15, 0.10)),
    ("user_negative", (-0.10, 0.15)),
    ("user_question", (0.05, 0.10)),
];

/// The deltas of `event_type`, or [`UNKNOWN_EVENT_DELTA`] when it has no entry.
pub fn event_deltas(event_type: &str) -> (f64, f64) {
    EVENTS
        .iter()
        .find(|(name, _)| *name == event_type)
        .map(|(_, deltas)| *deltas)
        .unwrap_or(UNKNOWN_EVENT_DELTA)
}

/// Whether `event_type` is one of the named events.
pub fn is_known_event(event_type: &str) -> bool {
    EVENTS.iter().any(|(name, _)| *name == event_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_events() {
        assert_eq!(event_deltas("blocked"), (-0.20, 0.30));
        assert_eq!(event_deltas("idle"), (0.0, -0.10));
        assert_eq!(event_deltas("no_such_event"), UNKNOWN_EVENT_DELTA);
        assert!(is_known_event("user_question"));
        assert!(!is_known_event("Success"));
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = EVENTS.iter().map(|(n, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), EVENTS.len());
    }
}
