//! How errors are written down for people reading logs: the error and
//! every source beneath it on one line. Clients never get this; they get
//! the top error's own sentence.

use std::error::Error;

/// `e` and its sources, joined by `: `, skipping a source whose text the
/// line already holds (many errors repeat their source in their message).
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !line.contains(&part) {
            line.push_str(": ");
            line.push_str(&part);
        }
        cur = c.source();
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What an I/O error means, in a few words of ours, for the kinds a
/// person can do something about; None for the rest (the log has them).
pub fn io_phrase(e: &std::io::Error) -> Option<&'static str> {
    use std::io::ErrorKind;
    Some(match e.kind() {
        ErrorKind::NotFound => "no such file or directory",
        ErrorKind::PermissionDenied => "permission denied",
        ErrorKind::AddrInUse => "the address is in use",
        ErrorKind::AddrNotAvailable => "the address is not available here",
        ErrorKind::ConnectionRefused => "connection refused",
        ErrorKind::TimedOut => "timed out",
        ErrorKind::UnexpectedEof => "input ended",
        ErrorKind::InvalidData => "the content is not valid",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer sentence")]
    struct Outer {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn chain_has_every_source_once() {
        let e = Outer {
            source: std::io::Error::other("inner\ncause"),
        };
        assert_eq!(super::chain(&e), "outer sentence: inner cause");
        #[derive(Debug, thiserror::Error)]
        #[error("cannot save: {source}")]
        struct Repeats {
            source: std::io::Error,
        }
        let repeated = Repeats {
            source: std::io::Error::other("disk full"),
        };
        assert_eq!(super::chain(&repeated), "cannot save: disk full");
    }
}
