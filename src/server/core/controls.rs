//! The generation controls of a request, validated into what the engine
//! takes: the sampling (an explicit value wins over the mood's and the
//! config's), stop strings, speculation and its predicted output. Every bad
//! value is an error naming the argument and its range, before anything
//! is queued. The [`SamplingParams`] a request gets are also what its
//! `modulated_params` reports.

use serde_json::Value;

use crate::config::ModelConfig;
use crate::emotion::Modulation;
use crate::engine::SamplingParams;
use super::args::Controls;
use super::error::RequestError;

/// Most stop strings a request may give.
pub const MAX_STOPS: usize = 8;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Most alternatives reported with each token's log-probability.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Log-probabilities asked for: None, or the number of alternatives.
pub fn logprobs(c: &Controls) -> Result<Option<usize>, RequestError> {
    match (c.logprobs, c.top_logprobs) {
        (_, Some(n)) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&n) => {
            Err(RequestError::invalid(format!("top_logprobs = {n} is out of range: expected 0 to {MAX_TOP_LOGPROBS}")))
        }
        (Some(false), Some(n)) if n > 0 => Err(RequestError::invalid("top_logprobs needs logprobs: true")),
        (_, Some(n)) => Ok(Some(n as usize)),
        (Some(true), None) => Ok(Some(0)),
        _ => Ok(None),
    }
}

fn in_range(name: &str, value: Option<f64>, lo: f64, hi: f64, lo_open: bool) -> Result<Option<f64>, RequestError> {
    match value {
        Some(v) if !v.is_finite() || v > hi || v < lo || (lo_open && v == lo) => {
            let from = if lo_open { format!("above {lo}") } else { format!("{lo}") };
            Err(RequestError::invalid(format!("{name} = {v} is out of range: expected {from} to {hi}")))
        }
        other => Ok(other),
    }
}

/// The sampling for a request: the temperature (explicit, else the mood's
/// when `modulate`, else the config's), and every other control explicit
/// or the config's. `top_p` follows the temperature's source unless given.
pub fn sampling(defaults: &ModelConfig, mood: impl FnOnce() -> Modulation, temperature: Option<f64>, modulate: bool, c: &Controls) -> Result<SamplingParams, RequestError> {
    let temperature = in_range("temperature", temperature, 0.0, 2.0, false).map_err(|e| RequestError::invalid(format!("{} (0 = greedy)", e.message)))?;
    let base = match temperature {
        Some(t) => Modulation { temperature: t, top_p: defaults.top_p },
        None if modulate => mood(),
        None => Modulation { temperature: defaults.temperature, top_p: defaults.top_p },
    };
    let top_k = match c.top_k {
        Some(k) if !(0..=100_000).contains(&k) => {
            return Err(RequestError::invalid(format!("top_k = {k} is out of range: expected 0 (no limit) to 100000")))
        }
        Some(k) => k as u32,
        None => defaults.top_k,
    };
    let seed = match c.seed {
        Some(s) if !(0..=u32::MAX as i64).contains(&s) => {
            return Err(RequestError::invalid(format!("seed = {s} is out of range: expected 0 to {}", u32::MAX)))
        }
        Some(s) => s as u32,
        None => defaults.seed.unwrap_or_else(|| uuid::Uuid::new_v4().as_u128() as u32),
    };
    Ok(SamplingParams {
        temperature: base.temperature,
        top_p: in_range("top_p", c.top_p, 0.0, 1.0, true)?.unwrap_or(base.top_p),
        top_k,
        min_p: in_range("min_p", c.min_p, 0.0, 1.0, false)?.unwrap_or(defaults.min_p),
        repeat_penalty: in_range("repeat_penalty", c.repeat_penalty, 0.0, 2.0, true)?.unwrap_or(defaults.repeat_penalty),
        presence_penalty: in_range("presence_penalty", c.presence_penalty, 0.0, 2.0, false)?.unwrap_or(0.0),
        frequency_penalty: in_range("frequency_penalty", c.frequency_penalty, 0.0, 2.0, false)?.unwrap_or(0.0),
        seed,
    })
}

/// Stop strings: at most [`MAX_STOPS`], none empty or over [`MAX_STOP_BYTES`].
pub fn stops(stop: Option<&Vec<String>>) -> Result<Vec<String>, RequestError> {
    let stops = stop.cloned().unwrap_or_default();
    if stops.len() > MAX_STOPS {
        return Err(RequestError::invalid(format!("stop has {} strings: at most {MAX_STOPS} are allowed", stops.len())));
    }
    for (i, s) in stops.iter().enumerate() {
        if s.is_empty() {
            return Err(RequestError::invalid(format!("stop[{i}] is empty: a stop string needs at least one character")));
        }
        if s.len() > MAX_STOP_BYTES {
            return Err(RequestError::invalid(format!("stop[{i}] is {} bytes: at most {MAX_STOP_BYTES}", s.len())));
        }
    }
    Ok(stops)
}

/// The predicted output's text (`{"type": "content", "content": "..."}`,
/// content a string or an array of `{"type": "text", "text"}` parts).
pub fn prediction(prediction: Option<&Value>) -> Result<Option<String>, RequestError> {
    let Some(p) = prediction else { return Ok(None) };
    let bad = || {
        RequestError::invalid(format!(
            "prediction {p} is invalid: use {{\"type\": \"content\", \"content\": \"the expected reply\"}}"
        ))
    };
    if p.get("type").and_then(Value::as_str) != Some("content") {
        return Err(bad());
    }
    match p.get("content") {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(parts)) => {
            let texts: Option<Vec<&str>> = parts.iter().map(|part| part.get("text").and_then(Value::as_str)).collect();
            texts.map(|t| Some(t.concat())).ok_or_else(bad)
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mood() -> Modulation {
        Modulation { temperature: 0.62, top_p: 0.95 }
    }

    #[test]
    fn explicit_values_win_and_bad_ones_name_themselves() {
        let d = ModelConfig::default();
        let used = sampling(&d, mood, None, true, &Controls::default()).unwrap();
        assert_eq!((used.temperature, used.top_p, used.top_k, used.presence_penalty), (0.62, 0.95, 40, 0.0));
        let c = Controls { top_p: Some(0.5), top_k: Some(7), seed: Some(9), frequency_penalty: Some(0.3), ..Controls::default() };
        let used = sampling(&d, mood, Some(0.0), true, &c).unwrap();
        assert_eq!((used.temperature, used.top_p, used.top_k, used.seed, used.frequency_penalty), (0.0, 0.5, 7, 9, 0.3));
        for (c, word) in [
            (Controls { top_p: Some(0.0), ..Controls::default() }, "top_p"),
            (Controls { top_k: Some(-1), ..Controls::default() }, "top_k"),
            (Controls { min_p: Some(1.5), ..Controls::default() }, "min_p"),
            (Controls { presence_penalty: Some(-0.5), ..Controls::default() }, "presence_penalty"),
            (Controls { frequency_penalty: Some(f64::NAN), ..Controls::default() }, "frequency_penalty"),
            (Controls { repeat_penalty: Some(0.0), ..Controls::default() }, "repeat_penalty"),
            (Controls { seed: Some(-3), ..Controls::default() }, "seed"),
        ] {
            let e = sampling(&d, mood, None, true, &c).unwrap_err().message;
            assert!(e.starts_with(word), "{e}");
        }
        assert!(sampling(&d, mood, Some(3.0), true, &Controls::default()).unwrap_err().message.contains("temperature"));
    }

    #[test]
    fn stops_and_predictions() {
        assert_eq!(stops(None).unwrap(), Vec::<String>::new());
        assert!(stops(Some(&vec!["".into()])).unwrap_err().message.contains("stop[0] is empty"));
        assert!(stops(Some(&vec!["x".into(); 9])).unwrap_err().message.contains("at most 8"));
        assert_eq!(prediction(Some(&json!({"type": "content", "content": "abc"}))).unwrap().as_deref(), Some("abc"));
        let parts = json!({"type": "content", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]});
        assert_eq!(prediction(Some(&parts)).unwrap().as_deref(), Some("ab"));
        assert!(prediction(Some(&json!({"content": "x"}))).unwrap_err().message.contains("prediction"));
    }
}
