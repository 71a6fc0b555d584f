//! The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1
//! and 2) that haproxy, nginx and load balancers put in front of a
//! connection to say whose it really is.
//!
//! [`parse`] is a pure function over the bytes received so far. It says
//! how many more bytes the header needs at least ([`Parse::NeedMore`]), so
//! the reader can ask for exactly that many and never reads past the
//! header: whatever follows it (a client's command, a TLS ClientHello)
//! stays in the socket for the session. Version 1 ends at its CRLF, so it
//! is read in small steps; version 2 says its length in its 16-byte
//! prefix. Both are bounded: 107 bytes for version 1 (the spec's limit),
//! 16 + [`V2_MAX_PAYLOAD`] for version 2.
//!
//! The framing (where the header ends, when to give up) is ours; the
//! fields are read by the `ppp` crate once the header is whole (for
//! version 2, its first 16 bytes are checked as soon as they are in).
//! Garbage is refused as early as it shows: a first byte that starts
//! neither version, a version 1 header with a byte that is not printable
//! ASCII.

use std::net::{IpAddr, SocketAddr};

/// The longest version 1 header, CRLF included (proxy-protocol.txt 2.1).
pub const V1_MAX_LEN: usize = 107;

/// The shortest header of either version (`PROXY UNKNOWN\r\n`; a version
/// 2 header has at least 16 bytes): the first read asks for this many.
pub const MIN_LEN: usize = 15;

/// The 12 bytes a version 2 header starts with.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A version 2 header's fixed part: signature, version and command,
/// family and transport, length.
pub const V2_PREFIX_LEN: usize = 16;

/// The most bytes of addresses and TLVs a version 2 header may carry
/// here. The format allows 65,535; the longest addresses take 216 (Unix
/// sockets) and the TLVs proxies send (ALPN, authority, unique ID, SSL
/// details, a cloud's endpoint ID) a few hundred, so 4 KiB leaves room
/// and keeps what a connection may make mailbridge hold small.
pub const V2_MAX_PAYLOAD: usize = 4096;

/// The longest header [`parse`] accepts.
pub const MAX_LEN: usize = V2_PREFIX_LEN + V2_MAX_PAYLOAD;

/// Which version of the protocol a header used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text form: `PROXY TCP4 192.0.2.7 192.0.2.1 51000 143\r\n`.
    V1,
    /// The binary form.
    V2,
}

/// Whose connection it is, according to the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client's address and port as the proxy saw them.
    Client(SocketAddr),
    /// The proxy speaks for itself (version 2 `LOCAL`, as in health
    /// checks) or does not know the client (version 1 `UNKNOWN`, version 2
    /// `AF_UNSPEC` or a Unix socket): the connection's own peer, the
    /// proxy, stands.
    Proxy,
}

/// A whole, valid header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Its version.
    pub version: Version,
    /// Whose connection it is.
    pub source: Source,
    /// Its length in bytes: the connection's own bytes start after it.
    pub len: usize,
}

impl Header {
    /// The client's address, or `peer` (the proxy's) when the header does
    /// not name one.
    pub fn client_or(&self, peer: SocketAddr) -> SocketAddr {
        match self.source {
            Source::Client(a) => a,
            Source::Proxy => peer,
        }
    }
}

/// How far the bytes received so far get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// The header is not whole yet, and at least this many more bytes (one
    /// or more) belong to it: reading exactly that many never reads past
    /// its end.
    NeedMore(usize),
    /// A whole header; any bytes after `len` are not part of it.
    Done(Header),
}

/// Why a connection's first bytes are not a header mailbridge takes. Each
/// is final: more bytes would not change it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Neither `PROXY ` nor the version 2 signature: a client connecting
    /// directly, or a proxy not set to send the header.
    #[error(
        "the connection did not start with a PROXY protocol header; is the proxy set to send one (haproxy: send-proxy or send-proxy-v2; nginx: proxy_protocol on)?"
    )]
    NotAHeader,
    /// A version 1 header longer than the spec allows.
    #[error("the PROXY protocol v1 header has no CRLF within {V1_MAX_LEN} bytes")]
    V1TooLong,
    /// A version 1 header that does not read.
    #[error(
        "the PROXY protocol v1 header `{line}` is not `PROXY TCP4|TCP6 SOURCE DESTINATION SOURCE-PORT DESTINATION-PORT` or `PROXY UNKNOWN`"
    )]
    V1Malformed {
        /// The line as received, printable characters only.
        line: String,
    },
    /// A version 2 header whose fixed part does not read.
    #[error("the PROXY protocol v2 header is malformed: {why}")]
    V2Malformed {
        /// What is wrong.
        why: &'static str,
    },
    /// A version 2 header announcing more than mailbridge takes.
    #[error(
        "the PROXY protocol v2 header announces {len} bytes of addresses and TLVs; mailbridge takes at most {V2_MAX_PAYLOAD}"
    )]
    V2TooLong {
        /// The length announced.
        len: usize,
    },
    /// A header for a UDP connection, which cannot be this one.
    #[error("the PROXY protocol header describes a datagram (UDP) connection, not a TCP one")]
    Datagram,
}

/// Reads a header from `input`, the connection's bytes from its first on.
pub fn parse(input: &[u8]) -> Result<Parse, ProxyError> {
    match input.first() {
        None => Ok(Parse::NeedMore(MIN_LEN)),
        Some(b'P') => parse_v1(input),
        Some(b'\r') => parse_v2(input),
        Some(_) => Err(ProxyError::NotAHeader),
    }
}

fn parse_v1(input: &[u8]) -> Result<Parse, ProxyError> {
    const PREFIX: &[u8] = b"PROXY ";
    let n = input.len().min(PREFIX.len());
    if input[..n] != PREFIX[..n] {
        return Err(ProxyError::NotAHeader);
    }
    let malformed = |upto: usize| ProxyError::V1Malformed {
        line: crate::text::one_line_within(
            &String::from_utf8_lossy(&input[..upto.min(V1_MAX_LEN)]),
            "",
            V1_MAX_LEN,
        ),
    };
    let window = &input[..input.len().min(V1_MAX_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if let Some(bad) = window.iter().position(|&b| !(0x20..0x7f).contains(&b)) {
            return Err(malformed(bad));
        }
        // The CRLF must fit in the limit.
        if window.len() >= V1_MAX_LEN - 1 {
            return Err(ProxyError::V1TooLong);
        }
        if input.len() < MIN_LEN {
            return Ok(Parse::NeedMore(MIN_LEN - input.len()));
        }
        return Ok(Parse::NeedMore(2));
    };
    if let Some(bad) = window[..cr]
        .iter()
        .position(|&b| !(0x20..0x7f).contains(&b))
    {
        return Err(malformed(bad));
    }
    if cr + 2 > V1_MAX_LEN {
        return Err(ProxyError::V1TooLong);
    }
    match input.get(cr + 1) {
        None => Ok(Parse::NeedMore(1)),
        Some(b'\n') => {
            let len = cr + 2;
            let header = ppp::v1::Header::try_from(&input[..len]).map_err(|_| malformed(cr))?;
            let source = match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Source::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Source::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                ppp::v1::Addresses::Unknown => Source::Proxy,
            };
            Ok(Parse::Done(Header {
                version: Version::V1,
                source,
                len,
            }))
        }
        Some(_) => Err(malformed(cr)),
    }
}

fn parse_v2(input: &[u8]) -> Result<Parse, ProxyError> {
    let n = input.len().min(V2_SIGNATURE.len());
    if input[..n] != V2_SIGNATURE[..n] {
        return Err(ProxyError::NotAHeader);
    }
    if input.len() < V2_PREFIX_LEN {
        return Ok(Parse::NeedMore(V2_PREFIX_LEN - input.len()));
    }
    let payload = usize::from(u16::from_be_bytes([input[14], input[15]]));
    if payload > V2_MAX_PAYLOAD {
        return Err(ProxyError::V2TooLong { len: payload });
    }
    let len = V2_PREFIX_LEN + payload;
    // The fixed part is checked before the rest is waited for: with only
    // the prefix, ppp reports a partial header only when the prefix is
    // valid.
    let header = match ppp::v2::Header::try_from(&input[..len.min(input.len())]) {
        Ok(h) => h,
        Err(ppp::v2::ParseError::Partial(..)) if input.len() < len => {
            return Ok(Parse::NeedMore(len - input.len()));
        }
        Err(e) => return Err(v2_error(&e)),
    };
    let source = match header.command {
        ppp::v2::Command::Local => Source::Proxy,
        ppp::v2::Command::Proxy => {
            if header.protocol == ppp::v2::Protocol::Datagram {
                return Err(ProxyError::Datagram);
            }
            match header.addresses {
                ppp::v2::Addresses::IPv4(a) => {
                    Source::Client(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                ppp::v2::Addresses::IPv6(a) => {
                    Source::Client(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => Source::Proxy,
            }
        }
    };
    Ok(Parse::Done(Header {
        version: Version::V2,
        source,
        len,
    }))
}

fn v2_error(e: &ppp::v2::ParseError) -> ProxyError {
    use ppp::v2::ParseError as E;
    let why = match e {
        E::Version(_) => "its version is not 2",
        E::Command(_) => "its command is neither LOCAL nor PROXY",
        E::AddressFamily(_) => "its address family is not AF_UNSPEC, AF_INET, AF_INET6 or AF_UNIX",
        E::Protocol(_) => "its transport is not UNSPEC, STREAM or DGRAM",
        E::InvalidAddresses(..) => "its length is too short for its address family",
        _ => "it does not read",
    };
    ProxyError::V2Malformed { why }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(ver_cmd: u8, fam: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(fam);
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend_from_slice(payload);
        h
    }

    fn v2_tcp4(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut p = src.to_vec();
        p.extend_from_slice(&[192, 0, 2, 1]);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&143u16.to_be_bytes());
        p.extend_from_slice(tlvs);
        v2(0x21, 0x11, &p)
    }

    /// Reads `input` the way net does: exactly what is asked for.
    fn read_like_net(input: &[u8]) -> (Result<Parse, ProxyError>, usize) {
        let mut have = 0;
        loop {
            match parse(&input[..have]) {
                Ok(Parse::NeedMore(n)) => {
                    assert!(n >= 1);
                    if have + n > input.len() {
                        return (Ok(Parse::NeedMore(n)), have);
                    }
                    have += n;
                }
                other => return (other, have),
            }
        }
    }

    fn client(s: &str) -> Source {
        Source::Client(s.parse().unwrap())
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let cases: &[(&[u8], Source)] = &[
            (
                b"PROXY TCP4 192.0.2.7 192.0.2.1 51000 143\r\n",
                client("192.0.2.7:51000"),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 993\r\n",
                client("[2001:db8::7]:51000"),
            ),
            (b"PROXY UNKNOWN\r\n", Source::Proxy),
            (
                b"PROXY UNKNOWN ffff:f::ffff ffff:f::ffff 65535 65535\r\n",
                Source::Proxy,
            ),
        ];
        for (header, source) in cases {
            let mut input = header.to_vec();
            input.extend_from_slice(b"a1 CAPABILITY\r\n");
            let (got, read) = read_like_net(&input);
            assert_eq!(
                got,
                Ok(Parse::Done(Header {
                    version: Version::V1,
                    source: *source,
                    len: header.len(),
                })),
                "{}",
                String::from_utf8_lossy(header)
            );
            assert_eq!(read, header.len(), "never reads past the header");
        }
    }

    #[test]
    fn v1_refusals() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 192.0.2.1 51000\r\n"[..],
            b"PROXY TCP4 2001:db8::7 192.0.2.1 1 2\r\n",
            b"PROXY TCP5 192.0.2.7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 192.0.2.1 1 2\rX",
            b"PROXY TCP4 192.0.2.7 192.0.2.1 1 65536\r\n",
            b"PROXY TCP4 192.0.2.7\x00192.0.2.1 1 2\r\n",
        ] {
            assert!(
                matches!(read_like_net(bad).0, Err(ProxyError::V1Malformed { .. })),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(100));
        assert_eq!(read_like_net(long.as_bytes()).0, Err(ProxyError::V1TooLong));
        // 107 bytes with the CRLF is the most there may be.
        let most = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX_LEN - 16));
        assert_eq!(most.len(), V1_MAX_LEN);
        assert!(matches!(
            read_like_net(most.as_bytes()).0,
            Ok(Parse::Done(_))
        ));
        // A client talking to the listener directly is refused at its
        // first byte.
        assert_eq!(parse(b"a"), Err(ProxyError::NotAHeader));
        assert_eq!(parse(b"PROXX"), Err(ProxyError::NotAHeader));
        assert_eq!(
            read_like_net(b"a1 LOGIN alice secret\r\n").0,
            Err(ProxyError::NotAHeader)
        );
        // A control byte ends it as soon as it is in.
        assert!(matches!(
            parse(b"PROXY TCP4 \x16\x03\x01"),
            Err(ProxyError::V1Malformed { .. })
        ));
    }

    #[test]
    fn v2_proxy_local_unspec_and_tlvs() {
        let header = v2_tcp4([192, 0, 2, 7], 51000, &[]);
        let mut input = header.clone();
        input.extend_from_slice(b"\x16\x03\x01 a TLS ClientHello");
        let (got, read) = read_like_net(&input);
        assert_eq!(
            got,
            Ok(Parse::Done(Header {
                version: Version::V2,
                source: client("192.0.2.7:51000"),
                len: 28,
            }))
        );
        assert_eq!(read, 28);

        // TLVs (haproxy's ALPN and a unique ID) are skipped.
        let tlvs = [1u8, 0, 2, b'h', b'2', 5, 0, 3, 1, 2, 3];
        let header = v2_tcp4([192, 0, 2, 8], 1, &tlvs);
        assert_eq!(
            read_like_net(&header).0,
            Ok(Parse::Done(Header {
                version: Version::V2,
                source: client("192.0.2.8:1"),
                len: header.len(),
            }))
        );

        let mut p6 = vec![0x20, 0x01, 0x0d, 0xb8];
        p6.extend_from_slice(&[0; 11]);
        p6.push(7);
        p6.extend_from_slice(&[0; 16]);
        p6.extend_from_slice(&[0xc7, 0x38, 0, 143]);
        assert_eq!(
            parse(&v2(0x21, 0x21, &p6)).unwrap(),
            Parse::Done(Header {
                version: Version::V2,
                source: client("[2001:db8::7]:51000"),
                len: 16 + 36,
            })
        );

        // LOCAL (a health check), whatever addresses it carries, and
        // AF_UNSPEC: the proxy's own address stands.
        for h in [
            v2(0x20, 0x00, &[]),
            v2(0x20, 0x11, &[192, 0, 2, 7, 192, 0, 2, 1, 0, 1, 0, 2]),
            v2(0x21, 0x00, &[]),
            v2(0x21, 0x31, &[0; 216]),
        ] {
            assert!(
                matches!(
                    parse(&h),
                    Ok(Parse::Done(Header {
                        source: Source::Proxy,
                        ..
                    }))
                ),
                "{h:?}"
            );
        }
    }

    #[test]
    fn v2_refusals_come_as_soon_as_they_show() {
        // A bad version or command, after 16 bytes, without waiting for
        // the length it announces.
        let mut h = v2(0x31, 0x11, &[0; 12]);
        assert!(matches!(
            parse(&h[..16]),
            Err(ProxyError::V2Malformed { .. })
        ));
        h[12] = 0x2f;
        assert!(matches!(
            parse(&h[..16]),
            Err(ProxyError::V2Malformed { .. })
        ));
        // Too short for its addresses.
        assert!(matches!(
            parse(&v2(0x21, 0x11, &[0; 4])),
            Err(ProxyError::V2Malformed { .. })
        ));
        // UDP.
        assert_eq!(parse(&v2(0x21, 0x12, &[0; 12])), Err(ProxyError::Datagram));
        // Longer than mailbridge takes.
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&big), Err(ProxyError::V2TooLong { len: 65535 }));
        // A broken signature.
        assert_eq!(parse(b"\r\n\r\nX"), Err(ProxyError::NotAHeader));
    }

    #[test]
    fn reads_never_pass_the_header_however_it_is_cut() {
        let inputs: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.7 192.0.2.1 51000 143\r\nEHLO x\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n+OK".to_vec(),
            [
                v2_tcp4([192, 0, 2, 7], 2, &[3, 0, 1, 9]),
                b"a1 NOOP\r\n".to_vec(),
            ]
            .concat(),
            [v2(0x20, 0x00, &[]), b"x".to_vec()].concat(),
        ];
        for input in inputs {
            let Parse::Done(whole) = parse(&input).unwrap() else {
                panic!("whole header expected");
            };
            for have in 0..whole.len {
                match parse(&input[..have]).unwrap() {
                    Parse::NeedMore(n) => assert!(have + n <= whole.len, "{have} + {n}"),
                    Parse::Done(h) => panic!("done early at {have}: {h:?}"),
                }
            }
        }
    }
}
