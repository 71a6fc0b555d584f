//! The line framer the three protocol cores share. It owns the bytes a
//! peer sent that nobody has consumed yet, and hands them out whole: lines
//! for POP3 and SMTP, messages for IMAP (a line plus the literals it
//! announces, each literal's continuation line included). No other module
//! reads or changes its buffers; sessions push bytes in and take frames,
//! the unframed rest (`take`) or nothing (`reset`).
//!
//! # Memory controls
//!
//! Before login a stranger decides what we are sent, so everything the
//! framer holds on a peer's behalf is bounded:
//!
//! - `max_line`: the longest line accepted, line ending included. A line
//!   that cannot fit is reported once ([`Frame::LineTooLong`]) as soon as
//!   that is certain, and dropped up to its line ending while keeping none
//!   of it (with literals on, its last [`TAIL`] bytes, to see whether it
//!   announced a literal that must be skipped or refused too).
//! - `max_literal` (IMAP, [`Literals`]): the largest literal accepted; a
//!   message never grows past `max_line + max_literal`. A larger literal is
//!   refused before its bytes come (synchronising `{n}`: the peer waits for
//!   our go-ahead) or skipped byte-exactly (non-synchronising `{n+}`), so
//!   literal bytes are never mistaken for commands.
//!
//! Unframed input is whatever was pushed and not yet framed: one read
//! buffer when the driver alternates `push` and `next` until
//! [`Frame::NeedMore`].
//!
//! # Work
//!
//! A scan position remembers how far the unframed bytes were searched for
//! a line feed, so a line that arrives one byte at a time is still looked
//! at once per byte: framing is linear in the input however it is split
//! (the `linear_*` tests count it).
//!
//! # Secrets
//!
//! Pre-auth lines carry passwords: the buffers are wiped on `reset`, on
//! discard and on drop, and the `Debug` form shows sizes only.

use std::fmt;

use secrecy::zeroize::Zeroize;

/// How many bytes of a dropped line we keep to spot a literal announced at
/// its end (`{4294967295+}\r\n` is 15 bytes).
const TAIL: usize = 32;

/// IMAP literal handling: what a line ending in `{n}` or `{n+}` means.
#[derive(Clone, Copy)]
pub(crate) struct Literals {
    /// The largest literal accepted.
    pub max_literal: usize,
    /// Names a message in a report about it (IMAP: its tag), read before
    /// its bytes are dropped, so a refusal can be addressed to it.
    pub label: fn(&[u8]) -> Option<String>,
}

/// What the framer found next.
pub(crate) enum Frame {
    /// More input is needed.
    NeedMore,
    /// A complete line with its line ending; with literals, a complete
    /// message (lines and literals, ending with a line ending).
    Message(Vec<u8>),
    /// A line over the limit: reported once, then dropped up to its line
    /// ending (with its message, when literals are on).
    LineTooLong,
    /// What a literal announcement led to (only with [`Literals`]).
    Literal(LiteralEvent),
}

/// What a literal announcement led to.
#[derive(Debug)]
pub(crate) enum LiteralEvent {
    /// A line announced a synchronising literal the framer will accept:
    /// the peer waits for a go-ahead. [`Framer::partial_message`] shows the
    /// message so far; [`Framer::refuse_literal`] drops it instead.
    Sync,
    /// An announced literal is over the limit; its message is dropped. A
    /// synchronising literal's bytes will not come; a non-synchronising
    /// one's are skipped.
    TooLarge {
        /// The dropped message's label.
        label: Option<String>,
    },
    /// A dropped overlong line ended by announcing a synchronising literal:
    /// the peer waits for an answer to that.
    AbandonedSync {
        /// The dropped message's label.
        label: Option<String>,
    },
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::NeedMore => f.write_str("NeedMore"),
            // A pre-auth line may hold a password: its size only.
            Frame::Message(m) => write!(f, "Message(<{} bytes>)", m.len()),
            Frame::LineTooLong => f.write_str("LineTooLong"),
            Frame::Literal(event) => f.debug_tuple("Literal").field(event).finish(),
        }
    }
}

enum State {
    /// Reading a line into the message.
    Line,
    /// Copying an accepted literal into the message.
    Literal { remaining: usize },
    /// Dropping an overlong line up to its line ending.
    Discard {
        /// Its last bytes (literals on), to read an announcement at its end.
        tail: Vec<u8>,
        label: Option<String>,
        /// Look for an announcement at the end.
        literals: bool,
        /// The whole allocation of `buf` was wiped since the discard began.
        wiped: bool,
    },
    /// Dropping the bytes of a refused non-synchronising literal, then the
    /// rest of its message.
    Skip {
        remaining: u64,
        label: Option<String>,
    },
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Line => "line",
            State::Literal { .. } => "literal",
            State::Discard { .. } => "discard",
            State::Skip { .. } => "skip",
        }
    }
}

/// A literal announced at the end of a line: `{n}` (sync) or `{n+}`.
struct Announcement {
    length: u64,
    sync: bool,
}

/// The literal a line ending in `{n}\r\n` or `{n+}\r\n` announces.
fn announcement(line: &[u8]) -> Option<Announcement> {
    let body = line.strip_suffix(b"}\r\n")?;
    let (body, sync) = match body.strip_suffix(b"+") {
        Some(b) => (b, false),
        None => (body, true),
    };
    let start = body
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let digits = &body[start..];
    if digits.is_empty() || body[..start].last() != Some(&b'{') {
        return None;
    }
    let length = digits.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Some(Announcement { length, sync })
}

/// Splits a peer's bytes into lines or IMAP messages under the limits
/// described in the module documentation.
pub(crate) struct Framer {
    /// Received, not yet framed.
    buf: Vec<u8>,
    /// `buf[..scanned]` holds no line feed: where the next search starts.
    scanned: usize,
    /// The message being assembled (IMAP: a line announcing a literal, and
    /// what followed).
    msg: Vec<u8>,
    state: State,
    max_line: usize,
    literals: Option<Literals>,
    /// Bytes searched for a line feed, over the framer's life: the
    /// linearity tests read it.
    #[cfg(test)]
    examined: usize,
    /// Bytes of dropped lines wiped, over the framer's life.
    #[cfg(test)]
    wiped: usize,
}

impl fmt::Debug for Framer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The buffers may hold a password: sizes only.
        f.debug_struct("Framer")
            .field("state", &self.state.name())
            .field("unframed", &self.buf.len())
            .field("message", &self.msg.len())
            .field("max_line", &self.max_line)
            .finish()
    }
}

impl Framer {
    /// A framer of plain lines (POP3, SMTP) of at most `max_line` bytes.
    pub(crate) fn lines(max_line: usize) -> Self {
        Framer::build(max_line, None)
    }

    /// A framer of IMAP messages: lines of at most `max_line` bytes and
    /// the literals they announce.
    pub(crate) fn messages(max_line: usize, literals: Literals) -> Self {
        Framer::build(max_line, Some(literals))
    }

    fn build(max_line: usize, literals: Option<Literals>) -> Self {
        Framer {
            buf: Vec::new(),
            scanned: 0,
            msg: Vec::new(),
            state: State::Line,
            max_line: max_line.max(1),
            literals,
            #[cfg(test)]
            examined: 0,
            #[cfg(test)]
            wiped: 0,
        }
    }

    /// The line limit in force.
    pub(crate) fn max_line(&self) -> usize {
        self.max_line
    }

    /// Bytes read from the peer.
    pub(crate) fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// How many bytes the framer holds (unframed and partial message).
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len() + self.msg.len()
    }

    /// Forgets everything: used at STARTTLS so no plaintext byte survives
    /// into the encrypted session, and when a session closes.
    pub(crate) fn reset(&mut self) {
        self.buf.zeroize();
        self.msg.zeroize();
        self.scanned = 0;
        self.state = State::Line;
    }

    /// Everything not yet framed, handed over whole (pipelined bytes after
    /// a login, a server's bytes after its final response); the framer
    /// starts afresh.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        self.msg.zeroize();
        self.scanned = 0;
        self.state = State::Line;
        std::mem::take(&mut self.buf)
    }

    /// The message so far, after [`LiteralEvent::Sync`]: the line that
    /// announced the literal and anything before it.
    pub(crate) fn partial_message(&self) -> &[u8] {
        &self.msg
    }

    /// Refuses the synchronising literal just announced: its bytes will
    /// not come, so its message ends here and is dropped.
    pub(crate) fn refuse_literal(&mut self) {
        if matches!(self.state, State::Literal { .. }) {
            self.msg.zeroize();
            self.state = State::Line;
        }
    }

    /// The next frame; with literals on, literal announcements count.
    pub(crate) fn next(&mut self) -> Frame {
        let literals = self.literals.is_some();
        self.advance(literals)
    }

    /// The next line with no literal semantics (an IMAP SASL response
    /// line), unless a message is already under way.
    pub(crate) fn next_line(&mut self) -> Frame {
        if !matches!(self.state, State::Line) || !self.msg.is_empty() {
            return self.next();
        }
        self.advance(false)
    }

    /// The position of the next line feed in `buf`, searching only bytes
    /// not searched before.
    fn find_line_feed(&mut self) -> Option<usize> {
        let found = self.buf[self.scanned..].iter().position(|&b| b == b'\n');
        let searched = found.map_or(self.buf.len(), |p| self.scanned + p + 1);
        #[cfg(test)]
        {
            self.examined += searched - self.scanned;
        }
        match found {
            Some(p) => {
                // `buf[..scanned]` still holds no line feed.
                self.scanned += p;
                Some(self.scanned)
            }
            None => {
                self.scanned = searched;
                None
            }
        }
    }

    /// Drops the first `n` unframed bytes.
    fn consume(&mut self, n: usize) {
        self.scanned = self.scanned.saturating_sub(n);
        self.buf.drain(..n);
    }

    /// Moves the first `n` unframed bytes to the message.
    fn move_to_message(&mut self, n: usize) {
        self.scanned = self.scanned.saturating_sub(n);
        self.msg.extend(self.buf.drain(..n));
    }

    fn cap(&self) -> usize {
        let max_literal = self.literals.map_or(0, |l| l.max_literal);
        self.max_line.saturating_add(max_literal)
    }

    /// Starts dropping the current line (and its message).
    fn start_discard(&mut self, literals: bool) -> Frame {
        let label = match (literals, self.literals) {
            (true, Some(l)) => (l.label)(if self.msg.is_empty() {
                &self.buf
            } else {
                &self.msg
            }),
            _ => None,
        };
        self.msg.zeroize();
        self.state = State::Discard {
            tail: Vec::new(),
            label,
            literals,
            wiped: false,
        };
        Frame::LineTooLong
    }

    fn advance(&mut self, literals: bool) -> Frame {
        loop {
            let frame = match self.state {
                State::Line => self.line(literals),
                State::Literal { .. } => self.literal(),
                State::Skip { .. } => self.skip(),
                State::Discard { .. } => self.discard(),
            };
            if let Some(frame) = frame {
                return frame;
            }
        }
    }

    /// Reading a line; `literals`: its announcement counts.
    fn line(&mut self, literals: bool) -> Option<Frame> {
        let limit = if literals { self.cap() } else { self.max_line };
        let Some(pos) = self.find_line_feed() else {
            // Without its line ending the line is already this long: it
            // cannot fit any more.
            if self.buf.len() >= self.max_line || self.msg.len() + self.buf.len() >= limit {
                return Some(self.start_discard(literals));
            }
            return Some(Frame::NeedMore);
        };
        let len = pos + 1;
        if len > self.max_line || self.msg.len() + len > limit {
            return Some(self.start_discard(literals));
        }
        let start = self.msg.len();
        self.move_to_message(len);
        let found = match self.literals {
            Some(l) if literals => announcement(&self.msg[start..]).map(|a| (a, l)),
            _ => None,
        };
        let Some((a, l)) = found else {
            return Some(Frame::Message(std::mem::take(&mut self.msg)));
        };
        let room = self.cap().saturating_sub(self.msg.len());
        let fits = usize::try_from(a.length).is_ok_and(|n| n <= l.max_literal && n <= room);
        if !fits {
            let label = (l.label)(&self.msg);
            self.msg.zeroize();
            if !a.sync {
                self.state = State::Skip {
                    remaining: a.length,
                    label: label.clone(),
                };
            }
            return Some(Frame::Literal(LiteralEvent::TooLarge { label }));
        }
        self.state = State::Literal {
            remaining: usize::try_from(a.length).unwrap_or(usize::MAX),
        };
        // A non-synchronising literal just follows: nothing to say.
        a.sync.then_some(Frame::Literal(LiteralEvent::Sync))
    }

    /// Copying an accepted literal into the message.
    fn literal(&mut self) -> Option<Frame> {
        let State::Literal { remaining } = &mut self.state else {
            return None;
        };
        if *remaining == 0 {
            self.state = State::Line;
            return None;
        }
        if self.buf.is_empty() {
            return Some(Frame::NeedMore);
        }
        let n = (*remaining).min(self.buf.len());
        *remaining -= n;
        self.move_to_message(n);
        None
    }

    /// Skipping a refused non-synchronising literal.
    fn skip(&mut self) -> Option<Frame> {
        let State::Skip { remaining, label } = &mut self.state else {
            return None;
        };
        if *remaining == 0 {
            let label = label.take();
            self.state = State::Discard {
                tail: Vec::new(),
                label,
                literals: true,
                wiped: false,
            };
            return None;
        }
        if self.buf.is_empty() {
            return Some(Frame::NeedMore);
        }
        let n = usize::try_from(*remaining)
            .unwrap_or(usize::MAX)
            .min(self.buf.len());
        *remaining -= n as u64;
        self.consume(n);
        None
    }

    /// Dropping a line up to its line ending.
    fn discard(&mut self) -> Option<Frame> {
        let end = self.find_line_feed();
        let upto = end.map_or(self.buf.len(), |p| p + 1);
        let State::Discard {
            tail,
            label,
            literals,
            wiped,
        } = &mut self.state
        else {
            return None;
        };
        if *literals {
            tail.extend_from_slice(&self.buf[upto.saturating_sub(TAIL)..upto]);
            if tail.len() > TAIL {
                tail.drain(..tail.len() - TAIL);
            }
        }
        if end.is_none() {
            // Nothing of a dropped line is kept. Wiping what is held, not
            // the whole allocation, keeps a line that drips in byte by
            // byte linear: the rest of the allocation was wiped when the
            // discard began, and pushes only wrote below `len`.
            #[cfg(test)]
            {
                self.wiped += if *wiped {
                    self.buf.len()
                } else {
                    self.buf.capacity()
                };
            }
            if *wiped {
                self.buf.as_mut_slice().zeroize();
                self.buf.clear();
            } else {
                self.buf.zeroize();
                *wiped = true;
            }
            self.scanned = 0;
            return Some(Frame::NeedMore);
        }
        let found = if *literals { announcement(tail) } else { None };
        let label = label.take();
        self.consume(upto);
        match found {
            None => {
                self.state = State::Line;
                None
            }
            Some(a) if a.sync => {
                self.state = State::Line;
                Some(Frame::Literal(LiteralEvent::AbandonedSync { label }))
            }
            Some(a) => {
                self.state = State::Skip {
                    remaining: a.length,
                    label,
                };
                None
            }
        }
    }
}

impl Drop for Framer {
    fn drop(&mut self) {
        // Pre-auth buffers can hold passwords.
        self.buf.zeroize();
        self.msg.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(msg: &[u8]) -> Option<String> {
        let end = msg.iter().position(|&b| b == b' ')?;
        Some(String::from_utf8_lossy(&msg[..end]).into_owned())
    }

    fn imap(max_line: usize, max_literal: usize) -> Framer {
        Framer::messages(max_line, Literals { max_literal, label })
    }

    /// Every frame until `NeedMore`, messages as text.
    fn frames(f: &mut Framer) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            match f.next() {
                Frame::NeedMore => return out,
                Frame::Message(m) => out.push(String::from_utf8_lossy(&m).into_owned()),
                other => out.push(format!("{other:?}")),
            }
        }
    }

    /// Feeds `input` in pieces of `chunk` bytes, framing after each.
    fn fed(mut f: Framer, input: &[u8], chunk: usize) -> (Framer, Vec<String>) {
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            f.push(piece);
            out.extend(frames(&mut f));
        }
        (f, out)
    }

    #[test]
    fn lines_and_overlong_lines() {
        let input = b"a\r\nbb\n0123456789\r\nc\r\n";
        for chunk in [1, 2, 3, 100] {
            let (mut f, out) = fed(Framer::lines(8), input, chunk);
            assert_eq!(
                out,
                ["a\r\n", "bb\n", "LineTooLong", "c\r\n"],
                "chunk {chunk}"
            );
            assert_eq!(f.buffered(), 0);
            f.push(b"rest");
            assert_eq!(f.take(), b"rest");
        }
        // The limit counts the line ending: 8 bytes fit, 9 do not, and 8
        // bytes with no line feed yet cannot fit any more.
        let (_, out) = fed(Framer::lines(8), b"123456\r\n1234567\r\n", 1);
        assert_eq!(out, ["123456\r\n", "LineTooLong"]);
        let mut f = Framer::lines(8);
        f.push(b"12345678");
        assert_eq!(frames(&mut f), ["LineTooLong"]);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn messages_with_literals() {
        let input = b"a1 LOGIN {5}\r\nalice {3+}\r\npw!\r\na2 NOOP\r\n";
        let whole = fed(imap(64, 32), input, 100).1;
        assert_eq!(
            whole,
            [
                "Literal(Sync)",
                "a1 LOGIN {5}\r\nalice {3+}\r\npw!\r\n",
                "a2 NOOP\r\n"
            ]
        );
        assert_eq!(fed(imap(64, 32), input, 1).1, whole);
        // Too large: a sync literal is refused, a non-sync one skipped
        // exactly, then the rest of its message.
        let (_, out) = fed(
            imap(64, 4),
            b"a1 X {5}\r\na2 Y {5+}\r\n12345 tail\r\na3 Z\r\n",
            3,
        );
        assert_eq!(
            out,
            [
                "Literal(TooLarge { label: Some(\"a1\") })",
                "Literal(TooLarge { label: Some(\"a2\") })",
                "a3 Z\r\n"
            ]
        );
        // An overlong line that announced a sync literal at its end.
        let mut input = b"a1 LOGIN ".to_vec();
        input.extend([b'x'; 100]);
        input.extend(b" {5}\r\na2 NOOP\r\n");
        let (_, out) = fed(imap(64, 32), &input, 7);
        assert_eq!(
            out,
            [
                "LineTooLong",
                "Literal(AbandonedSync { label: Some(\"a1\") })",
                "a2 NOOP\r\n"
            ]
        );
        // A refused sync literal ends its message.
        let mut f = imap(64, 32);
        f.push(b"a1 LOGIN {5}\r\na2 NOOP\r\n");
        assert!(matches!(f.next(), Frame::Literal(LiteralEvent::Sync)));
        assert_eq!(f.partial_message(), b"a1 LOGIN {5}\r\n");
        f.refuse_literal();
        assert_eq!(frames(&mut f), ["a2 NOOP\r\n"]);
        // A SASL response line has no literal semantics.
        f.push(b"{5}\r\n");
        assert!(matches!(f.next_line(), Frame::Message(m) if m == b"{5}\r\n"));
    }

    /// Feeds one line of `len` bytes (line ending included) one byte at a
    /// time; returns the bytes searched for a line feed, the bytes wiped
    /// and the frames.
    fn byte_at_a_time(mut f: Framer, len: usize) -> (usize, usize, Vec<String>) {
        let mut line = vec![b'x'; len - 2];
        line.extend(b"\r\n");
        let mut out = Vec::new();
        for b in &line {
            f.push(std::slice::from_ref(b));
            out.extend(frames(&mut f).into_iter().map(|m| {
                if m.len() > 40 {
                    format!("<{} bytes>", m.len())
                } else {
                    m
                }
            }));
        }
        (f.examined, f.wiped, out)
    }

    /// The framer's work stays linear when a long line drips in: every
    /// byte is searched once, and a dropped line is wiped as it comes
    /// (not its whole allocation again for every byte).
    #[test]
    fn linear_work_on_a_long_line_fed_byte_by_byte() {
        const LINE: usize = 64 * 1024;
        let cases = [
            ("line accepted", Framer::lines(2 * LINE), "<65536 bytes>"),
            (
                "line over the limit",
                Framer::lines(LINE / 2),
                "LineTooLong",
            ),
            (
                "IMAP message accepted",
                imap(2 * LINE, 1024),
                "<65536 bytes>",
            ),
            (
                "IMAP line over the limit",
                imap(LINE / 2, 1024),
                "LineTooLong",
            ),
        ];
        for (what, framer, want) in cases {
            let (examined, wiped, out) = byte_at_a_time(framer, LINE);
            assert_eq!(out, [want], "{what}");
            println!(
                "{what}: a {LINE}-byte line fed one byte at a time: {examined} bytes searched \
                 ({:.2} per input byte), {wiped} bytes wiped",
                examined as f64 / LINE as f64
            );
            assert!(examined <= 2 * LINE, "{what}: {examined} bytes searched");
            assert!(wiped <= 2 * LINE, "{what}: {wiped} bytes wiped");
        }
    }

    #[test]
    fn debug_shows_sizes_only() {
        let mut f = imap(64, 32);
        f.push(b"a1 LOGIN alice {7}\r\nhunter2");
        assert!(matches!(f.next(), Frame::Literal(LiteralEvent::Sync)));
        let _ = f.next();
        let dbg = format!("{f:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("alice"), "{dbg}");
        let dbg = format!(
            "{:?}",
            Frame::Message(b"a1 LOGIN alice hunter2\r\n".to_vec())
        );
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }
}
