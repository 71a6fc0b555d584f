//! POP3 syntax for the sandbox server, as plain functions over bytes:
//! command lines, message numbers, byte-stuffing of multi-line responses
//! and the TOP cut. The socket loop in `super` reads lines and writes the
//! results. The XOAUTH2 / OAUTHBEARER payloads are read by the IMAP
//! sandbox's parsers, shared.

pub use crate::imap::syntax::{parse_oauthbearer, parse_xoauth2, trim_eol};

/// A command line, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command<'a> {
    /// The keyword, upper-cased: three or four letters (RFC 1939 section 3).
    pub name: String,
    /// Everything after the keyword and its space, verbatim (PASS takes it
    /// whole: a password may contain spaces).
    pub rest: Option<&'a [u8]>,
}

impl Command<'_> {
    /// The arguments, split on single spaces. `None` when the line is not
    /// well-formed: an empty argument (two spaces, trailing space) or one
    /// that is not printable ASCII.
    pub fn args(&self) -> Option<Vec<&str>> {
        let Some(rest) = self.rest else {
            return Some(Vec::new());
        };
        rest.split(|&b| b == b' ')
            .map(|arg| {
                if arg.is_empty() || !arg.iter().all(u8::is_ascii_graphic) {
                    return None;
                }
                std::str::from_utf8(arg).ok()
            })
            .collect()
    }
}

/// Splits a command line (without its line ending). `None` when the
/// keyword is not three or four ASCII letters.
pub fn parse_command(line: &[u8]) -> Option<Command<'_>> {
    let (keyword, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    if !(3..=4).contains(&keyword.len()) || !keyword.iter().all(u8::is_ascii_alphabetic) {
        return None;
    }
    Some(Command {
        name: String::from_utf8_lossy(keyword).to_ascii_uppercase(),
        rest,
    })
}

/// A message number: decimal digits, at least 1, no sign, no leading zero.
/// Returns the zero-based index.
pub fn message_index(arg: &str) -> Option<usize> {
    if arg.is_empty() || arg.len() > 9 || arg.starts_with('0') {
        return None;
    }
    if !arg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    arg.parse::<usize>().ok()?.checked_sub(1)
}

/// A non-negative line count for TOP.
pub fn line_count(arg: &str) -> Option<usize> {
    if arg.is_empty() || arg.len() > 9 || !arg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    arg.parse().ok()
}

/// Byte-stuffs a message for a multi-line response (RFC 1939 section 3):
/// a line that starts with `.` gets another `.` in front. Fed in chunks of
/// any size, so large messages never need a second full copy.
#[derive(Debug, Clone)]
pub struct Stuffer {
    /// The next byte starts a line.
    at_line_start: bool,
}

impl Default for Stuffer {
    fn default() -> Self {
        Stuffer {
            at_line_start: true,
        }
    }
}

impl Stuffer {
    /// Appends `data`, stuffed, to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let mut rest = data;
        while let Some(&first) = rest.first() {
            if self.at_line_start && first == b'.' {
                out.push(b'.');
            }
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    out.extend_from_slice(&rest[..=i]);
                    rest = &rest[i + 1..];
                    self.at_line_start = true;
                }
                None => {
                    out.extend_from_slice(rest);
                    self.at_line_start = false;
                    return;
                }
            }
        }
    }

    /// Ends the response: a CRLF if the data did not end a line, then the
    /// terminating `.` line.
    pub fn finish(self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// The end of the line that starts at `from` (just after its LF, or the
/// end of the data).
fn line_end(data: &[u8], from: usize) -> usize {
    data.get(from..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        .map_or(data.len(), |i| from + i + 1)
}

/// What TOP sends: the header, the empty line after it, and the first
/// `lines` lines of the body (RFC 1939 section 7). A message without an
/// empty line is all header.
pub fn top_part(message: &[u8], lines: usize) -> &[u8] {
    let mut pos = 0;
    let header_end = loop {
        if pos >= message.len() {
            return message;
        }
        let end = line_end(message, pos);
        let line = &message[pos..end];
        pos = end;
        if line == b"\r\n" || line == b"\n" {
            break end;
        }
    };
    let mut end = header_end;
    for _ in 0..lines {
        if end >= message.len() {
            break;
        }
        end = line_end(message, end);
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuff(chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = Stuffer::default();
        for c in chunks {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn stuffing() {
        assert_eq!(stuff(&[]), b".\r\n");
        assert_eq!(stuff(&[b"a\r\n"]), b"a\r\n.\r\n");
        assert_eq!(stuff(&[b"a"]), b"a\r\n.\r\n");
        assert_eq!(
            stuff(&[b".x\r\n..y\r\nz.\r\n.\r\n"]),
            b"..x\r\n...y\r\nz.\r\n..\r\n.\r\n"
        );
        // Chunk boundaries anywhere give the same bytes.
        let msg = b".a\r\n\r\n.\r\nb.c\r\n..\r\n";
        let whole = stuff(&[msg]);
        for cut in 0..msg.len() {
            assert_eq!(stuff(&[&msg[..cut], &msg[cut..]]), whole, "cut {cut}");
        }
        let bytes: Vec<&[u8]> = msg.chunks(1).collect();
        assert_eq!(stuff(&bytes), whole);
    }

    #[test]
    fn commands() {
        let c = parse_command(b"retr 1").unwrap();
        assert_eq!(c.name, "RETR");
        assert_eq!(c.args(), Some(vec!["1"]));
        let c = parse_command(b"PASS  two  spaces ").unwrap();
        assert_eq!(c.rest, Some(&b" two  spaces "[..]));
        assert_eq!(c.args(), None);
        assert_eq!(parse_command(b"STAT").unwrap().args(), Some(vec![]));
        assert_eq!(parse_command(b"TOP 1 ").unwrap().args(), None);
        assert_eq!(parse_command(b"TOP 1 \x01").unwrap().args(), None);
        for bad in [&b""[..], b"AB", b"ABCDE", b"R3TR 1", b" STAT", b"\xffSTA"] {
            assert_eq!(parse_command(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(message_index("1"), Some(0));
        assert_eq!(message_index("42"), Some(41));
        for bad in ["", "0", "01", "-1", "+1", "1a", "9999999999"] {
            assert_eq!(message_index(bad), None, "{bad}");
        }
        assert_eq!(line_count("0"), Some(0));
        assert_eq!(line_count("10"), Some(10));
        assert_eq!(line_count("x"), None);
    }

    #[test]
    fn top() {
        let msg = b"Subject: a\r\nFrom: b\r\n\r\nline1\r\nline2\r\nline3\r\n";
        assert_eq!(top_part(msg, 0), b"Subject: a\r\nFrom: b\r\n\r\n");
        assert_eq!(
            top_part(msg, 2),
            b"Subject: a\r\nFrom: b\r\n\r\nline1\r\nline2\r\n"
        );
        assert_eq!(top_part(msg, 99), msg);
        assert_eq!(top_part(b"Subject: only\r\n", 5), b"Subject: only\r\n");
        assert_eq!(top_part(b"\r\nbody\r\n", 0), b"\r\n");
        assert_eq!(top_part(b"", 3), b"");
        assert_eq!(top_part(b"H: x\n\nb1\nb2", 1), b"H: x\n\nb1\n");
    }
}
