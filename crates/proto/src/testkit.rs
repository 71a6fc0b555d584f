//! Test-only helpers shared by the protocol cores' unit tests: scripted
//! views of a [`ClientSession`]'s and an [`UpstreamLogin`]'s steps, the
//! token they log in with, and small conversions.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use secrecy::{ExposeSecret, SecretString};

use super::{ClientSession, ClientStep, UpstreamLogin, UpstreamStep};
use crate::sasl::{self, BearerToken};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Bytes as text, for comparing replies.
pub fn s(b: &[u8]) -> String {
    text(b)
}

/// Standard base64 of `data` (SASL messages, failure challenges).
pub fn b64(data: &[u8]) -> String {
    STANDARD.encode(data)
}

/// A server's failure challenge: base64 of its JSON.
pub fn challenge_b64(json: &str) -> String {
    b64(json.as_bytes())
}

/// The token every upstream test logs in with.
pub fn token() -> BearerToken {
    BearerToken {
        user: "alice@example.com".into(),
        token: SecretString::from("tok-123".to_owned()),
        host: "imap.example.com".into(),
        port: 993,
    }
}

/// The XOAUTH2 initial response for [`token`].
pub fn xo() -> String {
    sasl::xoauth2_response(&token()).expose_secret().to_owned()
}

/// The OAUTHBEARER initial response for [`token`].
pub fn ob() -> String {
    sasl::oauthbearer_response(&token())
        .expose_secret()
        .to_owned()
}

/// One upstream step, as the tests compare it.
#[derive(Debug, PartialEq, Eq)]
pub enum Up {
    Send(String),
    StartTls,
    NeedToken,
    Ok(Vec<String>, String),
    Rejected {
        status: Option<String>,
        text: String,
        retry: bool,
    },
    Err(String),
}

/// Collects steps until the session wants input (or fails).
pub fn up_pump(u: &mut dyn UpstreamLogin, evs: &mut Vec<Up>) {
    loop {
        let ev = match u.next_step() {
            Ok(UpstreamStep::NeedInput) => return,
            Ok(UpstreamStep::Send(b)) => Up::Send(text(&b)),
            Ok(UpstreamStep::StartTls) => Up::StartTls,
            Ok(UpstreamStep::NeedToken) => Up::NeedToken,
            Ok(UpstreamStep::Authenticated(ok)) => Up::Ok(ok.capabilities, text(&ok.leftover)),
            Ok(UpstreamStep::Rejected(r)) => Up::Rejected {
                status: r.challenge.and_then(|c| c.status),
                text: r.refusal.to_string(),
                retry: r.retry_suggested,
            },
            Err(e) => {
                evs.push(Up::Err(e.to_string()));
                return;
            }
        };
        evs.push(ev);
    }
}

/// Feeds server bytes and collects the resulting steps.
pub fn up_feed(u: &mut dyn UpstreamLogin, input: &[u8]) -> Vec<Up> {
    let mut evs = Vec::new();
    u.feed(input);
    up_pump(u, &mut evs);
    evs
}

/// An upstream step that sends `text`.
pub fn send(text: &str) -> Up {
    Up::Send(text.to_owned())
}

/// Provides [`token`] and collects the resulting steps.
pub fn provide(u: &mut dyn UpstreamLogin) -> Vec<Up> {
    u.provide_token(&token());
    up_feed(u, b"")
}

/// One client-session step, as the tests compare it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ev {
    Out(String),
    StartTls(String),
    Login {
        user: String,
        pass: String,
        info: Option<String>,
    },
    Close(String),
    Spool {
        from: String,
        to: Vec<String>,
        data: String,
    },
}

/// Runs the session until it needs input, merging consecutive sends.
pub fn pump(sess: &mut dyn ClientSession, evs: &mut Vec<Ev>) {
    loop {
        let ev = match sess.next_step() {
            ClientStep::NeedInput => return,
            ClientStep::Send(b) => {
                if let Some(Ev::Out(prev)) = evs.last_mut() {
                    prev.push_str(&text(&b));
                    continue;
                }
                Ev::Out(text(&b))
            }
            ClientStep::StartTls(b) => Ev::StartTls(text(&b)),
            ClientStep::Login(req) => Ev::Login {
                user: req.credentials.user.clone(),
                pass: req.credentials.password.expose_secret().to_owned(),
                info: req.client_info.clone(),
            },
            ClientStep::Close(b) => Ev::Close(text(&b)),
            ClientStep::Spool(m) => Ev::Spool {
                from: m.from,
                to: m.recipients,
                data: text(&m.data),
            },
        };
        evs.push(ev);
    }
}

/// Feeds `input` in chunks of `chunk` bytes.
pub fn drive(sess: &mut dyn ClientSession, input: &[u8], chunk: usize) -> Vec<Ev> {
    let mut evs = Vec::new();
    for part in input.chunks(chunk.max(1)) {
        sess.feed(part);
        pump(sess, &mut evs);
    }
    evs
}

/// Runs `input` through a fresh session whole; the same input one byte at
/// a time must give the same steps and leave the same pending bytes.
pub fn run_both_ways<S: ClientSession>(make: impl Fn() -> S, input: &[u8]) -> (S, Vec<Ev>) {
    let mut sess = make();
    let evs = drive(&mut sess, input, usize::MAX);
    let mut slow = make();
    assert_eq!(drive(&mut slow, input, 1), evs, "byte-at-a-time differs");
    let mut again = make();
    drive(&mut again, input, usize::MAX);
    assert_eq!(slow.take_pending(), again.take_pending());
    (sess, evs)
}

/// A client-session step that writes `text`.
pub fn out(text: &str) -> Ev {
    Ev::Out(text.to_owned())
}

/// A client-session step that asks to log in.
pub fn login(user: &str, pass: &str, info: Option<&str>) -> Ev {
    Ev::Login {
        user: user.to_owned(),
        pass: pass.to_owned(),
        info: info.map(str::to_owned),
    }
}

/// Feeds a server script to a fresh upstream login in pieces of `chunk`
/// bytes, providing `token` whenever it is asked for; returns every step.
pub fn run_script(
    u: &mut dyn UpstreamLogin,
    script: &[&[u8]],
    chunk: usize,
    token: &BearerToken,
) -> Vec<Up> {
    let mut evs = Vec::new();
    for part in script {
        for piece in part.chunks(chunk.max(1)) {
            u.feed(piece);
            up_pump(u, &mut evs);
        }
        if evs.last() == Some(&Up::NeedToken) {
            u.provide_token(token);
            up_pump(u, &mut evs);
        }
    }
    evs
}

/// A small deterministic generator (xorshift64) for the random-input
/// tests: reproducible without a dependency.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}
