//! Minimal IMAP and SMTP clients for the benchmark. One code path serves
//! both routes; only the connection and the login differ: through
//! mailbridge a client connects in plain text and logs in with a password
//! (IMAP `LOGIN`, SMTP `AUTH PLAIN`), directly it connects with TLS
//! (implicit for IMAP, STARTTLS for SMTP) and authenticates with SASL
//! XOAUTH2 and an initial response.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Any byte stream a client can run over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where a client connects and how it logs in.
#[derive(Clone)]
pub enum Route {
    /// Straight to the upstream: TLS, then XOAUTH2 with `token`.
    Direct {
        /// The upstream server.
        addr: SocketAddr,
        /// Trusts the sandbox CA; one config per run, so TLS sessions
        /// resume as they do in mailbridge.
        tls: Arc<ClientConfig>,
        /// The name checked in the server's certificate.
        name: ServerName<'static>,
        /// The mailbox.
        user: String,
        /// A live access token.
        token: String,
    },
    /// Through a relay that does the TLS upstream itself (haproxy):
    /// plain text on loopback, then XOAUTH2 with `token` as a direct
    /// client would.
    Relay {
        /// The relay's listener.
        addr: SocketAddr,
        /// The mailbox.
        user: String,
        /// A live access token.
        token: String,
    },
    /// Through mailbridge: plain text on loopback, the local password.
    Proxy {
        /// mailbridge's listener.
        addr: SocketAddr,
        /// The account.
        user: String,
        /// The local password.
        password: String,
    },
}

impl Route {
    /// The same direct route with another token (after a refresh).
    pub fn with_token(&self, new: &str) -> Route {
        let mut r = self.clone();
        if let Route::Direct { token, .. } | Route::Relay { token, .. } = &mut r {
            *token = new.to_string();
        }
        r
    }
}

fn protocol_error(what: &str, line: &[u8]) -> io::Error {
    io::Error::other(format!(
        "{what}: {}",
        String::from_utf8_lossy(line).trim_end()
    ))
}

/// The XOAUTH2 initial response, base64-encoded.
pub fn xoauth2(user: &str, token: &str) -> String {
    STANDARD.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// An IMAP quoted string.
pub fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

async fn tls_connect(
    tcp: TcpStream,
    tls: &Arc<ClientConfig>,
    name: &ServerName<'static>,
) -> io::Result<Box<dyn Io>> {
    let s = TlsConnector::from(tls.clone())
        .connect(name.clone(), tcp)
        .await?;
    Ok(Box::new(s))
}

async fn tcp(addr: SocketAddr) -> io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Line reading shared by both clients.
struct Lines<S = Box<dyn Io>> {
    io: BufReader<S>,
    line: Vec<u8>,
}

impl<S: Io> Lines<S> {
    fn new(io: S, buffer: usize) -> Lines<S> {
        Lines {
            io: BufReader::with_capacity(buffer, io),
            line: Vec::new(),
        }
    }

    /// The next line with its CRLF; an error at end of stream.
    async fn next(&mut self) -> io::Result<&[u8]> {
        self.line.clear();
        let n = self.io.read_until(b'\n', &mut self.line).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(&self.line)
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let w = self.io.get_mut();
        w.write_all(bytes).await?;
        w.flush().await
    }

    /// Reads and drops exactly `n` bytes.
    async fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            let buf = self.io.fill_buf().await?;
            if buf.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.io.consume(take);
            n -= take as u64;
        }
        Ok(())
    }

    /// SMTP: reads one reply (all its lines); its code must be `code`.
    async fn expect(&mut self, code: u16, what: &str) -> io::Result<()> {
        loop {
            let line = self.next().await?;
            let got = std::str::from_utf8(line.get(..3).unwrap_or_default())
                .ok()
                .and_then(|c| c.parse::<u16>().ok());
            if got != Some(code) {
                return Err(protocol_error(what, line));
            }
            if line.get(3) != Some(&b'-') {
                return Ok(());
            }
        }
    }

    /// SMTP EHLO; returns whether the server pipelines.
    async fn ehlo(&mut self) -> io::Result<bool> {
        self.send(b"EHLO bench.example\r\n").await?;
        let mut pipelining = false;
        loop {
            let line = self.next().await?;
            if !line.starts_with(b"250") {
                return Err(protocol_error("EHLO", line));
            }
            let text = String::from_utf8_lossy(line.get(4..).unwrap_or_default());
            if text.trim().eq_ignore_ascii_case("PIPELINING") {
                pipelining = true;
            }
            if line.get(3) == Some(&b' ') {
                return Ok(pipelining);
            }
        }
    }
}

/// The size of a literal that ends `line` (`... {123}\r\n`).
pub fn literal_size(line: &[u8]) -> Option<u64> {
    let body = line.strip_suffix(b"\r\n").unwrap_or(line);
    let body = body.strip_suffix(b"}")?;
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = &body[open + 1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// An IMAP client, logged in.
pub struct Imap {
    lines: Lines,
    next_tag: u32,
}

/// What a FETCH of message bodies returned.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    /// Untagged FETCH responses.
    pub messages: u32,
    /// Bytes of message data (the literals).
    pub bytes: u64,
}

impl Imap {
    /// Connects over `route`, reads the greeting and logs in. `buffer` is
    /// the read buffer size (small for idle sessions, large for FETCH).
    pub async fn open(route: &Route, buffer: usize) -> io::Result<Imap> {
        let io: Box<dyn Io> = match route {
            Route::Direct {
                addr, tls, name, ..
            } => tls_connect(tcp(*addr).await?, tls, name).await?,
            Route::Proxy { addr, .. } | Route::Relay { addr, .. } => Box::new(tcp(*addr).await?),
        };
        let mut c = Imap {
            lines: Lines::new(io, buffer),
            next_tag: 1,
        };
        let greeting = c.lines.next().await?;
        if !greeting.starts_with(b"* OK") {
            return Err(protocol_error("IMAP greeting", greeting));
        }
        match route {
            Route::Direct { user, token, .. } | Route::Relay { user, token, .. } => {
                c.command(&format!("AUTHENTICATE XOAUTH2 {}", xoauth2(user, token)))
                    .await?;
            }
            Route::Proxy { user, password, .. } => {
                c.command(&format!("LOGIN {} {}", quote(user), quote(password)))
                    .await?;
            }
        }
        Ok(c)
    }

    fn tag(&mut self) -> String {
        let t = format!("b{}", self.next_tag);
        self.next_tag += 1;
        t
    }

    /// Sends a command and reads to its tagged reply, which must be OK.
    /// Returns the untagged `EXISTS` count seen, if any.
    async fn command(&mut self, text: &str) -> io::Result<Option<u32>> {
        let tag = self.tag();
        self.lines
            .send(format!("{tag} {text}\r\n").as_bytes())
            .await?;
        let mut exists = None;
        loop {
            let line = self.lines.next().await?;
            if line.starts_with(tag.as_bytes()) && line.get(tag.len()) == Some(&b' ') {
                let status = &line[tag.len() + 1..];
                if status.starts_with(b"OK") {
                    return Ok(exists);
                }
                return Err(protocol_error(text.split(' ').next().unwrap_or(""), line));
            }
            if line.starts_with(b"+") {
                // A continuation: in these commands only a refused
                // XOAUTH2 login asks for one (its error challenge); fail
                // now rather than wait for a tagged reply that never comes.
                return Err(protocol_error(text.split(' ').next().unwrap_or(""), line));
            }
            if let Some(rest) = line.strip_prefix(b"* ") {
                let text = String::from_utf8_lossy(rest);
                let mut words = text.split_whitespace();
                if let (Some(n), Some("EXISTS")) = (words.next(), words.next()) {
                    exists = n.parse().ok();
                }
            }
        }
    }

    /// NOOP.
    pub async fn noop(&mut self) -> io::Result<()> {
        self.command("NOOP").await.map(drop)
    }

    /// SELECT; returns the number of messages.
    pub async fn select(&mut self, mailbox: &str) -> io::Result<u32> {
        Ok(self
            .command(&format!("SELECT {}", quote(mailbox)))
            .await?
            .unwrap_or(0))
    }

    /// `FETCH set BODY[]`: reads every literal through and drops it.
    pub async fn fetch_bodies(&mut self, set: &str) -> io::Result<Fetched> {
        let tag = self.tag();
        self.lines
            .send(format!("{tag} FETCH {set} BODY[]\r\n").as_bytes())
            .await?;
        let mut got = Fetched::default();
        loop {
            let line = self.lines.next().await?;
            if line.starts_with(tag.as_bytes()) && line.get(tag.len()) == Some(&b' ') {
                if line[tag.len() + 1..].starts_with(b"OK") {
                    return Ok(got);
                }
                return Err(protocol_error("FETCH", line));
            }
            if line.starts_with(b"* ") {
                got.messages += 1;
            }
            if let Some(n) = literal_size(line) {
                got.bytes += n;
                self.lines.skip(n).await?;
            }
        }
    }

    /// APPEND of one message with a synchronizing literal.
    pub async fn append(&mut self, mailbox: &str, message: &[u8]) -> io::Result<()> {
        let tag = self.tag();
        self.lines
            .send(format!("{tag} APPEND {} {{{}}}\r\n", quote(mailbox), message.len()).as_bytes())
            .await?;
        let go = self.lines.next().await?;
        if !go.starts_with(b"+") {
            return Err(protocol_error("APPEND", go));
        }
        self.lines.send(message).await?;
        self.lines.send(b"\r\n").await?;
        loop {
            let line = self.lines.next().await?;
            if line.starts_with(tag.as_bytes()) && line.get(tag.len()) == Some(&b' ') {
                if line[tag.len() + 1..].starts_with(b"OK") {
                    return Ok(());
                }
                return Err(protocol_error("APPEND", line));
            }
        }
    }

    /// LOGOUT: reads to the tagged OK.
    pub async fn logout(mut self) -> io::Result<()> {
        self.command("LOGOUT").await.map(drop)
    }
}

/// An SMTP client, authenticated.
pub struct Smtp {
    lines: Lines,
    pipelining: bool,
}

/// A mail body in wire form: CRLF lines of printable text, none starting
/// with a dot, about `size` bytes, ending with the `.` line.
pub fn message_wire(size: usize, from: &str, to: &str) -> Vec<u8> {
    let mut m = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: mailbridge benchmark\r\n\
         Message-ID: <bench@example.com>\r\n\r\n"
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog, 0123456789 abcdefghijklmnop\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    while m.len() + 2 < size {
        m.push(b'x');
    }
    m.extend_from_slice(b"\r\n.\r\n");
    m
}

impl Smtp {
    /// Connects over `route`, says EHLO (and STARTTLS directly) and
    /// authenticates.
    pub async fn open(route: &Route) -> io::Result<Smtp> {
        let mut c = match route {
            Route::Direct {
                addr,
                tls,
                name,
                user,
                token,
            } => {
                let mut plain = Lines::new(tcp(*addr).await?, 4096);
                plain.expect(220, "greeting").await?;
                plain.ehlo().await?;
                plain.send(b"STARTTLS\r\n").await?;
                plain.expect(220, "STARTTLS").await?;
                if !plain.io.buffer().is_empty() {
                    return Err(io::Error::other("data after the STARTTLS reply"));
                }
                let io = tls_connect(plain.io.into_inner(), tls, name).await?;
                let mut lines = Lines::new(io, 4096);
                let pipelining = lines.ehlo().await?;
                lines
                    .send(format!("AUTH XOAUTH2 {}\r\n", xoauth2(user, token)).as_bytes())
                    .await?;
                Smtp { lines, pipelining }
            }
            Route::Relay { addr, user, token } => {
                let io: Box<dyn Io> = Box::new(tcp(*addr).await?);
                let mut lines = Lines::new(io, 4096);
                lines.expect(220, "greeting").await?;
                let pipelining = lines.ehlo().await?;
                lines
                    .send(format!("AUTH XOAUTH2 {}\r\n", xoauth2(user, token)).as_bytes())
                    .await?;
                Smtp { lines, pipelining }
            }
            Route::Proxy {
                addr,
                user,
                password,
            } => {
                let io: Box<dyn Io> = Box::new(tcp(*addr).await?);
                let mut lines = Lines::new(io, 4096);
                lines.expect(220, "greeting").await?;
                let pipelining = lines.ehlo().await?;
                let plain = STANDARD.encode(format!("\0{user}\0{password}"));
                lines
                    .send(format!("AUTH PLAIN {plain}\r\n").as_bytes())
                    .await?;
                Smtp { lines, pipelining }
            }
        };
        c.lines.expect(235, "AUTH").await?;
        Ok(c)
    }

    /// One message: MAIL, RCPT and DATA in one write when the server
    /// pipelines, then the body from [`message_wire`].
    pub async fn send(&mut self, from: &str, to: &str, wire: &[u8]) -> io::Result<()> {
        let mail = format!("MAIL FROM:<{from}>\r\n");
        let rcpt = format!("RCPT TO:<{to}>\r\n");
        let l = &mut self.lines;
        if self.pipelining {
            l.send(format!("{mail}{rcpt}DATA\r\n").as_bytes()).await?;
            l.expect(250, "MAIL").await?;
            l.expect(250, "RCPT").await?;
            l.expect(354, "DATA").await?;
        } else {
            l.send(mail.as_bytes()).await?;
            l.expect(250, "MAIL").await?;
            l.send(rcpt.as_bytes()).await?;
            l.expect(250, "RCPT").await?;
            l.send(b"DATA\r\n").await?;
            l.expect(354, "DATA").await?;
        }
        l.send(wire).await?;
        l.expect(250, "end of DATA").await
    }

    /// QUIT.
    pub async fn quit(mut self) -> io::Result<()> {
        self.lines.send(b"QUIT\r\n").await?;
        self.lines.expect(221, "QUIT").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_sizes() {
        assert_eq!(literal_size(b"* 1 FETCH (BODY[] {123}\r\n"), Some(123));
        assert_eq!(literal_size(b"* 1 FETCH (BODY[] {0}\r\n"), Some(0));
        assert_eq!(literal_size(b"* 1 FETCH (FLAGS ())\r\n"), None);
        assert_eq!(literal_size(b"{}\r\n"), None);
        assert_eq!(literal_size(b"{1a}\r\n"), None);
    }

    #[test]
    fn message_has_the_size_and_no_dot_lines() {
        let m = message_wire(100 * 1024, "a@example.com", "b@example.com");
        assert!(m.ends_with(b"\r\n.\r\n"));
        let body = &m[..m.len() - 3];
        assert_eq!(body.len(), 100 * 1024);
        assert!(!body.split(|&b| b == b'\n').any(|l| l.starts_with(b".")));
        assert!(
            body.windows(2)
                .filter(|w| w[1] == b'\n')
                .all(|w| w[0] == b'\r')
        );
    }

    #[test]
    fn xoauth2_and_quote() {
        let decoded = STANDARD.decode(xoauth2("u@x", "t")).unwrap();
        assert_eq!(decoded, b"user=u@x\x01auth=Bearer t\x01\x01");
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
