//! The pre-auth allowance: how much a client may ask of mailbridge before
//! it has logged in. [`Limited`] wraps any [`ClientSession`] and ends the
//! connection with the protocol's temporary goodbye (`* BYE [UNAVAILABLE]`,
//! `421 4.7.0`, `-ERR [SYS/TEMP]`) once the client has used up its
//! commands or its failed logins, so one connection cannot try passwords
//! or names without end.
//!
//! What counts as a command is what the session answered: each reply,
//! continuation prompt (`+ Ready for literal`, `334 ...`) or login request
//! is one. A real client needs fewer than ten before it logs in.

use crate::{ClientSession, ClientStep, LoginFailure, SpoolOutcome, UpstreamSuccess};

/// The allowance of one connection before login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// Commands (replies, prompts and login requests) before login.
    pub max_commands: u32,
    /// Failed logins, whatever the reason, before the connection is closed.
    pub max_failed_logins: u32,
}

impl Default for Allowance {
    /// 50 commands, 3 failed logins.
    fn default() -> Self {
        Allowance {
            max_commands: 50,
            max_failed_logins: 3,
        }
    }
}

/// A client session held to an [`Allowance`].
pub struct Limited {
    inner: Box<dyn ClientSession>,
    allowance: Allowance,
    commands: u32,
    failed: u32,
    /// The goodbye to send at the next step.
    ending: Option<Vec<u8>>,
    /// The goodbye was handed out: nothing more is read.
    closed: bool,
}

impl Limited {
    /// `inner` held to `allowance`.
    pub fn new(inner: Box<dyn ClientSession>, allowance: Allowance) -> Limited {
        Limited {
            inner,
            allowance,
            commands: 0,
            failed: 0,
            ending: None,
            closed: false,
        }
    }

    fn close(&mut self, reason: &str) -> ClientStep {
        self.closed = true;
        ClientStep::Close(self.inner.goodbye(reason))
    }
}

impl ClientSession for Limited {
    fn greeting(&mut self) -> Vec<u8> {
        self.inner.greeting()
    }

    fn feed(&mut self, data: &[u8]) {
        if !self.closed {
            self.inner.feed(data);
        }
    }

    fn next_step(&mut self) -> ClientStep {
        if let Some(bye) = self.ending.take() {
            self.closed = true;
            return ClientStep::Close(bye);
        }
        if self.closed {
            return ClientStep::NeedInput;
        }
        let step = self.inner.next_step();
        match step {
            ClientStep::Send(_)
            | ClientStep::StartTls(_)
            | ClientStep::Login(_)
            | ClientStep::Spool(_) => {
                if !self.inner.preauth() {
                    return step;
                }
                self.commands = self.commands.saturating_add(1);
                if self.commands > self.allowance.max_commands {
                    // A login request dropped here takes its password
                    // with it (the credentials wipe themselves).
                    let reason = format!(
                        "Too many commands before login (at most {}); connect again and log in",
                        self.allowance.max_commands
                    );
                    return self.close(&reason);
                }
                step
            }
            ClientStep::NeedInput | ClientStep::Close(_) => step,
        }
    }

    fn tls_started(&mut self) {
        self.inner.tls_started();
    }

    fn login_succeeded(&mut self, upstream: &UpstreamSuccess) -> Vec<u8> {
        self.inner.login_succeeded(upstream)
    }

    fn login_failed(&mut self, failure: &LoginFailure) -> Vec<u8> {
        self.failed = self.failed.saturating_add(1);
        let reply = self.inner.login_failed(failure);
        if self.failed >= self.allowance.max_failed_logins {
            self.ending = Some(self.inner.goodbye(&format!(
                "Too many failed logins on this connection ({}); check the user name and password, then connect again",
                self.failed
            )));
        }
        reply
    }

    fn take_pending(&mut self) -> Vec<u8> {
        self.inner.take_pending()
    }

    fn timeout_message(&self) -> Vec<u8> {
        self.inner.timeout_message()
    }

    fn shutdown_message(&self) -> Vec<u8> {
        self.inner.shutdown_message()
    }

    fn goodbye(&self, reason: &str) -> Vec<u8> {
        self.inner.goodbye(reason)
    }

    fn spooled(&mut self, outcome: &SpoolOutcome) -> Vec<u8> {
        self.inner.spooled(outcome)
    }

    fn login_local(&mut self, senders: Vec<String>) -> Vec<u8> {
        self.inner.login_local(senders)
    }

    fn preauth(&self) -> bool {
        self.inner.preauth()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FailureKind;
    use crate::imap::{ClientOptions as ImapOptions, ImapClientSession};
    use crate::pop3::{ClientOptions as Pop3Options, Pop3ClientSession};
    use crate::smtp::{ClientOptions as SmtpOptions, SmtpClientSession};

    fn open_imap() -> Box<dyn ClientSession> {
        Box::new(ImapClientSession::new(ImapOptions {
            plaintext_login_allowed: true,
            ..Default::default()
        }))
    }

    fn text(step: ClientStep) -> (bool, String) {
        match step {
            ClientStep::Send(b) => (false, String::from_utf8(b).unwrap()),
            ClientStep::Close(b) => (true, String::from_utf8(b).unwrap()),
            other => panic!("unexpected step {other:?}"),
        }
    }

    fn wrong() -> LoginFailure {
        LoginFailure {
            kind: FailureKind::BadCredentials,
            reason: "wrong user name or password".into(),
            upstream_reply: None,
        }
    }

    #[test]
    fn commands_beyond_the_allowance_end_the_connection() {
        let mut s = Limited::new(
            open_imap(),
            Allowance {
                max_commands: 3,
                max_failed_logins: 3,
            },
        );
        s.greeting();
        s.feed(b"a NOOP\r\nb NOOP\r\nc NOOP\r\nd NOOP\r\ne NOOP\r\n");
        for tag in ["a", "b", "c"] {
            let (closed, t) = text(s.next_step());
            assert!(!closed);
            assert!(t.starts_with(&format!("{tag} OK")), "{t}");
        }
        let (closed, t) = text(s.next_step());
        assert!(closed);
        assert!(
            t.starts_with("* BYE [UNAVAILABLE] Too many commands before login (at most 3)"),
            "{t}"
        );
        // Nothing more is read or answered.
        s.feed(b"f NOOP\r\n");
        assert!(matches!(s.next_step(), ClientStep::NeedInput));
    }

    #[test]
    fn the_last_failed_login_is_answered_then_the_connection_ends() {
        let mut s = Limited::new(
            open_imap(),
            Allowance {
                max_commands: 50,
                max_failed_logins: 2,
            },
        );
        s.greeting();
        for (n, tag) in ["a", "b"].into_iter().enumerate() {
            s.feed(format!("{tag} LOGIN u p\r\n").as_bytes());
            assert!(matches!(s.next_step(), ClientStep::Login(_)));
            let reply = String::from_utf8(s.login_failed(&wrong())).unwrap();
            assert!(reply.starts_with(&format!("{tag} NO [AUTHENTICATIONFAILED]")));
            if n == 0 {
                assert!(matches!(s.next_step(), ClientStep::NeedInput));
            }
        }
        let (closed, t) = text(s.next_step());
        assert!(closed);
        assert!(
            t.starts_with("* BYE [UNAVAILABLE] Too many failed logins on this connection (2)"),
            "{t}"
        );
    }

    #[test]
    fn a_device_sending_mail_is_not_held_to_the_command_allowance() {
        use crate::smtp::{ClientOptions as SmtpOptions, DeviceOptions, SmtpClientSession};
        let device = SmtpClientSession::new(SmtpOptions {
            device: Some(DeviceOptions {
                senders: vec!["s@x".into()],
                spool: true,
            }),
            ..Default::default()
        });
        let mut s = Limited::new(
            Box::new(device),
            Allowance {
                max_commands: 3,
                max_failed_logins: 3,
            },
        );
        s.greeting();
        s.feed(b"MAIL FROM:<s@x>\r\n");
        let mut input = String::new();
        for i in 0..20 {
            input.push_str(&format!("RCPT TO:<r{i}@x>\r\n"));
        }
        s.feed(input.as_bytes());
        for _ in 0..21 {
            let (closed, t) = text(s.next_step());
            assert!(!closed && t.starts_with("250"), "{t}");
        }
    }

    #[test]
    fn each_protocol_says_goodbye_in_its_own_words() {
        let pop3 = Pop3ClientSession::new(Pop3Options::default());
        let smtp = SmtpClientSession::new(SmtpOptions {
            hostname: "gw.example".into(),
            ..Default::default()
        });
        let imap = ImapClientSession::new(ImapOptions::default());
        assert_eq!(
            imap.goodbye("full\r\nnow"),
            b"* BYE [UNAVAILABLE] full  now\r\n"
        );
        assert_eq!(pop3.goodbye("full"), b"-ERR [SYS/TEMP] full\r\n");
        assert_eq!(smtp.goodbye("full"), b"421 4.7.0 gw.example full\r\n");
    }
}
