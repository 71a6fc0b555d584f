//! Why a server ended a relayed session, read from the last bytes it sent
//! before it closed: IMAP's `* BYE` (Microsoft's `* BYE Session
//! invalidated - AccessTokenExpired`), POP3's `-ERR`, SMTP's `421` (or
//! another 4xx/5xx reply it closed after).
//!
//! The relay never parses: it keeps the last few hundred bytes the server
//! sent and hands them here once the server closed first. A [`Tail`] may
//! begin in the middle of a line (the relay keeps a bounded window), so
//! its first line is read only when the tail holds everything the server
//! sent after login.

use crate::text;

/// The last bytes a server sent before it closed the connection.
#[derive(Debug, Clone, Copy)]
pub struct Tail<'a> {
    /// The bytes, oldest first.
    pub bytes: &'a [u8],
    /// True when `bytes` starts at a line start (it holds all the server
    /// sent since the login), false when older bytes were dropped and the
    /// first line may be a fragment.
    pub from_line_start: bool,
}

/// Reads the reason from a server's tail, for one protocol.
pub type Reader = fn(Tail<'_>) -> Option<String>;

impl<'a> Tail<'a> {
    /// The complete lines (without their line endings), oldest first; a
    /// last line without a line ending counts (a server may close right
    /// after its words), a leading fragment does not.
    fn lines(self) -> Vec<&'a [u8]> {
        let mut lines: Vec<&[u8]> = self.bytes.split(|&b| b == b'\n').collect();
        if !self.from_line_start && !lines.is_empty() {
            lines.remove(0);
        }
        lines
            .into_iter()
            .map(text::strip_eol)
            .filter(|l| !l.is_empty())
            .collect()
    }
}

/// The server's words on one line, for a log.
fn quote(bytes: &[u8]) -> Option<String> {
    let said = text::flatten(&text::one_line(&String::from_utf8_lossy(bytes), ""));
    (!said.is_empty()).then_some(said)
}

/// `rest` when `line` starts with `word` (ASCII case-insensitive) followed
/// by a space or nothing.
fn after_word<'l>(line: &'l [u8], word: &[u8]) -> Option<&'l [u8]> {
    let head = line.get(..word.len())?;
    if !head.eq_ignore_ascii_case(word) {
        return None;
    }
    match &line[word.len()..] {
        [] => Some(&[]),
        [b' ', rest @ ..] => Some(rest),
        _ => None,
    }
}

/// IMAP: the text of the last `* BYE` (response code included), unless a
/// tagged `OK` follows it: that is a LOGOUT the client asked for, not the
/// server ending the session.
pub fn imap(tail: Tail<'_>) -> Option<String> {
    let lines = tail.lines();
    let at = lines
        .iter()
        .rposition(|l| after_word(l, b"*").is_some_and(|r| after_word(r, b"BYE").is_some()))?;
    let logout_completed = lines[at + 1..].iter().any(|l| {
        !l.starts_with(b"*")
            && !l.starts_with(b"+")
            && l.split(|&b| b == b' ')
                .nth(1)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"OK"))
    });
    if logout_completed {
        return None;
    }
    let text = after_word(after_word(lines[at], b"*")?, b"BYE")?;
    Some(quote(text).unwrap_or_else(|| "BYE".to_owned()))
}

/// POP3: the last line, when it is an `-ERR` (the text after it).
pub fn pop3(tail: Tail<'_>) -> Option<String> {
    let last = *tail.lines().last()?;
    let text = after_word(last, b"-ERR")?;
    Some(quote(text).unwrap_or_else(|| "-ERR".to_owned()))
}

/// SMTP: the last reply, when it is a 4xx or 5xx (`421 4.4.2 Timeout`):
/// its code and text, multi-line replies joined.
pub fn smtp(tail: Tail<'_>) -> Option<String> {
    let lines = tail.lines();
    let code_of = |l: &[u8]| -> Option<u16> {
        let digits = l.get(..3)?;
        if !digits.iter().all(u8::is_ascii_digit) || !matches!(l.get(3), None | Some(b' ' | b'-')) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    let last = *lines.last()?;
    let code = code_of(last)?;
    if !(400..600).contains(&code) {
        return None;
    }
    // The reply's lines: the continuation lines (`421-...`) before the last.
    let mut first = lines.len() - 1;
    while first > 0
        && code_of(lines[first - 1]) == Some(code)
        && lines[first - 1].get(3) == Some(&b'-')
    {
        first -= 1;
    }
    let text: Vec<&[u8]> = lines[first..]
        .iter()
        .map(|l| l.get(4..).unwrap_or_default())
        .collect();
    let joined = text.join(&b' ');
    Some(match quote(&joined) {
        Some(t) => format!("{code} {t}"),
        None => code.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(bytes: &[u8]) -> Tail<'_> {
        Tail {
            bytes,
            from_line_start: true,
        }
    }

    fn cut(bytes: &[u8]) -> Tail<'_> {
        Tail {
            bytes,
            from_line_start: false,
        }
    }

    #[test]
    fn imap_bye_from_microsoft() {
        assert_eq!(
            imap(whole(b"* BYE Session invalidated - AccessTokenExpired\r\n")).as_deref(),
            Some("Session invalidated - AccessTokenExpired")
        );
        // After other traffic, with a response code, no final CRLF.
        assert_eq!(
            imap(cut(
                b"ENTS)\r\n* 3 EXISTS\r\n* bye [UNAVAILABLE] going down"
            ))
            .as_deref(),
            Some("[UNAVAILABLE] going down")
        );
        assert_eq!(imap(whole(b"* BYE\r\n")).as_deref(), Some("BYE"));
    }

    #[test]
    fn imap_logout_and_other_endings_say_nothing() {
        assert_eq!(
            imap(whole(
                b"* BYE Microsoft Exchange Server IMAP4 server signing off.\r\na9 OK LOGOUT completed.\r\n"
            )),
            None
        );
        assert_eq!(imap(whole(b"a1 OK NOOP completed\r\n")), None);
        assert_eq!(imap(whole(b"")), None);
        // A fragment that happens to look like a BYE is not read.
        assert_eq!(imap(cut(b"* BYE in a message body\r\n")), None);
        // BYE inside other words is not a BYE.
        assert_eq!(imap(whole(b"* BYEBYE\r\n")), None);
    }

    #[test]
    fn pop3_err_as_last_line() {
        assert_eq!(
            pop3(whole(
                b"+OK\r\n-ERR [SYS/TEMP] Disconnected for inactivity.\r\n"
            ))
            .as_deref(),
            Some("[SYS/TEMP] Disconnected for inactivity.")
        );
        assert_eq!(pop3(whole(b"-ERR\r\n")).as_deref(), Some("-ERR"));
        assert_eq!(pop3(whole(b"-ERR no such message\r\n+OK bye\r\n")), None);
        assert_eq!(pop3(whole(b"-ERRATA\r\n")), None);
    }

    #[test]
    fn smtp_final_error_replies() {
        assert_eq!(
            smtp(whole(
                b"250 2.0.0 OK\r\n421 4.4.2 Connection dropped due to timeout\r\n"
            ))
            .as_deref(),
            Some("421 4.4.2 Connection dropped due to timeout")
        );
        assert_eq!(
            smtp(whole(
                b"250 OK\r\n421-4.3.2 Service shutting down\r\n421 4.3.2 try later\r\n"
            ))
            .as_deref(),
            Some("421 4.3.2 Service shutting down 4.3.2 try later")
        );
        assert_eq!(smtp(whole(b"221 2.0.0 Bye\r\n")), None);
        assert_eq!(smtp(whole(b"250 OK\r\n")), None);
        assert_eq!(smtp(whole(b"4210 nope\r\n")), None);
        assert_eq!(smtp(whole(b"421\r\n")).as_deref(), Some("421"));
    }

    #[test]
    fn never_panics_on_any_tail() {
        let mut seed = 7u64;
        for _ in 0..2000 {
            let len = (seed % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    b"* BYE-ERR421 \r\nOKa1"[((seed >> 33) as usize + i) % 19]
                })
                .collect();
            for from_line_start in [true, false] {
                let t = Tail {
                    bytes: &bytes,
                    from_line_start,
                };
                let _ = (imap(t), pop3(t), smtp(t));
            }
        }
    }
}
