//! [`CallGuard`]: the text of a reply that may call tools, as it streams.
//! Text streams as it comes; a tool call's markup does not. From the point
//! where a call may begin (the format's marker anywhere, or a bare or
//! fenced JSON object opening the reply), text is held back until the
//! reply is complete and parsed: what turned out to be a call is never
//! shown as text, what was text after all is released. Pure.

use super::native_tools::NativeToolFormat;

/// Where calls may begin, for a native format (None: the generic path,
/// where the whole reply is a JSON array of calls).
fn markers(format: Option<NativeToolFormat>) -> &'static [&'static str] {
    match format {
        Some(NativeToolFormat::Hermes) => &["<tool_call>"],
        Some(NativeToolFormat::Llama3) => &["<|python_tag|>"],
        Some(NativeToolFormat::Mistral) => &["[TOOL_CALLS]"],
        None => &[],
    }
}

/// Formats whose calls may also open the reply as a bare (or fenced) JSON object.
fn bare_opening(format: Option<NativeToolFormat>) -> bool {
    matches!(format, Some(NativeToolFormat::Hermes | NativeToolFormat::Llama3))
}

#[derive(Debug)]
pub struct CallGuard {
    format: Option<NativeToolFormat>,
    /// Text received, not released yet.
    held: String,
    /// A call may have begun: hold everything from here to the end.
    holding: bool,
    /// Anything was released (the reply's opening is decided).
    released_any: bool,
}

impl CallGuard {
    pub fn new(format: Option<NativeToolFormat>) -> CallGuard {
        // The generic path writes nothing but calls.
        CallGuard { format, held: String::new(), holding: format.is_none(), released_any: false }
    }

    /// Text that arrived; returns what may be shown now.
    pub fn push(&mut self, text: &str) -> String {
        self.held.push_str(text);
        if self.holding {
            return String::new();
        }
        // A reply that opens like a JSON call (after whitespace) is held.
        if !self.released_any && bare_opening(self.format) {
            let start = self.held.trim_start();
            if start.is_empty() {
                return String::new();
            }
            if start.starts_with('{') || start.starts_with('`') {
                self.holding = true;
                return String::new();
            }
        }
        if let Some(at) = markers(self.format).iter().filter_map(|m| self.held.find(m)).min() {
            self.holding = true;
            let out: String = self.held.drain(..at).collect();
            self.released_any |= !out.is_empty();
            return out;
        }
        // Keep back a tail that may still become a marker.
        let keep = markers(self.format).iter().map(|m| partial_marker(&self.held, m)).max().unwrap_or(0);
        let cut = self.held.len() - keep;
        let out: String = self.held.drain(..cut).collect();
        self.released_any |= !out.is_empty();
        out
    }

    /// The reply is complete: `had_calls` says whether parsing found calls.
    /// Returns the held text that was not a call after all.
    pub fn finish(&mut self, had_calls: bool) -> String {
        let held = std::mem::take(&mut self.held);
        if had_calls {
            String::new()
        } else {
            held
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of
/// `marker`, on a char boundary: what to hold back in case the marker (a
/// call's markup, a stop string) completes in the next piece.
pub fn partial_marker(text: &str, marker: &str) -> usize {
    let max = text.len().min(marker.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(format: Option<NativeToolFormat>, pieces: &[&str], had_calls: bool) -> (String, String) {
        let mut g = CallGuard::new(format);
        let shown: String = pieces.iter().map(|p| g.push(p)).collect();
        (shown, g.finish(had_calls))
    }

    #[test]
    fn text_streams_and_call_markup_does_not() {
        let hermes = Some(NativeToolFormat::Hermes);
        // Words, then a call split over pieces: the words stream, the call never.
        let (shown, rest) = run(hermes, &["Let me check.", "\n<tool", "_call>\n{\"name\"", ": \"x\"}\n</tool_call>"], true);
        assert_eq!((shown.as_str(), rest.as_str()), ("Let me check.\n", ""));
        // A bare JSON call opening the reply.
        let (shown, rest) = run(hermes, &["  ", "{\"name\": ", "\"x\", \"arguments\": {}}"], true);
        assert_eq!((shown.as_str(), rest.as_str()), ("", ""));
        // Text that only looked like a call opening is released at the end.
        let (shown, rest) = run(hermes, &["{not a call} but words"], false);
        assert_eq!(format!("{shown}{rest}"), "{not a call} but words");
        // A held-back partial marker that diverges is released at once.
        let mut g = CallGuard::new(hermes);
        assert_eq!(g.push("a <to"), "a ");
        assert_eq!(g.push("e"), "<toe");
        // The generic path streams nothing but what was not a call.
        assert_eq!(run(None, &["[{\"name\": \"x\"}]"], true), (String::new(), String::new()));
    }
}
