//! Typed refusals: a server's "no" to a login, read once by the protocol
//! that received it. Callers decide on the typed codes (temporary or not,
//! which response or enhanced status code) and quote the server with
//! `Display`; nothing outside this crate parses a server's line again.

use std::fmt;

use crate::text;

/// A server's final refusal of a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What the protocol's status and codes say.
    pub code: RefusalCode,
    /// The server's own words after its status and codes, on one line:
    /// what a person reads, and what explanations look for.
    pub text: String,
    /// The whole refusal as the server put it (IMAP: without its tag), on
    /// one line of at most 300 characters: what `Display` shows when a
    /// message quotes the server.
    quoted: String,
}

/// The protocol's verdict in a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalCode {
    /// An IMAP tagged response other than OK.
    Imap {
        /// NO, BAD, or something else.
        status: ImapStatus,
        /// The response code in brackets, e.g. `[UNAVAILABLE]` (RFC 5530).
        code: Option<ResponseCode>,
    },
    /// A POP3 `-ERR`.
    Pop3 {
        /// The response code in brackets, e.g. `[SYS/TEMP]` (RFC 2449,
        /// RFC 3206).
        code: Option<ResponseCode>,
    },
    /// An SMTP 4xx or 5xx reply.
    Smtp {
        /// The basic reply code, e.g. 535.
        code: u16,
        /// The enhanced status code (RFC 3463), when the reply had one of
        /// its own class.
        enhanced: Option<EnhancedCode>,
    },
}

/// The status of an IMAP refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImapStatus {
    /// `NO`: the server refused.
    No,
    /// `BAD`: the server did not understand.
    Bad,
    /// Neither OK, NO nor BAD: a server off the RFC, refusing all the same.
    Other,
}

/// A response code in brackets after an IMAP status or a POP3 `-ERR`:
/// `[AUTHENTICATIONFAILED]`, `[SYS/TEMP]`, `[WEBALERT https://...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseCode {
    /// The code's name, upper-cased: `UNAVAILABLE`, `SYS/TEMP`, `AUTH`.
    pub name: String,
    /// What follows the name inside the brackets, if anything.
    pub argument: Option<String>,
}

impl ResponseCode {
    /// Whether this is the code `name` (case-insensitive).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

/// An RFC 3463 enhanced status code, `class.subject.detail` (`5.7.139`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    /// 2, 4 or 5.
    pub class: u8,
    /// The subject, e.g. 7 (security or policy).
    pub subject: u16,
    /// The detail.
    pub detail: u16,
}

impl EnhancedCode {
    /// The code `class.subject.detail`.
    pub const fn new(class: u8, subject: u16, detail: u16) -> EnhancedCode {
        EnhancedCode {
            class,
            subject,
            detail,
        }
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.quoted)
    }
}

impl Refusal {
    /// True when the server says it could not check the token just now,
    /// rather than that the token is bad: IMAP `NO [UNAVAILABLE]` (RFC
    /// 5530), POP3 `[SYS/TEMP]` or `[IN-USE]` (RFC 3206), any SMTP 4xx.
    /// Dovecot answers so, with no failure challenge, when it cannot reach
    /// its introspection endpoint.
    pub fn is_temporary(&self) -> bool {
        match &self.code {
            RefusalCode::Imap {
                status: ImapStatus::No,
                code: Some(code),
            } => code.is("UNAVAILABLE"),
            RefusalCode::Imap { .. } => false,
            RefusalCode::Pop3 { code } => code
                .as_ref()
                .is_some_and(|c| c.is("SYS/TEMP") || c.is("IN-USE")),
            RefusalCode::Smtp { code, .. } => (400..500).contains(code),
        }
    }

    /// The bracketed response code (IMAP, POP3).
    pub fn response_code(&self) -> Option<&ResponseCode> {
        match &self.code {
            RefusalCode::Imap { code, .. } | RefusalCode::Pop3 { code } => code.as_ref(),
            RefusalCode::Smtp { .. } => None,
        }
    }

    /// The enhanced status code (SMTP).
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        match &self.code {
            RefusalCode::Smtp { enhanced, .. } => *enhanced,
            _ => None,
        }
    }

    /// An IMAP refusal: `status`, and the response without its tag
    /// (`NO [AUTHENTICATIONFAILED] Invalid credentials`).
    pub(crate) fn imap(status: ImapStatus, after_tag: &[u8]) -> Refusal {
        let quoted = quote(after_tag, "(no text)");
        let (_, rest) = split_word(&quoted);
        let (code, text) = response_code(rest);
        Refusal {
            code: RefusalCode::Imap { status, code },
            text: text.to_owned(),
            quoted,
        }
    }

    /// A POP3 refusal: the whole `-ERR` line.
    pub(crate) fn pop3(line: &[u8]) -> Refusal {
        let quoted = quote(line, "-ERR");
        let (_, rest) = split_word(&quoted);
        let (code, text) = response_code(rest);
        Refusal {
            code: RefusalCode::Pop3 { code },
            text: text.to_owned(),
            quoted,
        }
    }

    /// An SMTP refusal from its reply code, enhanced code and `summary`:
    /// the reply on one line, starting with those two codes as written
    /// (`535 5.7.8 Username and Password not accepted`).
    pub(crate) fn smtp(code: u16, enhanced: Option<EnhancedCode>, summary: &str) -> Refusal {
        let quoted = text::flatten(summary);
        let prefix = match enhanced {
            Some(e) => format!("{code} {e}"),
            None => code.to_string(),
        };
        let text = quoted
            .strip_prefix(&prefix)
            .map_or("", str::trim_start)
            .to_owned();
        Refusal {
            code: RefusalCode::Smtp { code, enhanced },
            text,
            quoted,
        }
    }
}

/// A server's line as we quote it: printable ASCII on one line, then
/// whitespace collapsed and at most 300 characters.
fn quote(line: &[u8], fallback: &str) -> String {
    text::flatten(&text::one_line(
        &String::from_utf8_lossy(text::strip_eol(line)),
        fallback,
    ))
}

/// Splits off the first space-separated word.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once(' ') {
        Some((word, rest)) => (word, rest),
        None => (s, ""),
    }
}

/// A leading `[NAME argument]` and the text after it.
fn response_code(rest: &str) -> (Option<ResponseCode>, &str) {
    let Some(inner) = rest.strip_prefix('[') else {
        return (None, rest);
    };
    let Some((inside, text)) = inner.split_once(']') else {
        return (None, rest);
    };
    let (name, argument) = split_word(inside);
    if name.is_empty() {
        return (None, rest);
    }
    let code = ResponseCode {
        name: name.to_ascii_uppercase(),
        argument: (!argument.is_empty()).then(|| argument.to_owned()),
    };
    (Some(code), text.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(name: &str, argument: Option<&str>) -> Option<ResponseCode> {
        Some(ResponseCode {
            name: name.to_owned(),
            argument: argument.map(str::to_owned),
        })
    }

    #[test]
    fn imap_refusals() {
        let r = Refusal::imap(
            ImapStatus::No,
            b"NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n",
        );
        assert_eq!(
            r.code,
            RefusalCode::Imap {
                status: ImapStatus::No,
                code: code("AUTHENTICATIONFAILED", None)
            }
        );
        assert_eq!(r.text, "Invalid credentials (Failure)");
        assert_eq!(
            r.to_string(),
            "NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)"
        );
        assert!(!r.is_temporary());
        let r = Refusal::imap(
            ImapStatus::No,
            b"no [webalert https://accounts.google.com/x]  Web login required.",
        );
        assert_eq!(
            r.response_code(),
            code("WEBALERT", Some("https://accounts.google.com/x")).as_ref()
        );
        assert_eq!(r.text, "Web login required.");
        assert_eq!(
            r.to_string(),
            "no [webalert https://accounts.google.com/x] Web login required."
        );
        let r = Refusal::imap(ImapStatus::No, b"NO AUTHENTICATE failed.");
        assert_eq!(r.response_code(), None);
        assert_eq!(r.text, "AUTHENTICATE failed.");
        assert!(
            Refusal::imap(ImapStatus::No, b"NO [UNAVAILABLE] Temporary failure.").is_temporary()
        );
        assert!(!Refusal::imap(ImapStatus::Bad, b"BAD [UNAVAILABLE] odd").is_temporary());
        // Unbalanced brackets are text.
        let r = Refusal::imap(ImapStatus::No, b"NO [oops no code");
        assert_eq!(
            (r.response_code(), r.text.as_str()),
            (None, "[oops no code")
        );
    }

    #[test]
    fn pop3_refusals() {
        let r = Refusal::pop3(b"-ERR [SYS/TEMP] Temporary authentication failure.");
        assert_eq!(
            r.code,
            RefusalCode::Pop3 {
                code: code("SYS/TEMP", None)
            }
        );
        assert_eq!(r.text, "Temporary authentication failure.");
        assert!(r.is_temporary());
        assert!(Refusal::pop3(b"-ERR [IN-USE] busy").is_temporary());
        let r = Refusal::pop3(b"-ERR Authentication failure: unknown user name or bad password.");
        assert_eq!(r.response_code(), None);
        assert!(!r.is_temporary());
        assert_eq!(
            r.to_string(),
            "-ERR Authentication failure: unknown user name or bad password."
        );
    }

    #[test]
    fn smtp_refusals() {
        let e = EnhancedCode::new(5, 7, 139);
        assert_eq!(e.to_string(), "5.7.139");
        let r = Refusal::smtp(535, Some(e), "535 5.7.139 Authentication unsuccessful");
        assert_eq!(r.enhanced(), Some(e));
        assert_eq!(r.text, "Authentication unsuccessful");
        assert!(!r.is_temporary());
        let r = Refusal::smtp(454, None, "454 Try later");
        assert_eq!((r.enhanced(), r.text.as_str()), (None, "Try later"));
        assert!(r.is_temporary());
        assert_eq!(Refusal::smtp(535, None, "535").text, "");
    }
}
