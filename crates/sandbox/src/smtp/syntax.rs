//! Command parsing and the DATA reader of the sandbox SMTP server: plain
//! functions, no I/O. Commands are read with smtp-proto; the SASL payloads
//! with the IMAP server's XOAUTH2 / OAUTHBEARER parsers.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use smtp_proto::request::receiver::DataReceiver;
use smtp_proto::{AUTH_OAUTHBEARER, AUTH_XOAUTH2, Request};

use mailbridge_proto::sasl::Mechanism;

/// A command, as far as the sandbox cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    StartTls,
    /// `mechanism` is None for one the sandbox does not know; `initial` is
    /// the initial response, if the client sent one (`=` for empty).
    Auth {
        mechanism: Option<Mechanism>,
        initial: Option<String>,
    },
    /// `size` is the SIZE parameter, 0 when absent.
    Mail {
        from: String,
        size: u64,
    },
    Rcpt {
        to: String,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    /// A command the sandbox knows but does not implement.
    Unsupported(&'static str),
}

/// A line without its line ending.
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Reads one command line (with its line ending). Err is the complete
/// reply for a line that does not parse.
pub fn parse_command(line: &[u8]) -> Result<Command, String> {
    let mut with_lf;
    let line = if line.ends_with(b"\n") {
        line
    } else {
        with_lf = line.to_vec();
        with_lf.push(b'\n');
        &with_lf[..]
    };
    let request = Request::parse(&mut line.iter()).map_err(|e| match e {
        smtp_proto::Error::UnknownCommand => "500 5.5.1 Unrecognized command".to_owned(),
        smtp_proto::Error::InvalidSenderAddress => "501 5.1.7 Invalid sender address".to_owned(),
        smtp_proto::Error::InvalidRecipientAddress => {
            "501 5.1.3 Invalid recipient address".to_owned()
        }
        smtp_proto::Error::SyntaxError { syntax } => format!("501 5.5.2 Syntax: {syntax}"),
        smtp_proto::Error::InvalidParameter { param } => {
            format!("501 5.5.4 Invalid parameter {param}")
        }
        smtp_proto::Error::UnsupportedParameter { .. } => {
            "555 5.5.4 Unsupported parameter".to_owned()
        }
        _ => "500 5.5.2 Syntax error".to_owned(),
    })?;
    Ok(match request {
        Request::Ehlo { host } => Command::Ehlo(host.into_owned()),
        Request::Helo { host } => Command::Helo(host.into_owned()),
        Request::StartTls => Command::StartTls,
        Request::Auth {
            mechanism,
            initial_response,
        } => Command::Auth {
            mechanism: match mechanism {
                AUTH_XOAUTH2 => Some(Mechanism::Xoauth2),
                AUTH_OAUTHBEARER => Some(Mechanism::Oauthbearer),
                _ => None,
            },
            initial: (!initial_response.is_empty()).then(|| initial_response.into_owned()),
        },
        Request::Mail { from } => Command::Mail {
            from: from.address.into_owned(),
            size: u64::try_from(from.size).unwrap_or(u64::MAX),
        },
        Request::Rcpt { to } => Command::Rcpt {
            to: to.address.into_owned(),
        },
        Request::Data => Command::Data,
        Request::Rset => Command::Rset,
        Request::Noop { .. } => Command::Noop,
        Request::Quit => Command::Quit,
        Request::Vrfy { .. } => Command::Vrfy,
        other => Command::Unsupported(other.name()),
    })
}

/// A SASL response: strict base64, `=` for an empty one.
pub fn decode_sasl(response: &str) -> Option<Vec<u8>> {
    if response == "=" {
        return Some(Vec::new());
    }
    STANDARD.decode(response).ok()
}

/// Reads a DATA body as it streams in: dot-unstuffing and end detection
/// look at each byte once (smtp-proto's receiver, which searches only the
/// new bytes), so a 30 MiB message costs one pass.
pub struct DataReader {
    receiver: DataReceiver,
    data: Vec<u8>,
    max: u64,
    too_big: bool,
    done: bool,
}

impl DataReader {
    /// A reader for a message of at most `max` bytes; longer ones are read
    /// to their end and dropped.
    pub fn new(max: u64) -> Self {
        let mut receiver = DataReceiver::new();
        let mut data = Vec::new();
        // The body starts at the beginning of a line: prime the receiver
        // with the line ending of the DATA command, so that a first line
        // starting with a dot is unstuffed and ".\r\n" ends an empty body.
        receiver.ingest(&mut b"\r\n".iter(), &mut data);
        data.clear();
        DataReader {
            receiver,
            data,
            max,
            too_big: false,
            done: false,
        }
    }

    /// Takes bytes; returns how many were used (all, unless the body ended
    /// inside `chunk`: the rest belongs to the next command).
    pub fn ingest(&mut self, chunk: &[u8]) -> usize {
        if self.done {
            return 0;
        }
        let mut iter = chunk.iter();
        self.done = self.receiver.ingest(&mut iter, &mut self.data);
        let used = chunk.len() - iter.as_slice().len();
        if self.too_big || u64::try_from(self.data.len()).unwrap_or(u64::MAX) > self.max {
            self.too_big = true;
            self.data = Vec::new();
        }
        used
    }

    /// The final `.` line was seen.
    pub fn done(&self) -> bool {
        self.done
    }

    /// The body (without the final `.` line), or None if it was too big.
    pub fn finish(self) -> Option<Vec<u8>> {
        (!self.too_big).then_some(self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8], chunk: usize) -> (Option<Vec<u8>>, usize) {
        let mut r = DataReader::new(1000);
        let mut used = 0;
        for part in input.chunks(chunk) {
            if r.done() {
                break;
            }
            used += r.ingest(part);
        }
        assert!(r.done());
        (r.finish(), used)
    }

    #[test]
    fn dot_unstuffing_and_end() {
        let cases: [(&[u8], &[u8], usize); 6] = [
            (b".\r\nQUIT\r\n", b"", 3),
            (b"Hi\r\n.\r\n", b"Hi\r\n", 7),
            (b"..x\r\n..\r\n.\r\nRSET\r\n", b".x\r\n.\r\n", 12),
            (b"a\r\n...\r\n.\r\n", b"a\r\n..\r\n", 11),
            (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", 10),
            (b"no eol at end.\r\n.\r\n", b"no eol at end.\r\n", 19),
        ];
        for (input, want, used) in cases {
            for chunk in [1, 2, 3, 5, input.len()] {
                let (got, n) = read_all(input, chunk);
                assert_eq!(got.as_deref(), Some(want), "{input:?} in chunks of {chunk}");
                assert_eq!(n, used, "{input:?} in chunks of {chunk}");
            }
        }
    }

    #[test]
    fn too_big_is_read_to_the_end() {
        let mut r = DataReader::new(4);
        let used = r.ingest(b"12345\r\n.\r\nNOOP\r\n");
        assert_eq!(used, 10);
        assert!(r.done());
        assert_eq!(r.finish(), None);
    }

    #[test]
    fn commands() {
        assert_eq!(
            parse_command(b"EHLO client.example\r\n"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(
            parse_command(b"auth xoauth2 dXNlcg==\r\n"),
            Ok(Command::Auth {
                mechanism: Some(Mechanism::Xoauth2),
                initial: Some("dXNlcg==".into())
            })
        );
        assert_eq!(
            parse_command(b"AUTH OAUTHBEARER\r\n"),
            Ok(Command::Auth {
                mechanism: Some(Mechanism::Oauthbearer),
                initial: None
            })
        );
        assert_eq!(
            parse_command(b"AUTH PLAIN =\r\n"),
            Ok(Command::Auth {
                mechanism: None,
                initial: Some("=".into())
            })
        );
        assert_eq!(
            parse_command(b"MAIL FROM:<a@example.com> SIZE=1234 BODY=8BITMIME\r\n"),
            Ok(Command::Mail {
                from: "a@example.com".into(),
                size: 1234
            })
        );
        assert_eq!(
            parse_command(b"RCPT TO:<b@example.com>\r\n"),
            Ok(Command::Rcpt {
                to: "b@example.com".into()
            })
        );
        assert_eq!(
            parse_command(b"BDAT 10\r\n"),
            Ok(Command::Unsupported("BDAT"))
        );
        assert!(parse_command(b"FROB\r\n").unwrap_err().starts_with("500 "));
        assert!(
            parse_command(b"MAIL TO:<x>\r\n")
                .unwrap_err()
                .starts_with("501 ")
        );
        assert!(parse_command(b"EHLO\r\n").unwrap_err().starts_with("501 "));
        assert_eq!(decode_sasl("="), Some(Vec::new()));
        assert_eq!(decode_sasl("AQ=="), Some(vec![1]));
        assert_eq!(decode_sasl("AQ"), None);
    }
}
