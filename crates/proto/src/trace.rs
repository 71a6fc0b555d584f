//! Redacted renderings of a login dialogue, for `mailbridge trace`.
//!
//! A trace shows what a client and mailbridge, and mailbridge and the
//! upstream server, said to each other before the byte relay, one line at
//! a time; nothing that proves an identity is shown. What is a credential
//! is decided here, where the protocols are understood: the I/O code hands
//! over the bytes it moved and passes the renderings on.
//!
//! - [`render_client`] and [`render_server`] are the pure functions: one
//!   line of the side that logs in (a mail client, or mailbridge logging in
//!   upstream) and one line of the side that answers, rendered with the
//!   credentials replaced by [`REDACTED`]. [`Exchange`] is what they carry
//!   from line to line: a SASL exchange or an IMAP literal under way makes
//!   the next lines of the side that logs in responses, redacted whole.
//! - [`Transcript`] cuts bytes as they were read or written into lines
//!   (and IMAP literals) and renders them; it keeps at most
//!   [`MAX_KEPT`] bytes of a line and wipes them when done.
//!
//! Redacted: IMAP `LOGIN`'s password (and everything after a literal user
//! name), `AUTHENTICATE`'s initial response and every continuation line
//! until the tagged answer; POP3 `PASS`, `APOP`'s digest, `AUTH`'s initial
//! response and continuation lines until `+OK`/`-ERR`; SMTP `AUTH`'s
//! initial response and every line until a reply other than `334`. The
//! rules are prefix-safe: a line cut at [`MAX_KEPT`] bytes is redacted at
//! least as much as the whole line would be.

use secrecy::zeroize::Zeroize;

/// What replaces a credential.
pub const REDACTED: &str = "[redacted]";

/// How many bytes of one line a [`Transcript`] keeps (the rest is counted
/// and said to be left out).
pub const MAX_KEPT: usize = 1024;

/// How many characters of a rendered line are shown.
pub const MAX_SHOWN: usize = 300;

/// The protocol of a dialogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// IMAP4rev1/rev2.
    Imap,
    /// POP3.
    Pop3,
    /// SMTP submission.
    Smtp,
}

/// What one line tells about the next ones: carried between the lines of
/// one dialogue (both sides).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// A login exchange is under way: lines of the side that logs in are
    /// SASL responses (or a login's literal), redacted whole, until the
    /// answering side's final reply.
    pub credentials: bool,
}

/// A line of the side that logs in (`line` without or with its line
/// ending), rendered with credentials redacted.
pub fn render_client(protocol: Protocol, line: &[u8], exchange: &mut Exchange) -> String {
    let line = crate::text::strip_eol(line);
    if exchange.credentials {
        return REDACTED.to_string();
    }
    let text = String::from_utf8_lossy(line);
    let rendered = match protocol {
        Protocol::Imap => imap_client(&text, exchange),
        Protocol::Pop3 => pop3_client(&text, exchange),
        Protocol::Smtp => smtp_client(&text, exchange),
    };
    shown(&rendered)
}

/// A line of the answering side (a mail server, or mailbridge answering a
/// client), rendered; a final reply ends a login exchange.
pub fn render_server(protocol: Protocol, line: &[u8], exchange: &mut Exchange) -> String {
    let line = crate::text::strip_eol(line);
    let text = String::from_utf8_lossy(line);
    if exchange.credentials {
        let continues = match protocol {
            // `+ ...` continues; untagged data does not end it either.
            Protocol::Imap => text.starts_with('+') || text.starts_with('*'),
            // `+ ...` continues; `+OK` ends it.
            Protocol::Pop3 => text == "+" || text.starts_with("+ "),
            Protocol::Smtp => text.starts_with("334"),
        };
        if !continues {
            exchange.credentials = false;
        }
    }
    shown(&text)
}

/// The words of a line: (first, rest after one run of spaces).
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once(' ') {
        Some((w, rest)) => (w, rest.trim_start_matches(' ')),
        None => (s, ""),
    }
}

fn imap_client(text: &str, exchange: &mut Exchange) -> String {
    let (tag, rest) = split_word(text);
    let (verb, args) = split_word(rest);
    if verb.eq_ignore_ascii_case("LOGIN") {
        let shown_user = imap_astring(args);
        let announces_literal = literal_announced(text.as_bytes()).is_some();
        return match shown_user {
            // `{n}`: the user name comes as a literal, and the password
            // after it; everything until the answer is redacted.
            Some((user, _)) if user.starts_with('{') => {
                exchange.credentials = true;
                format!("{tag} {verb} {user}")
            }
            Some((user, after)) => {
                if announces_literal {
                    exchange.credentials = true;
                }
                if after.is_empty() {
                    format!("{tag} {verb} {user}")
                } else {
                    format!("{tag} {verb} {user} {REDACTED}")
                }
            }
            None if args.is_empty() => format!("{tag} {verb}"),
            None => {
                if announces_literal {
                    exchange.credentials = true;
                }
                format!("{tag} {verb} {REDACTED}")
            }
        };
    }
    if verb.eq_ignore_ascii_case("AUTHENTICATE") {
        exchange.credentials = true;
        let (mechanism, response) = split_word(args);
        return if response.is_empty() {
            format!("{tag} {verb} {mechanism}")
        } else {
            format!("{tag} {verb} {mechanism} {REDACTED}")
        };
    }
    text.to_string()
}

/// An IMAP astring at the start of `s`: an atom, a whole quoted string
/// (escapes kept as sent), or a literal announcement `{n}` / `{n+}`; with
/// what follows it. None when it is cut or malformed.
fn imap_astring(s: &str) -> Option<(&str, &str)> {
    let end = if s.starts_with('"') {
        let bytes = s.as_bytes();
        let mut i = 1;
        loop {
            match bytes.get(i)? {
                b'\\' => i += 2,
                b'"' => break i + 1,
                _ => i += 1,
            }
        }
    } else if s.starts_with('{') {
        s.find('}')? + 1
    } else {
        s.find(' ').unwrap_or(s.len())
    };
    if end == 0 || end > s.len() {
        return None;
    }
    let after = &s[end..];
    if !(after.is_empty() || after.starts_with(' ')) {
        return None;
    }
    Some((&s[..end], after.trim_start_matches(' ')))
}

/// The size of an IMAP literal `line` announces at its end (`{n}` or
/// `{n+}`, the line ending stripped or not).
pub fn literal_announced(line: &[u8]) -> Option<u64> {
    let line = crate::text::strip_eol(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn pop3_client(text: &str, exchange: &mut Exchange) -> String {
    let (verb, args) = split_word(text);
    if verb.eq_ignore_ascii_case("PASS") {
        return if args.is_empty() {
            verb.to_string()
        } else {
            format!("{verb} {REDACTED}")
        };
    }
    if verb.eq_ignore_ascii_case("APOP") {
        let (name, digest) = split_word(args);
        return if digest.is_empty() {
            format!("{verb} {name}")
        } else {
            format!("{verb} {name} {REDACTED}")
        };
    }
    if verb.eq_ignore_ascii_case("AUTH") && !args.is_empty() {
        // `AUTH` alone lists mechanisms; with one, an exchange starts.
        exchange.credentials = true;
        let (mechanism, response) = split_word(args);
        return if response.is_empty() {
            format!("{verb} {mechanism}")
        } else {
            format!("{verb} {mechanism} {REDACTED}")
        };
    }
    text.to_string()
}

fn smtp_client(text: &str, exchange: &mut Exchange) -> String {
    let (verb, args) = split_word(text);
    if verb.eq_ignore_ascii_case("AUTH") {
        exchange.credentials = true;
        let (mechanism, response) = split_word(args);
        return if response.is_empty() {
            format!("{verb} {mechanism}").trim_end().to_string()
        } else {
            format!("{verb} {mechanism} {REDACTED}")
        };
    }
    text.to_string()
}

/// `text` with control characters escaped, at most [`MAX_SHOWN`]
/// characters of it (escapes counted as written).
fn shown(text: &str) -> String {
    let mut out = String::new();
    let mut written = 0;
    for c in text.chars() {
        let piece = if c.is_control() {
            c.escape_default().to_string()
        } else {
            c.to_string()
        };
        let len = piece.chars().count();
        if written + len > MAX_SHOWN {
            out.push_str(&format!(
                " ... ({} characters in all)",
                text.chars().count()
            ));
            break;
        }
        out.push_str(&piece);
        written += len;
    }
    out
}

/// Which side a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that logs in (a mail client; mailbridge, upstream).
    LogsIn,
    /// The side that answers (mailbridge, to a client; the server).
    Answers,
}

/// How a side's lines are rendered.
type Render = fn(Protocol, &[u8], &mut Exchange) -> String;

/// One side's unfinished line.
#[derive(Default)]
struct Partial {
    /// Up to [`MAX_KEPT`] bytes of the line.
    kept: Vec<u8>,
    /// Bytes of the line beyond those.
    left_out: usize,
    /// IMAP (side that logs in): literal bytes still to come.
    literal: u64,
    /// The literal bytes of the line so far (never shown).
    literal_bytes: u64,
    /// This line continues a command after a literal.
    continued: bool,
}

impl Partial {
    fn push(&mut self, byte: u8) {
        if self.kept.len() < MAX_KEPT {
            self.kept.push(byte);
        } else {
            self.left_out += 1;
        }
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        self.kept.zeroize();
    }
}

/// A dialogue as it happens: bytes of either side in, rendered lines out.
/// Pure (no I/O); the driver calls it with what it read and wrote.
pub struct Transcript {
    protocol: Protocol,
    exchange: Exchange,
    logs_in: Partial,
    answers: Partial,
}

impl std::fmt::Debug for Transcript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcript")
            .field("protocol", &self.protocol)
            .field("exchange", &self.exchange)
            .finish_non_exhaustive()
    }
}

impl Transcript {
    /// An empty transcript of `protocol`.
    pub fn new(protocol: Protocol) -> Transcript {
        Transcript {
            protocol,
            exchange: Exchange::default(),
            logs_in: Partial::default(),
            answers: Partial::default(),
        }
    }

    /// The lines `bytes` from `side` complete, rendered.
    pub fn push(&mut self, side: Side, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let imap_literals = side == Side::LogsIn && self.protocol == Protocol::Imap;
        let mut i = 0;
        while i < bytes.len() {
            let partial = match side {
                Side::LogsIn => &mut self.logs_in,
                Side::Answers => &mut self.answers,
            };
            if partial.literal > 0 {
                let n = (partial.literal as usize).min(bytes.len() - i);
                partial.literal -= n as u64;
                partial.literal_bytes += n as u64;
                i += n;
                continue;
            }
            let byte = bytes[i];
            i += 1;
            if byte != b'\n' {
                partial.push(byte);
                continue;
            }
            let literal = if imap_literals && partial.left_out == 0 {
                literal_announced(&partial.kept)
            } else {
                None
            };
            out.push(self.render(side));
            let partial = match side {
                Side::LogsIn => &mut self.logs_in,
                Side::Answers => &mut self.answers,
            };
            partial.kept.zeroize();
            partial.kept.clear();
            partial.left_out = 0;
            partial.literal_bytes = 0;
            partial.continued = literal.is_some();
            partial.literal = literal.unwrap_or(0);
        }
        out
    }

    fn render(&mut self, side: Side) -> String {
        let (partial, render): (&Partial, Render) = match side {
            Side::LogsIn => (&self.logs_in, render_client),
            Side::Answers => (&self.answers, render_server),
        };
        let mut text = if partial.continued {
            // The rest of a command after a literal: the literal's bytes
            // are never shown; the rest only when no credential is under
            // way.
            let rest = if self.exchange.credentials {
                REDACTED.to_string()
            } else {
                shown(&String::from_utf8_lossy(crate::text::strip_eol(
                    &partial.kept,
                )))
            };
            format!("{{{} literal bytes}}{rest}", partial.literal_bytes)
        } else {
            render(self.protocol, &partial.kept, &mut self.exchange)
        };
        if partial.left_out > 0 {
            text.push_str(&format!(" ... ({} more bytes not kept)", partial.left_out));
        }
        text
    }

    /// Starts over (after a TLS handshake: what was said in clear before
    /// is over).
    pub fn reset(&mut self) {
        self.exchange = Exchange::default();
        self.logs_in = Partial::default();
        self.answers = Partial::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn plain(user: &str, password: &str) -> String {
        b64(&format!("\0{user}\0{password}"))
    }

    fn client(protocol: Protocol, line: &str) -> (String, Exchange) {
        let mut e = Exchange::default();
        (render_client(protocol, line.as_bytes(), &mut e), e)
    }

    #[test]
    fn imap_login_shows_the_user_not_the_password() {
        let (r, e) = client(Protocol::Imap, "a1 LOGIN alice s3cret\r\n");
        assert_eq!(r, "a1 LOGIN alice [redacted]");
        assert!(!e.credentials);
        let (r, _) = client(Protocol::Imap, r#"a1 login "al ice" "pa \"ss\" w0rd""#);
        assert_eq!(r, r#"a1 login "al ice" [redacted]"#);
        // A quoted user cut short: nothing after the verb is shown.
        let (r, _) = client(Protocol::Imap, r#"a1 LOGIN "alice s3cret"#);
        assert_eq!(r, "a1 LOGIN [redacted]");
        // A password literal: the line after is redacted too.
        let (r, e) = client(Protocol::Imap, "a1 LOGIN alice {6}");
        assert_eq!(r, "a1 LOGIN alice [redacted]");
        assert!(e.credentials);
        // A user name literal: the password comes later.
        let (r, e) = client(Protocol::Imap, "a1 LOGIN {5+}");
        assert_eq!(r, "a1 LOGIN {5+}");
        assert!(e.credentials);
        let (r, _) = client(Protocol::Imap, "a1 CAPABILITY");
        assert_eq!(r, "a1 CAPABILITY");
    }

    #[test]
    fn imap_authenticate_redacts_responses_until_the_tagged_answer() {
        let mut e = Exchange::default();
        let ir = plain("alice", "s3cret");
        let r = render_client(
            Protocol::Imap,
            format!("A1 AUTHENTICATE PLAIN {ir}").as_bytes(),
            &mut e,
        );
        assert_eq!(r, "A1 AUTHENTICATE PLAIN [redacted]");
        assert!(e.credentials);
        assert_eq!(
            render_server(Protocol::Imap, b"+ eyJzdGF0dXMiOiI0MDEifQ==", &mut e),
            "+ eyJzdGF0dXMiOiI0MDEifQ=="
        );
        assert_eq!(render_client(Protocol::Imap, b"", &mut e), REDACTED);
        assert_eq!(
            render_client(Protocol::Imap, ir.as_bytes(), &mut e),
            REDACTED
        );
        render_server(Protocol::Imap, b"A1 NO [AUTHENTICATIONFAILED] no", &mut e);
        assert!(!e.credentials);
        assert_eq!(
            render_client(Protocol::Imap, b"A2 LOGOUT", &mut e),
            "A2 LOGOUT"
        );
        // Two steps: mechanism alone, then the response.
        let r = render_client(Protocol::Imap, b"A3 AUTHENTICATE XOAUTH2", &mut e);
        assert_eq!(r, "A3 AUTHENTICATE XOAUTH2");
        render_server(Protocol::Imap, b"+ ", &mut e);
        assert_eq!(render_client(Protocol::Imap, b"dXNlcj1h", &mut e), REDACTED);
        render_server(Protocol::Imap, b"* CAPABILITY IMAP4rev1", &mut e);
        assert!(e.credentials, "untagged data does not end it");
        render_server(Protocol::Imap, b"A3 OK done", &mut e);
        assert!(!e.credentials);
    }

    #[test]
    fn pop3_pass_apop_and_auth() {
        assert_eq!(client(Protocol::Pop3, "USER alice").0, "USER alice");
        assert_eq!(
            client(Protocol::Pop3, "PASS s3cret word").0,
            "PASS [redacted]"
        );
        assert_eq!(client(Protocol::Pop3, "pass x").0, "pass [redacted]");
        assert_eq!(
            client(
                Protocol::Pop3,
                "APOP alice c4c9334bac560ecc979e58001b3e22fb"
            )
            .0,
            "APOP alice [redacted]"
        );
        let (r, e) = client(Protocol::Pop3, "AUTH");
        assert_eq!(r, "AUTH");
        assert!(!e.credentials);
        let mut e = Exchange::default();
        assert_eq!(
            render_client(Protocol::Pop3, b"AUTH PLAIN", &mut e),
            "AUTH PLAIN"
        );
        render_server(Protocol::Pop3, b"+ ", &mut e);
        assert_eq!(
            render_client(Protocol::Pop3, b"AGFsaWNlAHMzY3JldA==", &mut e),
            REDACTED
        );
        render_server(Protocol::Pop3, b"+OK logged in", &mut e);
        assert!(!e.credentials);
        assert_eq!(
            render_client(Protocol::Pop3, b"AUTH XOAUTH2 dXNlcj1h", &mut e),
            "AUTH XOAUTH2 [redacted]"
        );
        render_server(Protocol::Pop3, b"-ERR [AUTH] no", &mut e);
        assert!(!e.credentials);
    }

    #[test]
    fn smtp_auth_forms() {
        let mut e = Exchange::default();
        assert_eq!(render_client(Protocol::Smtp, b"EHLO me", &mut e), "EHLO me");
        assert_eq!(
            render_client(Protocol::Smtp, b"AUTH PLAIN AGFsaWNlAHMzY3JldA==", &mut e),
            "AUTH PLAIN [redacted]"
        );
        render_server(Protocol::Smtp, b"235 2.7.0 ok", &mut e);
        assert!(!e.credentials);
        assert_eq!(
            render_client(Protocol::Smtp, b"AUTH LOGIN", &mut e),
            "AUTH LOGIN"
        );
        render_server(Protocol::Smtp, b"334 VXNlcm5hbWU6", &mut e);
        assert_eq!(render_client(Protocol::Smtp, b"YWxpY2U=", &mut e), REDACTED);
        render_server(Protocol::Smtp, b"334 UGFzc3dvcmQ6", &mut e);
        assert_eq!(render_client(Protocol::Smtp, b"czNjcmV0", &mut e), REDACTED);
        render_server(Protocol::Smtp, b"535 5.7.8 no", &mut e);
        assert!(!e.credentials);
        assert_eq!(
            render_client(Protocol::Smtp, b"auth xoauth2 dXNlcj1h", &mut e),
            "auth xoauth2 [redacted]"
        );
    }

    #[test]
    fn controls_are_escaped_and_long_lines_cut() {
        let (r, _) = client(Protocol::Smtp, "NOOP \u{1b}[31m");
        assert_eq!(r, "NOOP \\u{1b}[31m");
        let long = format!("NOOP {}", "x".repeat(1000));
        let (r, _) = client(Protocol::Smtp, &long);
        assert!(
            r.len() < 400 && r.ends_with("(1005 characters in all)"),
            "{r}"
        );
    }

    #[test]
    fn literal_announcements() {
        assert_eq!(literal_announced(b"a LOGIN {5}\r\n"), Some(5));
        assert_eq!(literal_announced(b"a LOGIN alice {12+}"), Some(12));
        assert_eq!(literal_announced(b"a LOGIN alice {}"), None);
        assert_eq!(literal_announced(b"a LOGIN alice {x}"), None);
        assert_eq!(literal_announced(b"a NOOP"), None);
    }

    /// Every split of a dialogue gives the same rendering, and no
    /// secret appears in it.
    #[test]
    fn transcripts_never_show_credentials_however_split() {
        let secret = "s3cret-pa55";
        let user_b64 = b64("alice");
        let secret_b64 = b64(secret);
        let plain = plain("alice", secret);
        let cases: Vec<(Protocol, Vec<(Side, String)>)> = vec![
            (
                Protocol::Imap,
                vec![
                    (Side::Answers, "* OK ready\r\n".into()),
                    (
                        Side::LogsIn,
                        format!("a1 LOGIN alice {{{}}}\r\n", secret.len()),
                    ),
                    (Side::Answers, "+ go ahead\r\n".into()),
                    (Side::LogsIn, format!("{secret}\r\n")),
                    (Side::Answers, "a1 OK done\r\n".into()),
                    (
                        Side::LogsIn,
                        format!(
                            "a2 LOGIN {{5+}}\r\nalice {{{}+}}\r\n{secret}\r\n",
                            secret.len()
                        ),
                    ),
                    (Side::Answers, "a2 NO no\r\n".into()),
                    (Side::LogsIn, format!("a3 LOGIN alice \"{secret}\"\r\n")),
                    (Side::LogsIn, format!("a4 AUTHENTICATE PLAIN {plain}\r\n")),
                    (Side::Answers, "a4 OK yes\r\n".into()),
                    (
                        Side::LogsIn,
                        format!("a5 LOGIN alice {{{}}}\r\n", secret.len() + 2),
                    ),
                    (Side::LogsIn, format!("{secret}\r\n\r\n")),
                ],
            ),
            (
                Protocol::Pop3,
                vec![
                    (Side::Answers, "+OK hi\r\n".into()),
                    (Side::LogsIn, "USER alice\r\n".into()),
                    (Side::LogsIn, format!("PASS {secret}\r\n")),
                    (Side::Answers, "-ERR no\r\n".into()),
                    (Side::LogsIn, "AUTH PLAIN\r\n".into()),
                    (Side::Answers, "+ \r\n".into()),
                    (Side::LogsIn, format!("{plain}\r\n")),
                    (Side::Answers, "+OK yes\r\n".into()),
                ],
            ),
            (
                Protocol::Smtp,
                vec![
                    (Side::Answers, "220 hi\r\n".into()),
                    (Side::LogsIn, "AUTH LOGIN\r\n".into()),
                    (Side::Answers, "334 VXNlcm5hbWU6\r\n".into()),
                    (Side::LogsIn, format!("{user_b64}\r\n")),
                    (Side::Answers, "334 UGFzc3dvcmQ6\r\n".into()),
                    (Side::LogsIn, format!("{secret_b64}\r\n")),
                    (Side::Answers, "535 no\r\n".into()),
                    (Side::LogsIn, format!("AUTH LOGIN {user_b64}\r\n")),
                    (Side::Answers, "334 UGFzc3dvcmQ6\r\n".into()),
                    (Side::LogsIn, format!("{secret_b64}\r\n")),
                    (Side::Answers, "235 ok\r\n".into()),
                ],
            ),
        ];
        for (protocol, script) in cases {
            let mut whole = Vec::new();
            let mut t = Transcript::new(protocol);
            for (side, bytes) in &script {
                whole.extend(t.push(*side, bytes.as_bytes()));
            }
            // Byte by byte: the same lines.
            let mut t = Transcript::new(protocol);
            let mut bytewise = Vec::new();
            for (side, bytes) in &script {
                for b in bytes.as_bytes() {
                    bytewise.extend(t.push(*side, std::slice::from_ref(b)));
                }
            }
            assert_eq!(whole, bytewise, "{protocol:?}");
            let all = whole.join("\n");
            for s in [secret, &secret_b64, &plain] {
                assert!(!all.contains(s), "{protocol:?} shows {s}:\n{all}");
            }
            assert!(all.contains("[redacted]"), "{all}");
            if protocol == Protocol::Imap {
                assert!(all.contains("a1 LOGIN alice [redacted]"), "{all}");
                assert!(all.contains("{11 literal bytes}[redacted]"), "{all}");
                assert!(all.contains("a4 AUTHENTICATE PLAIN [redacted]"), "{all}");
            }
        }
    }

    #[test]
    fn a_long_line_is_cut_and_still_redacted() {
        let mut t = Transcript::new(Protocol::Pop3);
        let secret = "p".repeat(5000);
        let lines = t.push(
            Side::LogsIn,
            format!("PASS {secret}\r\nNOOP\r\n").as_bytes(),
        );
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("PASS [redacted] ... ("),
            "{}",
            lines[0]
        );
        assert!(!lines[0].contains("ppp"), "{}", lines[0]);
        assert_eq!(lines[1], "NOOP");
    }
}
