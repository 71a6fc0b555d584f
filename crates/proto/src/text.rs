//! Text that goes on one line: what a server said, a reason we give, a
//! name a client typed. Every reply line mailbridge writes and every
//! reason it logs passes through here, so a CR, LF or control character
//! from a peer can never end a reply early or start a forged one.
//!
//! Three shapes, for three uses:
//! - [`one_line`] for text inside a protocol reply: printable ASCII only
//!   (replies are 7-bit), bounded, never empty;
//! - [`flatten`] for reasons and log messages: whitespace collapsed, any
//!   Unicode kept, bounded with an ellipsis;
//! - [`printable`] for a name echoed back: control characters dropped.

/// How many characters of text [`one_line`] keeps: a reply line stays well
/// under the 512 octets SMTP allows (RFC 5321) and that IMAP and POP3
/// servers commonly accept.
pub const MAX_TEXT: usize = 300;

/// Text for a protocol reply, on one line: control characters become
/// spaces, other non-ASCII characters `?`; at most [`MAX_TEXT`]
/// characters, trimmed; `fallback` when nothing is left.
pub fn one_line(text: &str, fallback: &str) -> String {
    one_line_within(text, fallback, MAX_TEXT)
}

/// [`one_line`] with another bound on the number of characters.
pub fn one_line_within(text: &str, fallback: &str, max_chars: usize) -> String {
    let clean: String = text
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else if c.is_control() {
                ' '
            } else {
                '?'
            }
        })
        .take(max_chars)
        .collect();
    let clean = clean.trim();
    if clean.is_empty() {
        fallback.to_owned()
    } else {
        clean.to_owned()
    }
}

/// A reason or message on one line: runs of whitespace (line breaks
/// included) become one space; longer than 300 characters, it is cut to
/// 297 and ends with `...`.
pub fn flatten(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 300 {
        let mut t: String = flat.chars().take(297).collect();
        t.push_str("...");
        t
    } else {
        flat
    }
}

/// A name as it may be echoed in a reply: control characters dropped, at
/// most `max_chars` characters.
pub fn printable(text: &str, max_chars: usize) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(max_chars)
        .collect()
}

/// A line without its line ending (CRLF, or a bare LF we tolerate).
pub fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_keeps_replies_on_one_line() {
        assert_eq!(
            one_line("Wrong password\r\nx9 OK injected", "-"),
            "Wrong password  x9 OK injected"
        );
        assert_eq!(one_line("  j\u{f6}rg\t ", "-"), "j?rg");
        assert_eq!(one_line(" \r\n", "Login failed"), "Login failed");
        assert_eq!(one_line(&"x".repeat(1000), "").len(), MAX_TEXT);
        assert_eq!(one_line_within(&"x".repeat(1000), "", 400).len(), 400);
    }

    #[test]
    fn flatten_collapses_and_bounds() {
        assert_eq!(flatten(" a\r\n  b\tc "), "a b c");
        assert_eq!(flatten("caf\u{e9}"), "caf\u{e9}");
        let long = flatten(&"y".repeat(500));
        assert_eq!(long.chars().count(), 300);
        assert!(long.ends_with("..."));
        assert_eq!(flatten(&"z".repeat(300)), "z".repeat(300));
    }

    #[test]
    fn printable_drops_controls() {
        assert_eq!(printable("al\r\nice\u{7f}", 100), "alice");
        assert_eq!(printable(&"u".repeat(200), 100).len(), 100);
    }

    #[test]
    fn strip_eol_forms() {
        assert_eq!(strip_eol(b"a\r\n"), b"a");
        assert_eq!(strip_eol(b"a\n"), b"a");
        assert_eq!(strip_eol(b"a\r"), b"a");
        assert_eq!(strip_eol(b"a\r\r\n"), b"a\r");
        assert_eq!(strip_eol(b""), b"");
    }
}
