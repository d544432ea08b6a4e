//! Response heuristics: the text of each finished generation nudges the mood.
//!
//! Whole words only (the predecessor's substring test counted "renew" as
//! "new" and "undone" as "done").

/// The rules in priority order: the first rule with a word in the text applies.
const RULES: [(&[&str], &str, f64); 4] = [
    (&["successfully", "completed", "done", "fixed", "working"], "success", 0.5),
    (&["error", "failed", "cannot", "unable", "exception"], "error", 0.5),
    (&["interesting", "discover", "learn", "new", "found"], "exploration", 0.3),
    (&["unsure", "uncertain", "might", "perhaps", "unclear"], "novelty", 0.2),
];

/// The event (name, intensity) that `text` triggers, if any.
pub fn response_event(text: &str) -> Option<(&'static str, f64)> {
    let lowered = text.to_lowercase();
    let words: Vec<&str> = lowered
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    RULES
        .iter()
        .find(|(keys, _, _)| words.iter().any(|w| keys.contains(w)))
        .map(|(_, event, intensity)| (*event, *intensity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_rule_wins() {
        assert_eq!(response_event("Done, but an error remains"), Some(("success", 0.5)));
        assert_eq!(response_event("It FAILED."), Some(("error", 0.5)));
        assert_eq!(response_event("I found something"), Some(("exploration", 0.3)));
        assert_eq!(response_event("perhaps later"), Some(("novelty", 0.2)));
        assert_eq!(response_event("hello there"), None);
        assert_eq!(response_event(""), None);
    }

    #[test]
    fn whole_words_only() {
        assert_eq!(response_event("we renew the undone work"), None);
        assert_eq!(response_event("errors everywhere"), None);
        assert_eq!(response_event("(new)"), Some(("exploration", 0.3)));
    }
}
