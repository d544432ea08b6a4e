//! Detokenisation: token pieces arrive as bytes, possibly splitting a UTF-8
//! character; the text handed out must always be valid UTF-8 and must never
//! show a stop string (an end-of-turn marker) or a prefix of one that may
//! still complete. Pure; tested without a model.

use crate::prompt::call_guard::partial_marker;

/// Turns a stream of byte pieces into safe text chunks.
#[derive(Debug, Default)]
pub struct TextDecoder {
    /// Bytes of an incomplete UTF-8 sequence, waiting for the next piece.
    pending: Vec<u8>,
    /// Decoded text not yet emitted because it may begin a stop string.
    held: String,
    /// Strings that end the generation; never emitted.
    stops: Vec<String>,
    /// Set once a stop string was seen (which one); later pushes emit nothing.
    stopped: Option<usize>,
}

/// What one piece produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Text safe to hand out now (possibly empty).
    pub text: String,
    /// A stop string was reached: the generation is over.
    pub stopped: bool,
}

impl TextDecoder {
    pub fn new(stops: Vec<String>) -> Self {
        TextDecoder { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Default::default() }
    }

    /// Add the bytes of one token piece.
    /// The stop string that ended the text, once one did.
    pub fn stopped_by(&self) -> Option<&str> {
        self.stopped.map(|i| self.stops[i].as_str())
    }

    pub fn push(&mut self, bytes: &[u8]) -> Decoded {
        if self.stopped.is_some() {
            return Decoded { text: String::new(), stopped: true };
        }
        self.pending.extend_from_slice(bytes);
        let decoded = take_valid_utf8(&mut self.pending);
        self.held.push_str(&decoded);
        self.release()
    }

    /// The generation ended: hand out whatever is held (an incomplete
    /// character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        if self.stopped.is_some() {
            return String::new();
        }
        if !self.pending.is_empty() {
            self.held.push_str(&String::from_utf8_lossy(&self.pending));
            self.pending.clear();
        }
        // A stop string may have completed only through the lossy tail.
        let Decoded { text, .. } = self.release();
        let rest = std::mem::take(&mut self.held);
        text + &rest
    }

    fn release(&mut self) -> Decoded {
        let first = self.stops.iter().enumerate().filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i))).min();
        if let Some((at, i)) = first {
            let text = self.held[..at].to_string();
            self.held.clear();
            self.stopped = Some(i);
            return Decoded { text, stopped: true };
        }
        // Keep back the longest suffix that is a proper prefix of a stop string.
        let keep = self
            .stops
            .iter()
            .map(|stop| partial_marker(&self.held, stop))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Decoded { text, stopped: false }
    }
}

/// Remove and return the longest valid UTF-8 prefix of `bytes`; invalid
/// sequences become U+FFFD, an incomplete tail stays in `bytes`.
fn take_valid_utf8(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                bytes.clear();
                return out;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // Safe: `valid` bytes were just checked.
                out.push_str(std::str::from_utf8(&bytes[..valid]).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        bytes.drain(..valid + bad);
                    }
                    None => {
                        bytes.drain(..valid);
                        return out;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_multibyte_characters_are_joined() {
        let mut d = TextDecoder::new(vec![]);
        let snow = "☃".as_bytes(); // 3 bytes
        assert_eq!(d.push(&snow[..1]).text, "");
        assert_eq!(d.push(&snow[1..2]).text, "");
        assert_eq!(d.push(&[snow[2], b'!']).text, "☃!");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut d = TextDecoder::new(vec![]);
        assert_eq!(d.push(&[b'a', 0xff, b'b']).text, "a\u{fffd}b");
        assert_eq!(d.push(&[0xe2, 0x98]).text, "");
        assert_eq!(d.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_string_across_pieces_is_never_emitted() {
        let mut d = TextDecoder::new(vec!["<end_of_turn>".into()]);
        assert_eq!(d.push(b"Hello <end"), Decoded { text: "Hello ".into(), stopped: false });
        assert_eq!(d.push(b"_of_turn> more"), Decoded { text: "".into(), stopped: true });
        assert_eq!(d.push(b"ignored").text, "");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn held_prefix_released_when_it_diverges() {
        let mut d = TextDecoder::new(vec!["<end_of_turn>".into()]);
        assert_eq!(d.push(b"a <").text, "a ");
        assert_eq!(d.push(b"b").text, "<b");
        assert_eq!(d.push(b"<en").text, "");
        assert_eq!(d.finish(), "<en");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut d = TextDecoder::new(vec!["<b>".into(), "<a>".into()]);
        assert_eq!(d.stopped_by(), None);
        let out = d.push(b"x<a>y<b>");
        assert_eq!(out, Decoded { text: "x".into(), stopped: true });
        assert_eq!(d.stopped_by(), Some("<a>"));
    }

    #[test]
    fn concatenation_equals_whole_text() {
        let text = "Grüße, 世界! 🎉 done";
        let bytes = text.as_bytes();
        let mut d = TextDecoder::new(vec!["<|im_end|>".into()]);
        let mut out = String::new();
        for chunk in bytes.chunks(1) {
            out.push_str(&d.push(chunk).text);
        }
        out.push_str(&d.finish());
        assert_eq!(out, text);
    }
}
