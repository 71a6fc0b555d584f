//! The bodies of mailbridge's fuzz targets, one function per target.
//!
//! Each takes the fuzzer's bytes, drives one parser or state machine the
//! way mailbridge's I/O code does, and asserts what must hold whatever the
//! input: no panic, and every reply mailbridge would write is made of
//! whole CRLF-terminated lines (no bare CR or LF that a peer's bytes could
//! smuggle in), and every command sent upstream is exactly one line.
//!
//! `fuzz_targets/*.rs` hand them to libFuzzer (`cargo fuzz run TARGET` in
//! this folder); the root package's `tests/fuzz_corpus.rs` replays every
//! file of `corpus/TARGET/` through the same functions in `cargo test`.
//!
//! The first bytes of an input choose the session's options and how the
//! rest is cut into reads, so the fuzzer explores both what is said and
//! how it arrives.

use mailbridge_proto::sasl::{self, BearerToken};
use mailbridge_proto::{
    ClientSession, ClientStep, FailureKind, LoginFailure, UpstreamLogin, UpstreamStep,
    UpstreamSuccess, imap, pop3, smtp,
};

/// How the input is cut into reads: sizes from a small generator seeded by
/// one input byte (0 means one byte at a time).
struct Chunks(u32);

impl Chunks {
    fn new(seed: u8) -> Chunks {
        Chunks(u32::from(seed))
    }

    fn next(&mut self) -> usize {
        if self.0 == 0 {
            return 1;
        }
        // xorshift32
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        1 + (x % 64) as usize
    }
}

/// Splits off `n` option bytes (zeros when the input is shorter).
fn header<const N: usize>(data: &[u8]) -> ([u8; N], &[u8]) {
    let mut head = [0u8; N];
    let n = data.len().min(N);
    head[..n].copy_from_slice(&data[..n]);
    (head, &data[n..])
}

/// Every CR is followed by LF and every LF follows a CR, and the bytes end
/// with CRLF: whole lines only.
fn assert_whole_lines(what: &str, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    assert!(
        bytes.ends_with(b"\r\n"),
        "{what} does not end with CRLF: {:?}",
        String::from_utf8_lossy(bytes)
    );
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\r' => assert!(
                bytes.get(i + 1) == Some(&b'\n'),
                "{what} has a bare CR: {:?}",
                String::from_utf8_lossy(bytes)
            ),
            b'\n' => assert!(
                i > 0 && bytes[i - 1] == b'\r',
                "{what} has a bare LF: {:?}",
                String::from_utf8_lossy(bytes)
            ),
            _ => {}
        }
    }
}

/// Exactly one line: whole lines, and the only LF is the last byte.
fn assert_one_line(what: &str, bytes: &[u8]) {
    assert_whole_lines(what, bytes);
    assert!(
        bytes.iter().filter(|&&b| b == b'\n').count() == 1,
        "{what} is not exactly one line: {:?}",
        String::from_utf8_lossy(bytes)
    );
}

/// Drives a client-facing pre-auth session over `input` as the connection
/// driver does. Logins alternate between refused and accepted; the first
/// accepted one ends the pre-auth phase.
fn drive_client(session: &mut dyn ClientSession, input: &[u8], mut chunks: Chunks) {
    assert_whole_lines("greeting", &session.greeting());
    let refusal = LoginFailure {
        kind: FailureKind::BadCredentials,
        reason: "wrong password for `user` (fuzzing)".into(),
        upstream_reply: None,
    };
    let mut pos = 0;
    let mut logins = 0u32;
    loop {
        match session.next_step() {
            ClientStep::NeedInput => {
                if pos >= input.len() {
                    break;
                }
                let n = chunks.next().min(input.len() - pos);
                session.feed(&input[pos..pos + n]);
                pos += n;
            }
            ClientStep::Send(bytes) => assert_whole_lines("reply", &bytes),
            ClientStep::StartTls(bytes) => {
                assert_whole_lines("STARTTLS reply", &bytes);
                session.tls_started();
            }
            ClientStep::Login(_request) => {
                logins += 1;
                if logins % 2 == 1 {
                    assert_whole_lines("login refusal", &session.login_failed(&refusal));
                } else if logins.is_multiple_of(4) {
                    // A spooling listener: the session stays and takes
                    // messages itself (SMTP; the others answer nothing).
                    let ok = session.login_local(vec!["user@example.com".into()]);
                    assert_whole_lines("local login", &ok);
                } else {
                    let ok = session.login_succeeded(&UpstreamSuccess::default());
                    assert_whole_lines("login success", &ok);
                    let _pipelined = session.take_pending();
                    break;
                }
            }
            ClientStep::Close(bytes) => {
                assert_whole_lines("closing reply", &bytes);
                break;
            }
            ClientStep::Spool(_message) => {
                let outcome = mailbridge_proto::SpoolOutcome::Queued { id: "q1".into() };
                assert_whole_lines("spool reply", &session.spooled(&outcome));
            }
        }
    }
    assert_whole_lines("timeout message", &session.timeout_message());
    assert_whole_lines("shutdown message", &session.shutdown_message());
}

/// Option bits shared by the three client-facing targets.
struct ClientFlags {
    starttls_offered: bool,
    tls_active: bool,
    plaintext_login_allowed: bool,
    small_limits: bool,
    /// SMTP: a device known by its address, spooling or live.
    device: Option<bool>,
}

impl ClientFlags {
    fn from(b: u8) -> ClientFlags {
        ClientFlags {
            starttls_offered: b & 1 != 0,
            tls_active: b & 2 != 0,
            plaintext_login_allowed: b & 4 == 0,
            small_limits: b & 8 != 0,
            device: (b & 16 != 0).then_some(b & 32 != 0),
        }
    }
}

/// Reads a client target's input (option bits, chunking seed, the bytes)
/// and drives the session `make` builds from the option bits.
fn fuzz_client(data: &[u8], make: impl FnOnce(&ClientFlags) -> Box<dyn ClientSession>) {
    let ([flags, seed], input) = header::<2>(data);
    let mut session = make(&ClientFlags::from(flags));
    drive_client(session.as_mut(), input, Chunks::new(seed));
}

/// IMAP's client-facing pre-auth session (LOGIN, AUTHENTICATE, literals,
/// ID, STARTTLS) fed arbitrary bytes in arbitrary reads.
pub fn client_imap(data: &[u8]) {
    fuzz_client(data, |f| {
        let mut opts = imap::ClientOptions {
            starttls_offered: f.starttls_offered,
            tls_active: f.tls_active,
            plaintext_login_allowed: f.plaintext_login_allowed,
            ..Default::default()
        };
        if f.small_limits {
            opts.max_line = 64;
            opts.max_literal = 128;
        }
        Box::new(imap::ImapClientSession::new(opts))
    });
}

/// POP3's client-facing pre-auth session (USER/PASS, AUTH, STLS, CAPA).
pub fn client_pop3(data: &[u8]) {
    fuzz_client(data, |f| {
        let mut opts = pop3::ClientOptions {
            starttls_offered: f.starttls_offered,
            tls_active: f.tls_active,
            plaintext_login_allowed: f.plaintext_login_allowed,
            ..Default::default()
        };
        if f.small_limits {
            opts.max_line = 64;
        }
        Box::new(pop3::Pop3ClientSession::new(opts))
    });
}

/// SMTP's client-facing pre-auth session (EHLO/HELO, AUTH PLAIN/LOGIN,
/// STARTTLS, MAIL before AUTH), as a device known by its address too
/// (MAIL, RCPT, DATA taken whole for the spool, or a live login), and
/// after a local login on a spooling listener.
pub fn client_smtp(data: &[u8]) {
    fuzz_client(data, |f| {
        let mut opts = smtp::ClientOptions {
            starttls_offered: f.starttls_offered,
            tls_active: f.tls_active,
            plaintext_login_allowed: f.plaintext_login_allowed,
            ..Default::default()
        };
        if f.small_limits {
            opts.max_line = 64;
            opts.max_message_size = 1000;
        }
        opts.device = f.device.map(|spool| smtp::DeviceOptions {
            senders: vec!["scanner@example.com".into()],
            spool,
        });
        Box::new(smtp::SmtpClientSession::new(opts))
    });
}

fn token() -> BearerToken {
    BearerToken {
        user: "user@example.com".into(),
        token: secrecy::SecretString::from("ya29.fuzz-token"),
        host: "mail.example.com".into(),
        port: 993,
    }
}

/// Drives an upstream login dialogue over `input` (what the server says)
/// as the upstream connector does: a token whenever asked, one retry when
/// a refusal suggests it.
fn drive_upstream(login: &mut dyn UpstreamLogin, input: &[u8], mut chunks: Chunks) {
    let mut pos = 0;
    let mut retried = false;
    let token = token();
    loop {
        match login.next_step() {
            Err(_) => break,
            Ok(UpstreamStep::NeedInput) => {
                if pos >= input.len() {
                    break;
                }
                let n = chunks.next().min(input.len() - pos);
                login.feed(&input[pos..pos + n]);
                pos += n;
            }
            Ok(UpstreamStep::Send(bytes)) => assert_one_line("command sent upstream", &bytes),
            Ok(UpstreamStep::StartTls) => login.tls_started(),
            Ok(UpstreamStep::NeedToken) => login.provide_token(&token),
            Ok(UpstreamStep::Authenticated(_)) => break,
            Ok(UpstreamStep::Rejected(rejection)) => {
                if rejection.retry_suggested && !retried {
                    retried = true;
                    login.retry();
                } else {
                    break;
                }
            }
        }
    }
}

fn preference(b: u8) -> Vec<sasl::Mechanism> {
    use sasl::Mechanism::{Oauthbearer, Xoauth2};
    match b % 4 {
        0 => vec![Xoauth2, Oauthbearer],
        1 => vec![Oauthbearer, Xoauth2],
        2 => vec![Xoauth2],
        _ => vec![Oauthbearer],
    }
}

/// mailbridge logging in to an IMAP server: greeting, CAPABILITY,
/// STARTTLS, AUTHENTICATE with challenges, ID, refusals.
pub fn upstream_imap(data: &[u8]) {
    let ([flags, seed], input) = header::<2>(data);
    let mut opts = imap::UpstreamOptions {
        starttls: flags & 1 != 0,
        preference: preference(flags >> 1),
        client_id: (flags & 8 != 0).then(|| "(\"name\" \"fuzz\")".to_string()),
        ..Default::default()
    };
    if flags & 16 != 0 {
        opts.max_line = 64;
    }
    drive_upstream(
        &mut imap::ImapUpstreamLogin::new(opts),
        input,
        Chunks::new(seed),
    );
}

/// mailbridge logging in to a POP3 server: greeting, CAPA, STLS, AUTH.
pub fn upstream_pop3(data: &[u8]) {
    let ([flags, seed], input) = header::<2>(data);
    let mut opts = pop3::UpstreamOptions {
        starttls: flags & 1 != 0,
        preference: preference(flags >> 1),
        initial_response: flags & 8 != 0,
        ..Default::default()
    };
    if flags & 16 != 0 {
        opts.max_line = 64;
    }
    drive_upstream(
        &mut pop3::Pop3UpstreamLogin::new(opts),
        input,
        Chunks::new(seed),
    );
}

/// mailbridge logging in to an SMTP server: greeting, EHLO (multi-line),
/// STARTTLS, AUTH in one or two steps, challenges, refusals.
pub fn upstream_smtp(data: &[u8]) {
    let ([flags, seed], input) = header::<2>(data);
    let mut opts = smtp::UpstreamOptions {
        starttls: flags & 1 != 0,
        preference: preference(flags >> 1),
        ehlo_name: (flags & 8 != 0).then(|| "client.example.com".to_string()),
        ..Default::default()
    };
    if flags & 16 != 0 {
        opts.max_line = 64;
    }
    drive_upstream(
        &mut smtp::SmtpUpstreamLogin::new(opts),
        input,
        Chunks::new(seed),
    );
}

/// SASL decoding (base64, PLAIN, the LOGIN pair) and the failure
/// challenge's JSON; what PLAIN decodes must round-trip.
pub fn sasl(data: &[u8]) {
    let _ = sasl::decode_base64(data);
    let _ = sasl::parse_failure_challenge(data);
    if let Ok(c) = sasl::decode_plain(data) {
        use secrecy::ExposeSecret;
        // What PLAIN accepted names a user and carries a password without
        // the separator that would make it ambiguous.
        assert!(!c.user.contains('\0'), "user with NUL");
        assert!(
            !c.password.expose_secret().contains('\0'),
            "password with NUL"
        );
    }
    let (user, password) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let _ = sasl::login_credentials(user, password);
}

/// A protocol trace's transcript (`mailbridge trace`): bytes of both
/// sides, as read and written, rendered line by line with credentials
/// redacted. The first byte picks the protocol and how reads are cut;
/// the rest is runs separated by NUL, said alternately by the answering
/// side and the side that logs in. Each rendering is one line of bounded
/// length, and the lines are the same however the bytes arrive.
pub fn trace(data: &[u8]) {
    use mailbridge_proto::trace::{MAX_SHOWN, Protocol, Side, Transcript};
    let ([head], rest) = header::<1>(data);
    let protocol = match head % 3 {
        0 => Protocol::Imap,
        1 => Protocol::Pop3,
        _ => Protocol::Smtp,
    };
    let mut whole = Transcript::new(protocol);
    let mut cut = Transcript::new(protocol);
    let mut chunks = Chunks::new(head / 3);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (i, run) in rest.split(|&b| b == 0).enumerate() {
        let side = if i % 2 == 0 {
            Side::Answers
        } else {
            Side::LogsIn
        };
        a.extend(whole.push(side, run));
        let mut run = run;
        while !run.is_empty() {
            let n = chunks.next().min(run.len());
            b.extend(cut.push(side, &run[..n]));
            run = &run[n..];
        }
    }
    assert_eq!(a, b, "the rendering depends on how the bytes arrived");
    for line in &a {
        assert!(
            !line.contains(['\r', '\n']),
            "a rendering spans lines: {line:?}"
        );
        // The shown text, a cut note and a left-out note at most.
        assert!(
            line.chars().count() <= MAX_SHOWN + 120,
            "a rendering of {} characters",
            line.chars().count()
        );
    }
}

/// The configuration loader: TOML, validation with line numbers.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(e) = mailbridge::config::Settings::parse(text, "fuzz.toml")
    {
        // The message names a line of the input and is one line.
        let msg = e.to_string();
        assert!(!msg.is_empty());
    }
}

/// The PROXY protocol header, read the way mailbridge's listener reads it
/// (exactly the bytes `parse` asks for, never more) and parsed whole; the
/// two must agree, and no read may pass the header's end or its bound.
pub fn proxy_header(data: &[u8]) {
    use mailbridge_proto::proxy::{self, Parse, Version};
    let mut have = 0;
    let stepwise = loop {
        match proxy::parse(&data[..have]) {
            Ok(Parse::NeedMore(n)) => {
                assert!(n >= 1, "asked for no bytes at {have}");
                assert!(
                    have + n <= proxy::MAX_LEN,
                    "asked past the longest header: {have} + {n}"
                );
                if have + n > data.len() {
                    break Ok(Parse::NeedMore(n));
                }
                have += n;
            }
            other => break other,
        }
    };
    let whole = proxy::parse(data);
    match (&stepwise, &whole) {
        (Ok(Parse::Done(a)), Ok(Parse::Done(b))) => {
            assert_eq!(a, b, "read in steps and whole disagree");
            assert_eq!(a.len, have, "the header's length is what was read");
            let most = match a.version {
                Version::V1 => proxy::V1_MAX_LEN,
                Version::V2 => proxy::MAX_LEN,
            };
            assert!(a.len <= most, "{a:?} is longer than allowed");
            assert_eq!(proxy::parse(&data[..a.len]), Ok(Parse::Done(*a)));
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "read in steps and whole refused differently"),
        (Ok(Parse::NeedMore(_)), Ok(Parse::NeedMore(_)) | Err(_)) => {}
        _ => panic!("read in steps: {stepwise:?}; whole: {whole:?}"),
    }
}
