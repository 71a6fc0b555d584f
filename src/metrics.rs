//! What `/metrics` shows: counters, gauges and histograms of one process,
//! in the Prometheus (OpenMetrics) text format through `prometheus-client`.
//! Names follow Prometheus conventions (`mailbridge_..._total` for
//! counters, base units: `_seconds`, `_bytes`). Labels are protocols,
//! results and events: never an account name, a password or a token.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A protocol.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    /// imap, pop3 or smtp.
    pub protocol: String,
}

/// A protocol and an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// imap, pop3 or smtp.
    pub protocol: String,
    /// What happened (e.g. `ok`, `bad_credentials`, `full`).
    pub result: String,
}

/// An outcome alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// What happened.
    pub result: String,
}

/// Bytes relayed, by protocol and direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// imap, pop3 or smtp.
    pub protocol: String,
    /// `to_server` or `to_client`.
    pub direction: String,
}

/// An alert's event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// The event's name, as in `MAILBRIDGE_EVENT`.
    pub event: String,
}

/// The spool's areas.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `queued` or `failed`.
    pub state: String,
}

/// Every metric of one process.
pub struct Metrics {
    registry: Registry,
    connections: Family<ProtocolLabel, Counter>,
    refused: Family<OutcomeLabels, Counter>,
    sessions: Family<ProtocolLabel, Gauge>,
    logins: Family<OutcomeLabels, Counter>,
    login_seconds: Family<ProtocolLabel, Histogram>,
    refreshes: Family<ResultLabel, Counter>,
    refresh_seconds: Histogram,
    relayed: Family<DirectionLabels, Counter>,
    alerts: Family<EventLabel, Counter>,
    spool: Family<StateLabel, Gauge>,
    deliveries: Family<ResultLabel, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency() -> Histogram {
    // 5 ms to about 80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every family registered, all at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mailbridge");
        let connections = Family::<ProtocolLabel, Counter>::default();
        registry.register(
            "connections",
            "Client connections accepted and served",
            connections.clone(),
        );
        let refused = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Client connections turned away at the door (result: full, per_address)",
            refused.clone(),
        );
        let sessions = Family::<ProtocolLabel, Gauge>::default();
        registry.register(
            "sessions",
            "Client connections open now, before and after login",
            sessions.clone(),
        );
        let logins = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "logins",
            "Client logins by result (ok, bad_credentials, throttled, rejected, unavailable)",
            logins.clone(),
        );
        let login_seconds =
            Family::<ProtocolLabel, Histogram>::new_with_constructor(latency as fn() -> Histogram);
        registry.register(
            "upstream_login_seconds",
            "Time from a client's login request to the upstream server's answer",
            login_seconds.clone(),
        );
        let refreshes = Family::<ResultLabel, Counter>::default();
        registry.register(
            "token_refreshes",
            "Token requests to providers by result (ok, error)",
            refreshes.clone(),
        );
        let refresh_seconds = latency();
        registry.register(
            "token_refresh_seconds",
            "Time a token request took",
            refresh_seconds.clone(),
        );
        let relayed = Family::<DirectionLabels, Counter>::default();
        registry.register_with_unit(
            "relayed",
            "Bytes relayed after login",
            prometheus_client::registry::Unit::Bytes,
            relayed.clone(),
        );
        let alerts = Family::<EventLabel, Counter>::default();
        registry.register("alerts", "Alerts raised, by event", alerts.clone());
        let spool = Family::<StateLabel, Gauge>::default();
        registry.register(
            "spool_messages",
            "Messages in the spool (queued, failed)",
            spool.clone(),
        );
        let deliveries = Family::<ResultLabel, Counter>::default();
        registry.register(
            "spool_deliveries",
            "Spooled message delivery attempts (delivered, deferred, failed)",
            deliveries.clone(),
        );
        Metrics {
            registry,
            connections,
            refused,
            sessions,
            logins,
            login_seconds,
            refreshes,
            refresh_seconds,
            relayed,
            alerts,
            spool,
            deliveries,
        }
    }

    fn protocol(p: &str) -> ProtocolLabel {
        ProtocolLabel {
            protocol: p.to_owned(),
        }
    }

    /// A connection was accepted and is served; the gauge goes down when
    /// the returned guard is dropped.
    pub fn connection(self: &std::sync::Arc<Self>, protocol: &str) -> SessionGuard {
        self.connections
            .get_or_create(&Self::protocol(protocol))
            .inc();
        self.sessions.get_or_create(&Self::protocol(protocol)).inc();
        SessionGuard {
            metrics: self.clone(),
            protocol: protocol.to_owned(),
        }
    }

    /// A connection was turned away (`full` or `per_address`).
    pub fn refused(&self, protocol: &str, why: &str) {
        self.refused
            .get_or_create(&OutcomeLabels {
                protocol: protocol.to_owned(),
                result: why.to_owned(),
            })
            .inc();
    }

    /// A client login ended with `result`, after `took`.
    pub fn login(&self, protocol: &str, result: &str, took: Duration) {
        self.logins
            .get_or_create(&OutcomeLabels {
                protocol: protocol.to_owned(),
                result: result.to_owned(),
            })
            .inc();
        self.login_seconds
            .get_or_create(&Self::protocol(protocol))
            .observe(took.as_secs_f64());
    }

    /// A token request ended.
    pub fn refresh(&self, ok: bool, took: Duration) {
        self.refreshes
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" }.to_owned(),
            })
            .inc();
        self.refresh_seconds.observe(took.as_secs_f64());
    }

    /// A relayed session's bytes.
    pub fn relayed(&self, protocol: &str, to_server: u64, to_client: u64) {
        for (direction, n) in [("to_server", to_server), ("to_client", to_client)] {
            self.relayed
                .get_or_create(&DirectionLabels {
                    protocol: protocol.to_owned(),
                    direction: direction.to_owned(),
                })
                .inc_by(n);
        }
    }

    /// An alert went out (or was logged).
    pub fn alert(&self, event: &str) {
        self.alerts
            .get_or_create(&EventLabel {
                event: event.to_owned(),
            })
            .inc();
    }

    /// A spooled message's delivery attempt ended (`delivered`,
    /// `deferred`, `failed`).
    pub fn delivery(&self, result: &str) {
        self.deliveries
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// The spool's depth, read when scraped.
    pub fn spool_depth(&self, queued: usize, failed: usize) {
        for (state, n) in [("queued", queued), ("failed", failed)] {
            self.spool
                .get_or_create(&StateLabel {
                    state: state.to_owned(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Connections open now, over all protocols.
    pub fn open_sessions(&self) -> i64 {
        ["imap", "pop3", "smtp"]
            .iter()
            .map(|p| self.sessions.get_or_create(&Self::protocol(p)).get())
            .sum()
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Holds a place in the `mailbridge_sessions` gauge.
pub struct SessionGuard {
    metrics: std::sync::Arc<Metrics>,
    protocol: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.metrics
            .sessions
            .get_or_create(&Metrics::protocol(&self.protocol))
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = std::sync::Arc::new(Metrics::new());
        let guard = m.connection("imap");
        m.login("imap", "ok", Duration::from_millis(30));
        m.refresh(true, Duration::from_millis(200));
        m.relayed("imap", 10, 2000);
        m.alert("grant_refused");
        m.spool_depth(3, 1);
        m.refused("smtp", "full");
        let text = m.encode();
        for line in [
            "mailbridge_connections_total{protocol=\"imap\"} 1",
            "mailbridge_sessions{protocol=\"imap\"} 1",
            "mailbridge_logins_total{protocol=\"imap\",result=\"ok\"} 1",
            "mailbridge_upstream_login_seconds_count{protocol=\"imap\"} 1",
            "mailbridge_token_refreshes_total{result=\"ok\"} 1",
            "mailbridge_token_refresh_seconds_count 1",
            "mailbridge_relayed_bytes_total{protocol=\"imap\",direction=\"to_client\"} 2000",
            "mailbridge_alerts_total{event=\"grant_refused\"} 1",
            "mailbridge_spool_messages{state=\"queued\"} 3",
            "mailbridge_connections_refused_total{protocol=\"smtp\",result=\"full\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        drop(guard);
        assert!(
            m.encode()
                .contains("mailbridge_sessions{protocol=\"imap\"} 0")
        );
    }
}
