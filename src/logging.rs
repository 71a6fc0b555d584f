//! Where log lines go and how they look: standard error, as text or JSON
//! (`[server] log_format`, `MAILBRIDGE_LOG_FORMAT`), filtered by
//! `MAILBRIDGE_LOG`. Colour only on a terminal; under systemd's journal
//! (`JOURNAL_STREAM`) no timestamps and a syslog priority prefix per line,
//! so `journalctl -p warning` works. rustls logs at WARN what is normal
//! for a proxy (a client that connects to an IP address and sends it as
//! SNI), so its events below ERROR are off unless `MAILBRIDGE_LOG` names
//! it.
//!
//! Every event a client's session logs starts with the session it belongs
//! to, `conn{peer=.. protocol=..}:` in text and `"span": {"name": "conn",
//! ..}` in JSON. That context is a task-local ([`in_session`]), not a
//! tracing span: the span registry keeps a slot and the slot's field
//! storage for every span that was ever open at once and never gives them
//! back, and 10,000 sessions' worth of those small blocks, allocated
//! between the sessions' own memory, kept some 30 MB of freed pages
//! resident after the sessions ended (docs/PERFORMANCE.md, "Memory after
//! 10,000 sessions close"). The formatters below write the context the way
//! tracing-subscriber writes a span.

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::schema::LogFormat;

/// The environment variable that overrides `[server] log_format`.
pub const FORMAT_ENV: &str = "MAILBRIDGE_LOG_FORMAT";
/// The environment variable holding the filter (`info`, `debug`,
/// `mailbridge=debug,rustls=warn`, ...).
pub const FILTER_ENV: &str = "MAILBRIDGE_LOG";

/// The filter directives for `MAILBRIDGE_LOG`'s value (`None`: unset):
/// `info` by default, and rustls quieted to errors unless named.
pub fn filter_directives(configured: Option<&str>) -> String {
    let base = configured
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("info");
    if base.contains("rustls") {
        base.to_string()
    } else {
        format!("{base},rustls=error")
    }
}

/// The format in force: `MAILBRIDGE_LOG_FORMAT` (`text` or `json`) if set
/// to one of those, else the configuration's.
pub fn format_in_force(env: Option<&str>, configured: LogFormat) -> LogFormat {
    match env.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        Some("json") => LogFormat::Json,
        Some("text") => LogFormat::Text,
        _ => configured,
    }
}

/// The syslog priority systemd reads from a `<N>` line prefix.
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Installs the process's subscriber. `configured` is `[server]
/// log_format` when the command has a readable config.
pub fn init(configured: LogFormat) {
    init_with_default(configured, "info");
}

/// [`init`], logging at `level` (rather than `info`) when
/// `MAILBRIDGE_LOG` is unset: `doctor` prints its own account of what it
/// did, and the log would only repeat it.
pub fn init_with_default(configured: LogFormat, level: &str) {
    let filter_spec = filter_directives(
        std::env::var(FILTER_ENV)
            .ok()
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .or(Some(level)),
    );
    let (filter, bad_filter) = match EnvFilter::try_new(&filter_spec) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new(filter_directives(None)), Some(e)),
    };
    let format = format_in_force(std::env::var(FORMAT_ENV).ok().as_deref(), configured);
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let colour =
        !journal && std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    let installed = match (format, journal) {
        (LogFormat::Json, _) => builder.event_format(JsonLine).try_init(),
        // The journal adds its own timestamps.
        (LogFormat::Text, true) => builder
            .event_format(SyslogPrefix(TextLine { time: false }))
            .try_init(),
        (LogFormat::Text, false) => builder.event_format(TextLine { time: true }).try_init(),
    };
    if installed.is_ok()
        && let Some(e) = bad_filter
    {
        tracing::warn!(error = %e, "{FILTER_ENV} is not a valid filter; logging at info");
    }
}

/// Who a session's events are about: the client, the proxy it came
/// through (PROXY protocol), and the protocol.
#[derive(Debug, Clone)]
pub struct SessionContext {
    pub peer: SocketAddr,
    pub via: Option<SocketAddr>,
    pub protocol: &'static str,
}

tokio::task_local! {
    static SESSION: SessionContext;
}

/// Runs a session's future with `context` on every event it logs (the
/// tasks it spawns log without it, as with a span).
pub fn in_session<F: Future>(
    context: SessionContext,
    session: F,
) -> impl Future<Output = F::Output> {
    SESSION.scope(context, session)
}

/// The text line: time, level, the session (`conn{peer=.. protocol=..}:`),
/// any tracing spans, target, fields: tracing-subscriber's full format.
struct TextLine {
    time: bool,
}

impl<S, N> FormatEvent<S, N> for TextLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let ansi = writer.has_ansi_escapes();
        let meta = event.metadata();
        if self.time {
            if ansi {
                writer.write_str("\x1b[2m")?;
            }
            SystemTime.format_time(&mut writer)?;
            writer.write_str(if ansi { "\x1b[0m " } else { " " })?;
        }
        let colour = match *meta.level() {
            Level::ERROR => "\x1b[31m",
            Level::WARN => "\x1b[33m",
            Level::INFO => "\x1b[32m",
            Level::DEBUG => "\x1b[34m",
            Level::TRACE => "\x1b[35m",
        };
        if ansi {
            write!(writer, "{colour}{:>5}\x1b[0m ", meta.level())?;
        } else {
            write!(writer, "{:>5} ", meta.level())?;
        }
        let _ = SESSION.try_with(|s| -> std::fmt::Result {
            write!(writer, "conn{{peer={}", s.peer)?;
            if let Some(via) = s.via {
                write!(writer, " via={via}")?;
            }
            write!(writer, " protocol=\"{}\"}}: ", s.protocol)
        });
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                writer.write_str(span.name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{{{fields}}}")?;
                }
                writer.write_str(": ")?;
            }
        }
        write!(writer, "{}: ", meta.target())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// One JSON object per line: `timestamp`, `level`, the event's fields
/// (`message` among them), `target`, and the session as `span`.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut line = JsonFields(serde_json::Map::new());
        line.0.insert("timestamp".into(), timestamp.into());
        line.0.insert("level".into(), meta.level().as_str().into());
        event.record(&mut line);
        line.0.insert("target".into(), meta.target().into());
        if let Ok(span) = SESSION.try_with(|s| {
            let mut span = serde_json::Map::new();
            span.insert("name".into(), "conn".into());
            span.insert("peer".into(), s.peer.to_string().into());
            if let Some(via) = s.via {
                span.insert("via".into(), via.to_string().into());
            }
            span.insert("protocol".into(), s.protocol.into());
            span
        }) {
            line.0.insert("span".into(), span.into());
        }
        let text = serde_json::to_string(&line.0).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values: numbers and booleans as such, the
/// rest as their text.
struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

/// Reads `[server] log_format` from a config file without validating
/// the rest (that comes later, with line numbers): logging starts before
/// the configuration is loaded, so its errors are logged the chosen way.
pub fn configured_format(path: &std::path::Path) -> LogFormat {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| {
            t.get("server")?
                .get("log_format")?
                .as_str()
                .map(str::to_string)
        })
        .map(|f| format_in_force(Some(&f), LogFormat::Text))
        .unwrap_or_default()
}

/// Puts systemd's `<N>` priority before each event's text line.
struct SyslogPrefix<F>(F);

impl<S, N, F> FormatEvent<S, N> for SyslogPrefix<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_is_quieted_unless_named() {
        assert_eq!(filter_directives(None), "info,rustls=error");
        assert_eq!(filter_directives(Some(" ")), "info,rustls=error");
        assert_eq!(
            filter_directives(Some("mailbridge=debug")),
            "mailbridge=debug,rustls=error"
        );
        assert_eq!(
            filter_directives(Some("debug,rustls=trace")),
            "debug,rustls=trace"
        );
    }

    #[test]
    fn the_environment_overrides_the_configured_format() {
        assert_eq!(format_in_force(None, LogFormat::Json), LogFormat::Json);
        assert_eq!(
            format_in_force(Some("JSON"), LogFormat::Text),
            LogFormat::Json
        );
        assert_eq!(
            format_in_force(Some("text"), LogFormat::Json),
            LogFormat::Text
        );
        assert_eq!(
            format_in_force(Some("xml"), LogFormat::Json),
            LogFormat::Json
        );
    }

    #[test]
    fn levels_map_to_syslog_priorities() {
        let p: Vec<u8> = [
            Level::ERROR,
            Level::WARN,
            Level::INFO,
            Level::DEBUG,
            Level::TRACE,
        ]
        .iter()
        .map(syslog_priority)
        .collect();
        assert_eq!(p, [3, 4, 6, 7, 7]);
    }
}
