//! `response_format`: OpenAI's shape for a reply that must be JSON,
//! `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
//! {"schema": {...}}}`, turned into the JSON schema a grammar is built from.
//! A schema is checked against what the grammar converter (llama.cpp's)
//! enforces: a keyword it would ignore is an error naming it, never a reply
//! that is silently unconstrained. Pure.

use serde_json::{json, Value};

/// Keywords the converter enforces.
const ENFORCED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "pattern",
    "format",
];
/// Keywords that only describe (nothing to enforce).
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "deprecated",
    "readOnly",
    "writeOnly",
];

/// The JSON schema a reply must satisfy, or None for unconstrained text.
/// The error names the problem (and where in the argument it is).
pub fn schema(response_format: Option<&Value>) -> Result<Option<Value>, String> {
    let Some(format) = response_format else { return Ok(None) };
    let kind = format.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "object"}))),
        Some("json_schema") => {
            let schema = format
                .pointer("/json_schema/schema")
                .ok_or("response_format.json_schema.schema is missing: give {\"type\": \"json_schema\", \"json_schema\": {\"schema\": {...}}}")?;
            if !schema.is_object() {
                return Err(format!("response_format.json_schema.schema must be a JSON schema object, not {schema}"));
            }
            check(schema, "response_format.json_schema.schema")?;
            within_grammar_bounds(schema, "response_format.json_schema.schema")?;
            Ok(Some(schema.clone()))
        }
        _ => Err(format!(
            "response_format {format} is invalid: use {{\"type\": \"json_object\"}}, \
             {{\"type\": \"json_schema\", \"json_schema\": {{\"schema\": {{...}}}}}} or {{\"type\": \"text\"}}"
        )),
    }
}

/// Every keyword of `schema` (at `path`) is one the grammar enforces or a
/// mere annotation.
fn check(schema: &Value, path: &str) -> Result<(), String> {
    let Value::Object(map) = schema else {
        // `true`/`false` subschemas are allowed where schemas are.
        return if schema.is_boolean() { Ok(()) } else { Err(format!("{path} must be a schema object, not {schema}")) };
    };
    for (key, value) in map {
        let here = format!("{path}.{key}");
        if ANNOTATIONS.contains(&key.as_str()) {
            if key == "$defs" || key == "definitions" {
                for (name, sub) in value.as_object().into_iter().flatten() {
                    check(sub, &format!("{here}.{name}"))?;
                }
            }
            continue;
        }
        if !ENFORCED.contains(&key.as_str()) {
            return Err(format!(
                "{here}: the keyword {key:?} cannot be enforced by the reply's grammar (the converter supports {}); \
                 remove it or express it with those",
                ENFORCED.join(", ")
            ));
        }
        match key.as_str() {
            "properties" => {
                let props = value.as_object().ok_or_else(|| format!("{here} must be an object"))?;
                for (name, sub) in props {
                    check(sub, &format!("{here}.{name}"))?;
                }
            }
            "items" | "additionalProperties" => check(value, &here)?,
            "prefixItems" | "anyOf" | "oneOf" | "allOf" => {
                let subs = value.as_array().ok_or_else(|| format!("{here} must be an array of schemas"))?;
                for (i, sub) in subs.iter().enumerate() {
                    check(sub, &format!("{here}[{i}]"))?;
                }
            }
            // llama.cpp's converter accepts only anchored patterns; others
            // would quietly allow any string.
            "pattern" => {
                let pattern = value.as_str().ok_or_else(|| format!("{here} must be a string"))?;
                if !(pattern.starts_with('^') && pattern.ends_with('$')) {
                    return Err(format!("{here} {pattern:?} must be anchored with ^ and $ for the grammar to enforce it"));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The largest count a schema may ask the grammar to repeat something:
/// llama.cpp's converter writes a repetition out in full, and a lower bound
/// above the upper one sends it into a loop that never ends (found by
/// `tests/hostile.rs`: `{"minLength": 543, "maxLength": 1}` hung the server).
pub const MAX_REPEAT: u64 = 4096;

/// Every bound in `schema` (at `path`, at any depth: tool parameters too)
/// is one the grammar can hold: counts and lengths whole numbers up to
/// [`MAX_REPEAT`], a lower bound never above its upper one, in the schema's
/// keywords and in the repetitions (`{n,m}`) of its patterns.
pub fn within_grammar_bounds(schema: &Value, path: &str) -> Result<(), String> {
    match schema {
        Value::Array(items) => items.iter().enumerate().try_for_each(|(i, v)| within_grammar_bounds(v, &format!("{path}[{i}]"))),
        Value::Object(map) => {
            for (low, high) in [("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties")] {
                let count = |key: &str| -> Result<Option<u64>, String> {
                    match map.get(key) {
                        None => Ok(None),
                        Some(v) => match v.as_u64().filter(|n| *n <= MAX_REPEAT) {
                            Some(n) => Ok(Some(n)),
                            None => Err(format!("{path}.{key} = {v} cannot be held by the reply's grammar: a whole number up to {MAX_REPEAT}")),
                        },
                    }
                };
                if let (Some(lo), Some(hi)) = (count(low)?, count(high)?) {
                    if lo > hi {
                        return Err(format!("{path}: {low} = {lo} is above {high} = {hi}: no reply could satisfy it"));
                    }
                }
            }
            let number = |key: &str| map.get(key).and_then(Value::as_f64);
            if let (Some(lo), Some(hi)) = (number("minimum"), number("maximum")) {
                if lo > hi {
                    return Err(format!("{path}: minimum = {lo} is above maximum = {hi}: no reply could satisfy it"));
                }
            }
            if let Some(pattern) = map.get("pattern").and_then(Value::as_str) {
                pattern_bounds(pattern, &format!("{path}.pattern"))?;
            }
            map.iter().try_for_each(|(key, v)| within_grammar_bounds(v, &format!("{path}.{key}")))
        }
        _ => Ok(()),
    }
}

/// The `{n}`, `{n,}` and `{n,m}` repetitions of a pattern, as the keywords.
fn pattern_bounds(pattern: &str, path: &str) -> Result<(), String> {
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let escaped = rest[..open].ends_with('\\') && !rest[..open].ends_with("\\\\");
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        let inside = &after[..close];
        rest = &after[close + 1..];
        if escaped || inside.is_empty() || !inside.chars().all(|c| c.is_ascii_digit() || c == ',') {
            continue;
        }
        let (lo, hi) = inside.split_once(',').unwrap_or((inside, inside));
        let parse = |s: &str| if s.is_empty() { Ok(None) } else { s.parse::<u64>().ok().filter(|n| *n <= MAX_REPEAT).map(Some).ok_or(()) };
        match (parse(lo), parse(hi)) {
            (Ok(Some(lo)), Ok(Some(hi))) if lo > hi => {
                return Err(format!("{path}: the repetition {{{inside}}} has its lower bound above its upper one"));
            }
            (Ok(_), Ok(_)) => {}
            _ => return Err(format!("{path}: the repetition {{{inside}}} cannot be held by the reply's grammar: counts up to {MAX_REPEAT}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shapes_and_their_errors() {
        assert_eq!(schema(None).unwrap(), None);
        assert_eq!(schema(Some(&json!({"type": "text"}))).unwrap(), None);
        assert_eq!(schema(Some(&json!({"type": "json_object"}))).unwrap(), Some(json!({"type": "object"})));
        let s = json!({"type": "object", "title": "x", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"]});
        assert_eq!(schema(Some(&json!({"type": "json_schema", "json_schema": {"name": "n", "schema": s}}))).unwrap(), Some(s));
        assert!(schema(Some(&json!({"type": "json_schema", "json_schema": {"schema": 5}}))).unwrap_err().contains("must be a JSON schema object"));
        assert!(schema(Some(&json!({"type": "json_schema"}))).unwrap_err().contains("missing"));
        assert!(schema(Some(&json!({"type": "yaml"}))).unwrap_err().contains("invalid"));
        let unenforced = json!({"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": true}}}}});
        let e = schema(Some(&unenforced)).unwrap_err();
        assert!(e.contains("properties.a.uniqueItems") && e.contains("cannot be enforced"), "{e}");
        let loose = json!({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "[a-z]+"}}});
        assert!(schema(Some(&loose)).unwrap_err().contains("anchored"));
        for (bad, word) in [
            (json!({"type": "string", "minLength": 543, "maxLength": 1}), "minLength = 543 is above maxLength = 1"),
            (json!({"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 1}), "minItems = 2"),
            (json!({"type": "string", "maxLength": 1_000_000}), "maxLength = 1000000"),
            (json!({"type": "string", "maxLength": -1}), "maxLength = -1"),
            (json!({"type": "integer", "minimum": 5, "maximum": 1}), "minimum = 5"),
            (json!({"type": "string", "pattern": "^\\d{2,1}$"}), "repetition {2,1}"),
            (json!({"type": "string", "pattern": "^a{99999}$"}), "repetition {99999}"),
        ] {
            let e = schema(Some(&json!({"type": "json_schema", "json_schema": {"schema": bad}}))).unwrap_err();
            assert!(e.contains(word), "{e}");
        }
        let fine = json!({"type": "string", "pattern": "^\\{x}\\d{2,4}$", "minLength": 2, "maxLength": 9});
        assert!(schema(Some(&json!({"type": "json_schema", "json_schema": {"schema": fine}}))).is_ok());
    }
}
