//! Random input for the property tests (`tests/properties.rs`, the parsers
//! in process; `tests/hostile.rs`, the real server): a seeded generator
//! and the awkward text and JSON both throw at what they test. Included
//! only by those two (with `#[path]`), so other tests do not compile it.

use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestRng};
use serde_json::{json, Value};

/// The same cases on every run from `default_seed` (CI must not pass or
/// fail by luck); ELPIS_FUZZ_SEED picks another set (scripts/fuzz.sh
/// varies it).
pub fn seeded(default_seed: u64) -> TestRng {
    let seed: u64 = std::env::var("ELPIS_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(default_seed);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// Strings that parsers trip on: markup of every format, template syntax,
/// sentinels, control and bidi characters, and plain noise.
pub fn awkward_text() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        Just("<|im_start|>"), Just("<|im_end|>"), Just("<tool_call>"), Just("</tool_call>"), Just("<|python_tag|>"),
        Just("[TOOL_CALLS]"), Just("<|eot_id|>"), Just("<start_of_turn>"), Just("[INST]"), Just("{{"), Just("}}"),
        Just("{%"), Just("%}"), Just("{\"name\": "), Just("\"arguments\": {"), Just("\"parameters\": "), Just("["),
        Just("]"), Just("{"), Just("}"), Just("\""), Just("\\"), Just("\u{fdd0}"), Just("\u{fdef}"), Just("\u{0}"),
        Just("\u{202e}"), Just("\u{feff}"), Just("\n"), Just("null"), Just("NaN"), Just("Infinity"), Just("1e999"),
    ];
    proptest::collection::vec(prop_oneof![pieces.prop_map(String::from), "\\PC{0,12}"], 0..12).prop_map(|v| v.concat())
}

/// Arbitrary JSON, biased toward the awkward: huge, negative and zero
/// numbers, deep nesting, awkward strings.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        Just(json!(1e308)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(0)),
        awkward_text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,12}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
