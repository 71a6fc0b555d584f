//! IMAP and SASL syntax for the sandbox server, as plain functions over
//! bytes: literal headers, command tokenising, sequence sets, FETCH items,
//! mailbox patterns and the XOAUTH2 / OAUTHBEARER payloads. The socket loop
//! in `super` reads lines and literals and hands them here.

use std::fmt;

/// One piece of a command as it came off the wire: the text of a line (its
/// CRLF and any trailing literal header removed) or a literal's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Line text.
    Text(Vec<u8>),
    /// Literal data, exact.
    Literal(Vec<u8>),
}

/// A literal announced at the end of a line: `{n}` or `{n+}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiteralHeader {
    /// Octets that follow the line.
    pub size: u64,
    /// `{n+}` (LITERAL+): the client does not wait for `+`.
    pub non_sync: bool,
}

/// If `line` (without CRLF) ends with a literal header, returns the length
/// of the text before it and the header.
pub fn literal_suffix(line: &[u8]) -> Option<(usize, LiteralHeader)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let mut digits = &inner[open + 1..];
    let non_sync = digits.ends_with(b"+");
    if non_sync {
        digits = &digits[..digits.len() - 1];
    }
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let size = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((open, LiteralHeader { size, non_sync }))
}

/// Strips a trailing CRLF (or a bare LF, which we tolerate).
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The tag of a command line, if it has a syntactically valid one.
pub fn peek_tag(line: &[u8]) -> Option<&str> {
    let end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let tag = &line[..end];
    (!tag.is_empty()
        && tag
            .iter()
            .all(|&b| is_atom_char(b) && b != b'+' || b == b']'))
    .then(|| std::str::from_utf8(tag).ok())
    .flatten()
}

fn is_atom_char(b: u8) -> bool {
    b > 0x20 && b < 0x7f && !matches!(b, b'(' | b')' | b'{' | b'"' | b'\\' | b'%' | b'*' | b']')
}

/// Characters we accept in an unquoted argument: atom characters plus list
/// wildcards, `]` (inside `BODY[...]`) and `\` (flags).
fn is_arg_char(b: u8) -> bool {
    is_atom_char(b) || matches!(b, b'%' | b'*' | b']' | b'\\')
}

/// A lexical element of a command's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// An atom, number, sequence set, flag or `BODY[...]` section.
    Atom(String),
    /// A quoted string, unescaped.
    Quoted(String),
    /// A literal's bytes.
    Literal(Vec<u8>),
    /// `(`
    Open,
    /// `)`
    Close,
}

impl Token {
    /// The token as an astring (atom, quoted or UTF-8 literal).
    pub fn astring(&self) -> Option<String> {
        match self {
            Token::Atom(s) | Token::Quoted(s) => Some(s.clone()),
            Token::Literal(b) => String::from_utf8(b.clone()).ok(),
            Token::Open | Token::Close => None,
        }
    }

    /// The token if it is an atom.
    pub fn atom(&self) -> Option<&str> {
        match self {
            Token::Atom(s) => Some(s),
            _ => None,
        }
    }
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The client's tag.
    pub tag: String,
    /// The command name, upper-cased.
    pub name: String,
    /// Arguments after the name.
    pub args: Vec<Token>,
    /// The first line's text after the name, as sent (for ID).
    pub raw_args: String,
}

/// Why a command could not be parsed; `tag` is known when the line had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// The tag to answer with, or None for an untagged `* BAD`.
    pub tag: Option<String>,
    /// What was wrong.
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Splits a command into tag, name and argument tokens.
///
/// Takes the parts by value so literal data (up to hundreds of megabytes)
/// moves into the tokens instead of being copied.
pub fn parse_command(parts: Vec<Part>) -> Result<Command, SyntaxError> {
    let Some(Part::Text(first)) = parts.first() else {
        return Err(SyntaxError {
            tag: None,
            message: "empty command".to_string(),
        });
    };
    let Some(tag) = peek_tag(first) else {
        return Err(SyntaxError {
            tag: None,
            message: "missing or invalid tag".to_string(),
        });
    };
    let err = |message: String| SyntaxError {
        tag: Some(tag.to_string()),
        message,
    };
    let rest = first
        .get(tag.len() + 1..)
        .filter(|_| first.get(tag.len()) == Some(&b' '))
        .ok_or_else(|| err("missing command name".to_string()))?;
    let name_end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
    let name = &rest[..name_end];
    if name.is_empty() || !name.iter().all(|b| b.is_ascii_alphanumeric()) {
        return Err(err("invalid command name".to_string()));
    }
    let after_name = rest.get(name_end + 1..).unwrap_or_default();
    if name_end < rest.len() && after_name.is_empty() && parts.len() == 1 {
        return Err(err("trailing space".to_string()));
    }
    let mut args = Vec::new();
    tokenize_into(after_name, &mut args).map_err(err)?;
    let tag = tag.to_string();
    let name = String::from_utf8_lossy(name).to_ascii_uppercase();
    let raw_args = String::from_utf8_lossy(after_name).into_owned();
    for part in parts.into_iter().skip(1) {
        match part {
            Part::Literal(bytes) => args.push(Token::Literal(bytes)),
            Part::Text(text) => tokenize_into(&text, &mut args).map_err(|message| SyntaxError {
                tag: Some(tag.clone()),
                message,
            })?,
        }
    }
    Ok(Command {
        tag,
        name,
        args,
        raw_args,
    })
}

fn tokenize_into(text: &[u8], out: &mut Vec<Token>) -> Result<(), String> {
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b' ' => i += 1,
            b'(' => {
                out.push(Token::Open);
                i += 1;
            }
            b')' => {
                out.push(Token::Close);
                i += 1;
            }
            b'"' => {
                let mut s = Vec::new();
                i += 1;
                loop {
                    match text.get(i) {
                        None => return Err("unterminated quoted string".to_string()),
                        Some(b'"') => break,
                        Some(b'\\') => match text.get(i + 1) {
                            Some(&c @ (b'"' | b'\\')) => {
                                s.push(c);
                                i += 2;
                            }
                            _ => return Err("bad escape in quoted string".to_string()),
                        },
                        Some(&c) => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                i += 1;
                out.push(Token::Quoted(
                    String::from_utf8(s).map_err(|_| "quoted string is not UTF-8")?,
                ));
            }
            b if is_arg_char(b) || b == b'[' => {
                let start = i;
                let mut depth = 0u32;
                while i < text.len() {
                    match text[i] {
                        b'[' => depth += 1,
                        b']' if depth > 0 => depth -= 1,
                        b' ' | b'(' | b')' if depth > 0 => {}
                        c if is_arg_char(c) => {}
                        _ => break,
                    }
                    i += 1;
                }
                if depth > 0 {
                    return Err("unbalanced [".to_string());
                }
                let atom = std::str::from_utf8(&text[start..i]).map_err(|_| "non-ASCII atom")?;
                out.push(Token::Atom(atom.to_string()));
            }
            _ => return Err(format!("unexpected character 0x{:02x}", text[i])),
        }
    }
    Ok(())
}

/// One end of a sequence range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqNum {
    /// A number (never 0).
    Num(u32),
    /// `*`: the largest number in use.
    Star,
}

/// A sequence set: ranges of message numbers or UIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSet(pub Vec<(SeqNum, SeqNum)>);

impl SeqSet {
    /// Parses `1`, `1:*`, `2:3`, `*`, `1,4:5`.
    pub fn parse(s: &str) -> Option<SeqSet> {
        let num = |s: &str| match s {
            "*" => Some(SeqNum::Star),
            _ if s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0') => {
                s.parse().ok().map(SeqNum::Num)
            }
            _ => None,
        };
        let ranges = s
            .split(',')
            .map(|r| match r.split_once(':') {
                Some((a, b)) => Some((num(a)?, num(b)?)),
                None => num(r).map(|n| (n, n)),
            })
            .collect::<Option<Vec<_>>>()?;
        Some(SeqSet(ranges))
    }

    /// Whether `n` is in the set when `*` stands for `star`.
    pub fn contains(&self, n: u32, star: u32) -> bool {
        let resolve = |s: SeqNum| match s {
            SeqNum::Num(n) => n,
            SeqNum::Star => star,
        };
        self.0.iter().any(|&(a, b)| {
            let (a, b) = (resolve(a), resolve(b));
            a.min(b) <= n && n <= a.max(b)
        })
    }

    /// The largest explicit number, to reject message numbers past the end.
    pub fn max_number(&self) -> u32 {
        self.0
            .iter()
            .flat_map(|&(a, b)| [a, b])
            .filter_map(|s| match s {
                SeqNum::Num(n) => Some(n),
                SeqNum::Star => None,
            })
            .max()
            .unwrap_or(0)
    }
}

/// A FETCH data item we serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchItem {
    /// `FLAGS`
    Flags,
    /// `UID`
    Uid,
    /// `RFC822.SIZE`
    Size,
    /// `INTERNALDATE` (fixed: the sandbox does not track arrival times).
    InternalDate,
    /// `BODY[]`, or `BODY.PEEK[]` (`peek`); answered as `BODY[]`.
    Body {
        /// Whether the client asked for PEEK.
        peek: bool,
    },
    /// `RFC822`: the whole message.
    Rfc822,
}

/// Parses the item list of FETCH: one item, a parenthesised list, or FAST.
pub fn parse_fetch_items(tokens: &[Token]) -> Result<Vec<FetchItem>, String> {
    let atoms: Vec<&str> = match tokens {
        [Token::Atom(a)] => vec![a.as_str()],
        [Token::Open, inner @ .., Token::Close] => inner
            .iter()
            .map(|t| t.atom().ok_or("unexpected token in FETCH item list"))
            .collect::<Result<_, _>>()?,
        _ => return Err("expected FETCH items".to_string()),
    };
    let mut items = Vec::new();
    for atom in atoms {
        match atom.to_ascii_uppercase().as_str() {
            "FLAGS" => items.push(FetchItem::Flags),
            "UID" => items.push(FetchItem::Uid),
            "RFC822.SIZE" => items.push(FetchItem::Size),
            "INTERNALDATE" => items.push(FetchItem::InternalDate),
            "BODY[]" => items.push(FetchItem::Body { peek: false }),
            "BODY.PEEK[]" => items.push(FetchItem::Body { peek: true }),
            "RFC822" => items.push(FetchItem::Rfc822),
            "FAST" => items.extend([FetchItem::Flags, FetchItem::InternalDate, FetchItem::Size]),
            other => return Err(format!("unsupported FETCH item {other}")),
        }
    }
    if items.is_empty() {
        return Err("empty FETCH item list".to_string());
    }
    Ok(items)
}

/// INBOX is case-insensitive (RFC 3501 section 5.1); other names are not.
pub fn normalize_mailbox(name: &str) -> String {
    if name.eq_ignore_ascii_case("INBOX") {
        "INBOX".to_string()
    } else {
        name.to_string()
    }
}

/// LIST pattern matching: `*` matches anything, `%` anything but the
/// hierarchy delimiter `/`.
pub fn list_matches(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| list_matches(rest, &name[i..])),
        Some((b'%', rest)) => (0..=name.len())
            .take_while(|&i| i == 0 || name[i - 1] != b'/')
            .any(|i| list_matches(rest, &name[i..])),
        Some((&c, rest)) => name.first() == Some(&c) && list_matches(rest, &name[1..]),
    }
}

/// Quotes a string for a response.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// What a bearer SASL message carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerLogin {
    /// The mailbox (`user=` or the GS2 `a=`).
    pub user: String,
    /// The bearer token.
    pub token: String,
}

/// `user=U ^A auth=Bearer T ^A ^A`
pub fn parse_xoauth2(payload: &[u8]) -> Result<BearerLogin, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "XOAUTH2 payload is not UTF-8")?;
    let body = text
        .strip_suffix("\x01\x01")
        .ok_or("XOAUTH2 payload must end with ^A^A")?;
    let mut user = None;
    let mut auth = None;
    for pair in body.split('\x01') {
        let (key, value) = pair.split_once('=').ok_or("XOAUTH2 field without '='")?;
        let slot = match key {
            "user" => &mut user,
            "auth" => &mut auth,
            other => return Err(format!("unknown XOAUTH2 field {other:?}")),
        };
        if slot.replace(value).is_some() {
            return Err(format!("XOAUTH2 field {key} given twice"));
        }
    }
    let user = user
        .filter(|u| !u.is_empty())
        .ok_or("XOAUTH2 without user=")?;
    let token = bearer_value(auth.ok_or("XOAUTH2 without auth=")?)?;
    Ok(BearerLogin {
        user: user.to_string(),
        token,
    })
}

/// RFC 7628: `n,a=U,` ^A [`host=H` ^A] [`port=P` ^A] `auth=Bearer T` ^A ^A
pub fn parse_oauthbearer(payload: &[u8]) -> Result<BearerLogin, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "OAUTHBEARER payload is not UTF-8")?;
    let (gs2, rest) = text
        .split_once('\x01')
        .ok_or("OAUTHBEARER payload without ^A after the GS2 header")?;
    let mut fields = gs2.splitn(3, ',');
    match fields.next() {
        Some("n" | "y") => {}
        Some(f) if f.starts_with("p=") => {
            return Err("channel binding is not supported".to_string());
        }
        _ => return Err("bad GS2 channel-binding flag".to_string()),
    }
    let authzid = fields.next().ok_or("GS2 header too short")?;
    if fields.next() != Some("") {
        return Err("GS2 header must end with ','".to_string());
    }
    let user = match authzid.strip_prefix("a=") {
        Some(name) => unescape_saslname(name)?,
        None if authzid.is_empty() => {
            return Err("OAUTHBEARER without a= (the mailbox)".to_string());
        }
        None => return Err("bad GS2 authzid".to_string()),
    };
    let kvpairs = rest
        .strip_suffix("\x01")
        .ok_or("OAUTHBEARER payload must end with ^A")?;
    let kvpairs = kvpairs
        .strip_suffix('\x01')
        .ok_or("OAUTHBEARER payload must end with ^A^A")?;
    let mut auth = None;
    for pair in kvpairs.split('\x01') {
        let (key, value) = pair
            .split_once('=')
            .ok_or("OAUTHBEARER field without '='")?;
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err("bad OAUTHBEARER key".to_string());
        }
        match key {
            "auth" if auth.is_some() => return Err("auth given twice".to_string()),
            "auth" => auth = Some(value),
            "port" if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) => {
                return Err("bad OAUTHBEARER port".to_string());
            }
            _ => {}
        }
    }
    let token = bearer_value(auth.ok_or("OAUTHBEARER without auth=")?)?;
    Ok(BearerLogin { user, token })
}

/// `Bearer <b64token>` (scheme case-insensitive, RFC 6750 section 2.1).
fn bearer_value(auth: &str) -> Result<String, String> {
    let (scheme, token) = auth
        .split_once(' ')
        .ok_or("auth= must be 'Bearer <token>'")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(format!("auth scheme {scheme:?} is not Bearer"));
    }
    let valid = !token.is_empty()
        && token
            .trim_end_matches('=')
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    if !valid {
        return Err("malformed bearer token".to_string());
    }
    Ok(token.to_string())
}

/// GS2 saslname: `=2C` is ',', `=3D` is '=', no other '='.
fn unescape_saslname(name: &str) -> Result<String, String> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err("bad escape in GS2 authzid".to_string()),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err("empty GS2 authzid".to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(line: &str) -> Result<Command, SyntaxError> {
        parse_command(vec![Part::Text(line.as_bytes().to_vec())])
    }

    #[test]
    fn literal_headers() {
        assert_eq!(
            literal_suffix(b"a APPEND INBOX {12}"),
            Some((
                15,
                LiteralHeader {
                    size: 12,
                    non_sync: false
                }
            ))
        );
        assert_eq!(
            literal_suffix(b"a APPEND INBOX (\\Seen) {3+}"),
            Some((
                23,
                LiteralHeader {
                    size: 3,
                    non_sync: true
                }
            ))
        );
        assert_eq!(literal_suffix(b"a APPEND INBOX {}"), None);
        assert_eq!(literal_suffix(b"a APPEND INBOX {1a}"), None);
        assert_eq!(literal_suffix(b"a NOOP"), None);
    }

    #[test]
    fn commands() {
        let c = cmd("A1 uid fetch 1:* (UID BODY.PEEK[])").unwrap();
        assert_eq!(c.tag, "A1");
        assert_eq!(c.name, "UID");
        assert_eq!(
            c.args,
            vec![
                Token::Atom("fetch".into()),
                Token::Atom("1:*".into()),
                Token::Open,
                Token::Atom("UID".into()),
                Token::Atom("BODY.PEEK[]".into()),
                Token::Close,
            ]
        );
        let c = cmd(r#"t ID ("name" "x \"y\"")"#).unwrap();
        assert_eq!(c.raw_args, r#"("name" "x \"y\"")"#);
        assert_eq!(c.args[1], Token::Quoted("name".into()));
        assert_eq!(c.args[2], Token::Quoted("x \"y\"".into()));
        let c = cmd("t FETCH 1 BODY.PEEK[HEADER.FIELDS (FROM TO)]").unwrap();
        assert_eq!(
            c.args[1],
            Token::Atom("BODY.PEEK[HEADER.FIELDS (FROM TO)]".into())
        );
        assert_eq!(cmd("").unwrap_err().tag, None);
        assert_eq!(cmd("+x NOOP").unwrap_err().tag, None);
        assert_eq!(cmd("a").unwrap_err().tag.as_deref(), Some("a"));
        assert!(cmd("a NOOP \"open").is_err());
        let c = parse_command(vec![
            Part::Text(b"a APPEND INBOX (\\Seen) ".to_vec()),
            Part::Literal(b"hi\r\n".to_vec()),
            Part::Text(Vec::new()),
        ])
        .unwrap();
        assert_eq!(c.args.last(), Some(&Token::Literal(b"hi\r\n".to_vec())));
        assert_eq!(c.args[2], Token::Atom("\\Seen".into()));
    }

    #[test]
    fn sequence_sets() {
        let s = SeqSet::parse("1,3:4,7:*").unwrap();
        let got: Vec<u32> = (1..=9).filter(|&n| s.contains(n, 9)).collect();
        assert_eq!(got, vec![1, 3, 4, 7, 8, 9]);
        assert!(SeqSet::parse("*").unwrap().contains(5, 5));
        assert!(!SeqSet::parse("*").unwrap().contains(4, 5));
        assert!(SeqSet::parse("3:2").unwrap().contains(2, 9));
        assert_eq!(SeqSet::parse("2:5,9").unwrap().max_number(), 9);
        for bad in ["", "0", "a", "1:", ",1", "01"] {
            assert_eq!(SeqSet::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn fetch_items() {
        let t = |s: &str| cmd(&format!("a FETCH {s}")).unwrap().args;
        assert_eq!(
            parse_fetch_items(&t("(FLAGS UID RFC822.SIZE BODY[] body.peek[] RFC822)")).unwrap(),
            vec![
                FetchItem::Flags,
                FetchItem::Uid,
                FetchItem::Size,
                FetchItem::Body { peek: false },
                FetchItem::Body { peek: true },
                FetchItem::Rfc822,
            ]
        );
        assert_eq!(parse_fetch_items(&t("UID")).unwrap(), vec![FetchItem::Uid]);
        assert!(parse_fetch_items(&t("ENVELOPE")).is_err());
        assert!(parse_fetch_items(&t("()")).is_err());
    }

    #[test]
    fn list_patterns() {
        assert!(list_matches(b"*", b"a/b"));
        assert!(list_matches(b"%", b"INBOX"));
        assert!(!list_matches(b"%", b"a/b"));
        assert!(list_matches(b"a/%", b"a/b"));
        assert!(list_matches(b"IN*", b"INBOX"));
        assert!(!list_matches(b"INBOX", b"INBOX2"));
    }

    #[test]
    fn xoauth2() {
        let ok = parse_xoauth2(b"user=a@b.c\x01auth=Bearer tok-123\x01\x01").unwrap();
        assert_eq!(ok.user, "a@b.c");
        assert_eq!(ok.token, "tok-123");
        for bad in [
            &b"user=a\x01auth=Bearer t\x01"[..],
            b"user=a\x01auth=Basic t\x01\x01",
            b"auth=Bearer t\x01\x01",
            b"user=a\x01\x01",
            b"user=a\x01auth=Bearer \x01\x01",
            b"user=a\x01auth=Bearer t\x01x=y\x01\x01",
        ] {
            assert!(parse_xoauth2(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn oauthbearer() {
        let ok = parse_oauthbearer(
            b"n,a=we=2Cird=3Dname@x,\x01host=localhost\x01port=993\x01auth=Bearer abc\x01\x01",
        )
        .unwrap();
        assert_eq!(ok.user, "we,ird=name@x");
        assert_eq!(ok.token, "abc");
        let ok = parse_oauthbearer(b"n,a=u@x,\x01auth=Bearer abc\x01\x01").unwrap();
        assert_eq!(ok.user, "u@x");
        for bad in [
            &b"n,,\x01auth=Bearer abc\x01\x01"[..],
            b"p=tls-unique,a=u,\x01auth=Bearer abc\x01\x01",
            b"n,a=u,\x01auth=Bearer abc\x01",
            b"n,a=u\x01auth=Bearer abc\x01\x01",
            b"n,a=u=2X,\x01auth=Bearer abc\x01\x01",
            b"n,a=u,\x01port=x\x01auth=Bearer abc\x01\x01",
            b"n,a=u,\x01host=h\x01\x01",
        ] {
            assert!(parse_oauthbearer(bad).is_err(), "{bad:?}");
        }
    }
}
