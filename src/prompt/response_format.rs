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
    }
}
