//! The live emotional state shared by the tools: one [`EmotionalState`]
//! behind a lock, read with the wall clock. Only the `emotion` module
//! computes values; this file just supplies the time and the lock.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::emotion::{response_event, EmotionParams, EmotionSnapshot, EmotionalState, Modulation};

/// Current unix time in seconds (fractional).
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub struct Mood {
    state: Mutex<EmotionalState>,
}

impl Mood {
    pub fn new(params: EmotionParams) -> Self {
        Mood { state: Mutex::new(EmotionalState::new(params, unix_now())) }
    }

    fn with<T>(&self, f: impl FnOnce(&mut EmotionalState, f64) -> T) -> T {
        // A panic while holding the lock cannot leave the state half-written
        // (every method completes or does nothing), so a poisoned lock is usable.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state, unix_now())
    }

    pub fn snapshot(&self) -> EmotionSnapshot {
        self.with(|s, now| s.snapshot(now))
    }

    pub fn update(&self, event_type: &str, intensity: f64) -> EmotionSnapshot {
        self.with(|s, now| {
            s.update(event_type, intensity, now);
            s.snapshot(now)
        })
    }

    pub fn reset(&self) -> EmotionSnapshot {
        self.with(|s, now| {
            s.reset(now);
            s.snapshot(now)
        })
    }

    /// The four steering coefficients now (excited, frustrated, calm,
    /// depleted), for the engine's control vectors.
    pub fn steering(&self) -> [f32; 4] {
        self.with(|s, now| s.steering(now).as_array())
    }

    pub fn strength(&self) -> f64 {
        self.with(|s, _| s.params().steering_strength)
    }

    pub fn modulation(&self) -> Modulation {
        self.with(|s, now| s.modulation(now))
    }

    /// Feed a finished generation's text to the response heuristics.
    pub fn react_to_response(&self, text: &str) {
        if let Some((event, intensity)) = response_event(text) {
            tracing::debug!(event, intensity, "response heuristic");
            self.with(|s, now| s.update(event, intensity, now));
        }
    }
}
