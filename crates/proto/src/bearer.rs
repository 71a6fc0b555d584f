//! The bearer-token login every upstream dialogue ends with, written once.
//!
//! It owns what IMAP, POP3 and SMTP share once the server's capabilities
//! are known:
//!
//! - the mechanism: the first of the configured preference (XOAUTH2,
//!   OAUTHBEARER) the server offers;
//! - where the SASL response goes: on the command line (SASL-IR, RFC 4959
//!   / RFC 5034 / RFC 4954 initial response) or after the server's
//!   continuation, including RFC 4954's rule that an SMTP AUTH line over
//!   512 octets must not carry it, and a server that refuses the
//!   one-step form getting the two-step form from then on;
//! - the failure challenge: a continuation after the response carries the
//!   server's JSON error; it is read and answered (an empty line for
//!   XOAUTH2, `AQ==` for OAUTHBEARER, RFC 7628 section 3.2.3) so the
//!   server can send its final refusal;
//! - the verdict: success, or a [`Rejection`] with the typed refusal and
//!   whether the challenge suggests one retry with a fresh token, which
//!   [`Bearer::retry`] starts on the same connection.
//!
//! The protocols configure it rather than copy it: they phrase the command
//! (a closure), say when an initial response may go on the command line
//! ([`InitialResponse`]), and tell it what the server answered
//! (continuation, success, refusal) after parsing that themselves.

use std::fmt;

use secrecy::{ExposeSecret, SecretString, zeroize::Zeroize};

use crate::refusal::Refusal;
use crate::sasl::{self, BearerToken, FailureChallenge, Mechanism};
use crate::{Rejection, UpstreamStep};

/// What the server said about mechanisms.
pub(crate) enum Offer<'a> {
    /// The mechanism names it offers.
    Listed(&'a [&'a str]),
    /// Nothing (a POP3 server that refused CAPA): try the first preferred
    /// one, since a refusal costs one round trip and reads like any other.
    Unknown,
}

/// When the SASL response may go on the command line.
#[derive(Debug, Clone, Copy)]
pub(crate) enum InitialResponse {
    /// Never: the command, the server's continuation, then the response.
    Never,
    /// Always (the server announced SASL-IR, or the configuration says so).
    Always,
    /// When the whole command line stays within this many octets, line
    /// ending included (SMTP: RFC 4954 section 4 and RFC 5321's 512).
    WithinLine(usize),
}

enum State {
    /// No mechanism chosen yet.
    Idle,
    /// Emitted `NeedToken`.
    WaitToken,
    /// Sent the command.
    Auth {
        /// The SASL response (kept for the two-step fallback; never
        /// printed).
        response: SecretString,
        /// The response still waits for the server's continuation.
        pending: bool,
        /// The command without the response, for the two-step fallback.
        two_step_command: String,
        /// The failure challenge, once the server sent one and we answered.
        challenge: Option<Option<FailureChallenge>>,
    },
    /// Emitted `Rejected`; `retry` may start over.
    Rejected,
    /// The server accepted the token.
    Done,
}

/// The bearer login of one upstream dialogue.
pub(crate) struct Bearer {
    /// Mechanisms in order of preference.
    preference: Vec<Mechanism>,
    /// The mechanism chosen, once known.
    mech: Option<Mechanism>,
    state: State,
    /// The server refused the one-step form: two steps from now on.
    two_step_only: bool,
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bearer")
            .field("state", &self.state_name())
            .field("mech", &self.mech)
            .field("two_step_only", &self.two_step_only)
            .finish()
    }
}

impl Bearer {
    /// A bearer login that will use the first mechanism of `preference`
    /// the server offers.
    pub(crate) fn new(preference: Vec<Mechanism>) -> Self {
        Bearer {
            preference,
            mech: None,
            state: State::Idle,
            two_step_only: false,
        }
    }

    pub(crate) fn state_name(&self) -> &'static str {
        match self.state {
            State::Idle => "before-authentication",
            State::WaitToken => "wait-token",
            State::Auth { .. } => "authenticate",
            State::Rejected => "rejected",
            State::Done => "done",
        }
    }

    /// The mechanisms it may use, in order.
    pub(crate) fn allowed(&self) -> Vec<Mechanism> {
        self.preference.clone()
    }

    /// The mechanism chosen, once known.
    pub(crate) fn mechanism(&self) -> Option<Mechanism> {
        self.mech
    }

    /// The server's answer matters now: a command is out.
    pub(crate) fn awaits_server(&self) -> bool {
        matches!(self.state, State::Auth { .. })
    }

    /// The driver owes a token.
    pub(crate) fn waits_for_token(&self) -> bool {
        matches!(self.state, State::WaitToken)
    }

    /// The SASL response has not gone out yet (two-step form, before the
    /// server's continuation).
    pub(crate) fn response_pending(&self) -> bool {
        matches!(self.state, State::Auth { pending: true, .. })
    }

    /// Chooses the mechanism; `NeedToken` to hand the driver, or None when
    /// the server offers none we may use.
    pub(crate) fn choose(&mut self, offer: Offer<'_>) -> Option<UpstreamStep> {
        let mech = match offer {
            Offer::Unknown => self.preference.first().copied(),
            Offer::Listed(names) => self
                .preference
                .iter()
                .copied()
                .find(|m| names.iter().any(|n| n.eq_ignore_ascii_case(m.name()))),
        }?;
        self.mech = Some(mech);
        self.state = State::WaitToken;
        Some(UpstreamStep::NeedToken)
    }

    /// With the token: the command to send, phrased by `command` (the
    /// mechanism, and the response when it goes on the line). None unless
    /// a token was asked for.
    pub(crate) fn provide_token(
        &mut self,
        token: &BearerToken,
        form: InitialResponse,
        command: impl Fn(Mechanism, Option<&str>) -> String,
    ) -> Option<UpstreamStep> {
        if !self.waits_for_token() {
            return None;
        }
        let mech = self.mech?;
        let response = match mech {
            Mechanism::Xoauth2 => sasl::xoauth2_response(token),
            Mechanism::Oauthbearer => sasl::oauthbearer_response(token),
        };
        let two_step_command = command(mech, None);
        let one_step = match form {
            _ if self.two_step_only => None,
            InitialResponse::Never => None,
            InitialResponse::Always => Some(command(mech, Some(response.expose_secret()))),
            InitialResponse::WithinLine(max) => {
                let mut line = command(mech, Some(response.expose_secret()));
                if line.len() <= max {
                    Some(line)
                } else {
                    line.zeroize();
                    None
                }
            }
        };
        let (line, pending) = match one_step {
            Some(line) => (line, false),
            None => (two_step_command.clone(), true),
        };
        self.state = State::Auth {
            response,
            pending,
            two_step_command,
            challenge: None,
        };
        Some(UpstreamStep::Send(line.into_bytes()))
    }

    /// The server's continuation, with its data: the pending response, or
    /// the answer to a failure challenge. Err(what went wrong) when the
    /// dialogue cannot go on.
    pub(crate) fn continuation(&mut self, data: &[u8]) -> Result<UpstreamStep, &'static str> {
        let mech = self.mech;
        let State::Auth {
            response,
            pending,
            challenge,
            ..
        } = &mut self.state
        else {
            return Err("a continuation request with no authentication under way");
        };
        if *pending {
            *pending = false;
            let line = format!("{}\r\n", response.expose_secret());
            return Ok(UpstreamStep::Send(line.into_bytes()));
        }
        if challenge.is_some() {
            return Err("a second challenge after the failure challenge");
        }
        *challenge = Some(sasl::parse_failure_challenge(data));
        // The exchange only ends once we answer the challenge.
        let ack: &[u8] = match mech {
            Some(Mechanism::Oauthbearer) => sasl::OAUTHBEARER_FAILURE_ACK,
            _ => b"",
        };
        Ok(UpstreamStep::Send([ack, b"\r\n"].concat()))
    }

    /// The server accepted the token.
    pub(crate) fn succeeded(&mut self) {
        self.state = State::Done;
    }

    /// The server refused the login: the rejection to hand the driver.
    pub(crate) fn refused(&mut self, refusal: Refusal) -> UpstreamStep {
        let challenge = match std::mem::replace(&mut self.state, State::Rejected) {
            State::Auth { challenge, .. } => challenge.flatten(),
            _ => None,
        };
        let retry_suggested = challenge
            .as_ref()
            .is_some_and(FailureChallenge::suggests_retry);
        UpstreamStep::Rejected(Rejection {
            challenge,
            refusal,
            retry_suggested,
        })
    }

    /// The server refused the one-step form (SMTP 500/501/504 to an AUTH
    /// line with an initial response): the two-step command on the same
    /// connection, once; otherwise the refusal stands.
    pub(crate) fn form_refused(&mut self, refusal: Refusal) -> UpstreamStep {
        match &mut self.state {
            State::Auth {
                pending,
                two_step_command,
                challenge: None,
                ..
            } if !self.two_step_only && !*pending => {
                self.two_step_only = true;
                *pending = true;
                UpstreamStep::Send(two_step_command.clone().into_bytes())
            }
            _ => self.refused(refusal),
        }
    }

    /// After a rejection: another authentication on the same connection
    /// (`NeedToken` to hand the driver).
    pub(crate) fn retry(&mut self) -> Option<UpstreamStep> {
        if !matches!(self.state, State::Rejected) {
            return None;
        }
        self.state = State::WaitToken;
        Some(UpstreamStep::NeedToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{b64, ob, token, xo};

    fn text(step: Option<UpstreamStep>) -> String {
        match step {
            Some(UpstreamStep::Send(b)) => String::from_utf8_lossy(&b).into_owned(),
            other => panic!("not a send: {other:?}"),
        }
    }

    fn auth(mech: Mechanism, response: Option<&str>) -> String {
        match response {
            Some(r) => format!("AUTH {} {r}\r\n", mech.name()),
            None => format!("AUTH {}\r\n", mech.name()),
        }
    }

    fn ready(preference: Vec<Mechanism>) -> Bearer {
        let mut b = Bearer::new(preference);
        assert!(matches!(
            b.choose(Offer::Listed(&["PLAIN", "xoauth2", "OAUTHBEARER"])),
            Some(UpstreamStep::NeedToken)
        ));
        b
    }

    #[test]
    fn mechanism_by_preference_and_offer() {
        let b = ready(vec![Mechanism::Oauthbearer, Mechanism::Xoauth2]);
        assert_eq!(b.mechanism(), Some(Mechanism::Oauthbearer));
        let b = ready(vec![Mechanism::Xoauth2, Mechanism::Oauthbearer]);
        assert_eq!(b.mechanism(), Some(Mechanism::Xoauth2));
        let mut b = Bearer::new(vec![Mechanism::Oauthbearer]);
        assert!(b.choose(Offer::Listed(&["XOAUTH2"])).is_none());
        assert!(!b.waits_for_token());
        // The server did not say: the first preferred one.
        let mut b = Bearer::new(vec![Mechanism::Oauthbearer, Mechanism::Xoauth2]);
        assert!(b.choose(Offer::Unknown).is_some());
        assert_eq!(b.mechanism(), Some(Mechanism::Oauthbearer));
        assert!(Bearer::new(Vec::new()).choose(Offer::Unknown).is_none());
    }

    #[test]
    fn initial_response_forms() {
        let mut b = ready(vec![Mechanism::Xoauth2]);
        let line = text(b.provide_token(&token(), InitialResponse::Always, auth));
        assert_eq!(line, format!("AUTH XOAUTH2 {}\r\n", xo()));
        assert!(!b.response_pending());
        // Only once per token request.
        assert!(
            b.provide_token(&token(), InitialResponse::Always, auth)
                .is_none()
        );

        let mut b = ready(vec![Mechanism::Xoauth2]);
        let line = text(b.provide_token(&token(), InitialResponse::Never, auth));
        assert_eq!(line, "AUTH XOAUTH2\r\n");
        assert!(b.response_pending());
        assert_eq!(text(b.continuation(b"").ok()), format!("{}\r\n", xo()));

        // RFC 4954: a line that would be too long goes two-step.
        let exact = auth(Mechanism::Xoauth2, Some(&xo())).len();
        let mut b = ready(vec![Mechanism::Xoauth2]);
        let line = text(b.provide_token(&token(), InitialResponse::WithinLine(exact), auth));
        assert_eq!(line, format!("AUTH XOAUTH2 {}\r\n", xo()));
        let mut b = ready(vec![Mechanism::Xoauth2]);
        let line = text(b.provide_token(&token(), InitialResponse::WithinLine(exact - 1), auth));
        assert_eq!(line, "AUTH XOAUTH2\r\n");
    }

    #[test]
    fn challenge_answered_then_refusal_with_retry() {
        for (mech, response, ack) in [
            (Mechanism::Xoauth2, xo(), "\r\n"),
            (Mechanism::Oauthbearer, ob(), "AQ==\r\n"),
        ] {
            let mut b = ready(vec![mech]);
            let line = text(b.provide_token(&token(), InitialResponse::Always, auth));
            assert_eq!(line, format!("AUTH {} {response}\r\n", mech.name()));
            let challenge = b64(br#"{"status":"401"}"#);
            assert_eq!(text(b.continuation(challenge.as_bytes()).ok()), ack);
            assert_eq!(
                b.continuation(challenge.as_bytes()).err(),
                Some("a second challenge after the failure challenge")
            );
            let refusal = crate::pop3::parse_refusal("-ERR [AUTH] no").unwrap();
            let UpstreamStep::Rejected(r) = b.refused(refusal.clone()) else {
                panic!("not a rejection");
            };
            assert!(r.retry_suggested);
            assert_eq!(r.refusal, refusal);
            assert!(matches!(b.retry(), Some(UpstreamStep::NeedToken)));
            assert!(b.retry().is_none());
            assert!(b.waits_for_token());
        }
        // No challenge: no retry suggested.
        let mut b = ready(vec![Mechanism::Xoauth2]);
        b.provide_token(&token(), InitialResponse::Always, auth);
        let refusal = crate::pop3::parse_refusal("-ERR no").unwrap();
        let UpstreamStep::Rejected(r) = b.refused(refusal) else {
            panic!("not a rejection");
        };
        assert!(!r.retry_suggested && r.challenge.is_none());
    }

    #[test]
    fn refused_form_falls_back_to_two_steps_once() {
        let refusal = || crate::smtp::parse_refusal("501 5.5.2 no").unwrap();
        let mut b = ready(vec![Mechanism::Xoauth2]);
        b.provide_token(&token(), InitialResponse::Always, auth);
        assert_eq!(text(Some(b.form_refused(refusal()))), "AUTH XOAUTH2\r\n");
        assert!(b.response_pending());
        // Refused again: a rejection, no loop.
        assert!(matches!(
            b.form_refused(refusal()),
            UpstreamStep::Rejected(_)
        ));
        // The next attempt is two-step from the start.
        assert!(b.retry().is_some());
        let line = text(b.provide_token(&token(), InitialResponse::Always, auth));
        assert_eq!(line, "AUTH XOAUTH2\r\n");
    }

    #[test]
    fn debug_hides_the_response() {
        let mut b = ready(vec![Mechanism::Xoauth2]);
        b.provide_token(&token(), InitialResponse::Never, auth);
        let dbg = format!("{b:?}");
        assert!(!dbg.contains(&xo()) && !dbg.contains("tok-123"), "{dbg}");
    }
}
