//! The delivery task: sends queued messages upstream as their account
//! (the same login path as a client's: grant, token, XOAUTH2 or
//! OAUTHBEARER), paced per account, retrying what failed for a temporary
//! reason with a doubling delay until `[spool] max_age_hours`, and moving
//! what was refused for good to the failed area with an alert (and, where
//! the device asks for it, a report to the sender).
//!
//! The spool is the truth: the task reads it again every few seconds and
//! whenever a message is stored, so `mailbridge queue retry` and `delete`
//! work while the service runs, a restart picks up where the last process
//! stopped, and with the spool in a shared database, an instance delivers
//! what another accepted (one at a time: [`Spool::claim`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailbridge_proto::Message;
use mailbridge_proto::smtp::{Submission, SubmitOutcome};
use tokio::sync::{Notify, watch};

use super::{Area, Envelope, Spool};
use crate::alerts::{Alert, Event};
use crate::clock::unix_now;
use crate::config::Protocol;
use crate::login::Gateway;

/// How often the queue is read again when nothing wakes the task.
const POLL: Duration = Duration::from_secs(5);

/// Limits of the delivery task.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Give up after this long.
    pub max_age: Duration,
    /// Messages per minute per account.
    pub rate_per_minute: u32,
    /// First retry delay.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Longest wait for one server reply while sending.
    pub patience: Duration,
}

impl Policy {
    /// From `[spool]`.
    pub fn from_config(c: &crate::config::schema::SpoolConfig) -> Policy {
        Policy {
            max_age: Duration::from_secs(c.max_age_hours.saturating_mul(3600)),
            rate_per_minute: c.rate_per_minute.max(1),
            retry_base: Duration::from_secs(c.retry_base_secs.max(1)),
            retry_max: Duration::from_secs(c.retry_max_secs.max(1)),
            patience: Duration::from_secs(300),
        }
    }

    fn retry_delay(&self, attempts: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempts.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.retry_base.saturating_mul(factor).min(self.retry_max)
    }
}

/// Sends per account in the last minute, for pacing.
#[derive(Default)]
struct Pace {
    sent: HashMap<String, VecDeque<Instant>>,
}

impl Pace {
    /// When `account` may send next (now if it may).
    fn next_slot(&mut self, account: &str, rate: u32, now: Instant) -> Option<Instant> {
        let q = self.sent.entry(account.to_owned()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            q.pop_front();
        }
        (q.len() >= rate as usize).then(|| q[0] + Duration::from_secs(60))
    }

    fn note(&mut self, account: &str, now: Instant) {
        self.sent
            .entry(account.to_owned())
            .or_default()
            .push_back(now);
    }
}

/// Runs until `stop` turns true; `wake` says a message was stored.
pub async fn run(
    spool: Spool,
    gateway: Arc<Gateway>,
    policy: Policy,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pace = Pace::default();
    loop {
        if *stop.borrow() {
            break;
        }
        let wait = pass(&spool, &gateway, &policy, &mut pace, &stop).await;
        tokio::select! {
            _ = stop.changed() => {}
            () = wake.notified() => {}
            () = tokio::time::sleep(wait.min(POLL)) => {}
        }
    }
    tracing::debug!("spool delivery stopped");
}

/// One pass over the queue; returns how long until something is due.
async fn pass(
    spool: &Spool,
    gateway: &Gateway,
    policy: &Policy,
    pace: &mut Pace,
    stop: &watch::Receiver<bool>,
) -> Duration {
    let queued = match spool.list(Area::Queue) {
        Ok(q) => q,
        Err(e) => {
            tracing::warn!(error = %crate::report::chain(&e), "cannot read the spool");
            return POLL;
        }
    };
    let mut wait = POLL;
    for envelope in queued {
        if *stop.borrow() {
            break;
        }
        let now = unix_now();
        if envelope.next_attempt_at > now {
            wait = wait.min(Duration::from_secs(envelope.next_attempt_at - now));
            continue;
        }
        if let Some(at) = pace.next_slot(&envelope.account, policy.rate_per_minute, Instant::now())
        {
            tracing::debug!(id = %envelope.id, account = %envelope.account, "paced: the account's rate per minute is used up");
            wait = wait.min(at.saturating_duration_since(Instant::now()));
            continue;
        }
        // Another instance sharing the database may be sending it.
        let claim = match spool.claim(&envelope.id) {
            Ok(Some(claim)) => claim,
            Ok(None) => {
                tracing::debug!(id = %envelope.id, "another instance is sending it");
                continue;
            }
            Err(e) => {
                tracing::warn!(id = %envelope.id, error = %crate::report::chain(&e), "cannot claim a spooled message; it waits");
                continue;
            }
        };
        pace.note(&envelope.account, Instant::now());
        attempt(spool, gateway, policy, envelope).await;
        drop(claim);
    }
    wait
}

/// One delivery attempt of one message.
async fn attempt(spool: &Spool, gateway: &Gateway, policy: &Policy, mut envelope: Envelope) {
    let id = envelope.id.clone();
    // Still there? (`queue delete` may have removed it meanwhile.)
    match spool.find(&id) {
        Ok((Area::Queue, current)) => envelope = current,
        _ => return,
    }
    let content = match spool.content(Area::Queue, &id) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%id, error = %crate::report::chain(&e), "spooled content unreadable");
            return;
        }
    };
    envelope.attempts = envelope.attempts.saturating_add(1);
    let message = Message {
        from: envelope.from.clone(),
        recipients: envelope.recipients.clone(),
        data: content,
        smtputf8: envelope.smtputf8,
        eight_bit: envelope.eight_bit,
        client_name: None,
    };
    let mut conn = match gateway
        .login_as(Protocol::Smtp, &envelope.account, None)
        .await
    {
        Ok(conn) => conn,
        Err(f) => {
            tracing::info!(%id, account = %envelope.account, attempt = envelope.attempts, reason = %f.reason, "delivery failed for now: no login");
            defer(spool, gateway, policy, envelope, f.reason);
            return;
        }
    };
    let sent = crate::net::upstream::submit(
        &mut conn.stream,
        &conn.success.leftover,
        Submission::new(&message),
        policy.patience,
    )
    .await;
    match sent {
        // Recorded before anything else is said to the server: a crash
        // from here to the record sends the message again.
        Ok(outcome) => settle(spool, gateway, policy, envelope, outcome),
        Err(e) => {
            let reason = crate::report::chain(&e);
            tracing::info!(%id, account = %envelope.account, attempt = envelope.attempts, %reason, "delivery failed for now");
            defer(spool, gateway, policy, envelope, reason);
        }
    }
    crate::net::upstream::quit(&mut conn.stream).await;
}

/// After an outcome: delivered recipients are done, those refused for
/// good are failed, the rest wait for the next attempt.
fn settle(
    spool: &Spool,
    gateway: &Gateway,
    policy: &Policy,
    mut envelope: Envelope,
    outcome: SubmitOutcome,
) {
    let id = envelope.id.clone();
    for r in &outcome.delivered {
        tracing::info!(%id, account = %envelope.account, to = %r, "delivered");
    }
    let mut later = Vec::new();
    let mut temporary_reason = None;
    for (rcpt, refusal) in outcome.refused {
        if refusal.is_temporary() {
            temporary_reason = Some(refusal.to_string());
            later.push(rcpt);
        } else {
            tracing::warn!(%id, to = %rcpt, refusal = %refusal, "refused for good");
            envelope.failed_recipients.push((rcpt, refusal.to_string()));
        }
    }
    envelope.recipients = later;
    if envelope.recipients.is_empty() {
        if envelope.failed_recipients.is_empty() {
            gateway.metrics().delivery("delivered");
            if let Err(e) = spool.remove(Area::Queue, &id) {
                tracing::error!(%id, error = %crate::report::chain(&e), "delivered, but the spool entry could not be removed: it may be sent again");
            }
        } else {
            fail(spool, gateway, envelope, "the server refused it");
        }
        return;
    }
    let reason = temporary_reason.unwrap_or_else(|| "temporary refusal".into());
    defer(spool, gateway, policy, envelope, reason);
}

/// A temporary failure: try again later, or give up once too old.
fn defer(
    spool: &Spool,
    gateway: &Gateway,
    policy: &Policy,
    mut envelope: Envelope,
    reason: String,
) {
    let now = unix_now();
    envelope.last_error = Some(mailbridge_proto::text::flatten(&reason));
    if now.saturating_sub(envelope.received_at) >= policy.max_age.as_secs() {
        let why = format!(
            "not delivered within {} hours ({reason})",
            policy.max_age.as_secs() / 3600
        );
        let pending: Vec<String> = std::mem::take(&mut envelope.recipients);
        for r in pending {
            envelope.failed_recipients.push((r, why.clone()));
        }
        fail(spool, gateway, envelope, &why);
        return;
    }
    envelope.next_attempt_at = now + policy.retry_delay(envelope.attempts).as_secs();
    // `queue retry` while this attempt ran: due now, not at the delay.
    if let Ok((Area::Queue, current)) = spool.find(&envelope.id) {
        keep_retry(&current, &mut envelope);
    }
    gateway.metrics().delivery("deferred");
    match spool.update(Area::Queue, &envelope) {
        Ok(()) => {}
        Err(super::SpoolError::NotFound { .. }) => {
            tracing::info!(id = %envelope.id, "deleted during the attempt (`queue delete`)");
        }
        Err(e) => {
            tracing::error!(id = %envelope.id, error = %crate::report::chain(&e), "cannot record the attempt in the spool")
        }
    }
}

/// An attempt's new state, written over `current` (the stored one): a
/// `queue retry` asked for since the attempt read the message is kept
/// (due now), not undone.
fn keep_retry(current: &Envelope, attempted: &mut Envelope) {
    if current.retries_asked != attempted.retries_asked {
        attempted.retries_asked = current.retries_asked;
        attempted.next_attempt_at = 0;
    }
}

/// Refused for good: to the failed area, an alert, and the report.
fn fail(spool: &Spool, gateway: &Gateway, envelope: Envelope, why: &str) {
    let id = envelope.id.clone();
    gateway.metrics().delivery("failed");
    match spool.move_to(&envelope, Area::Queue, Area::Failed) {
        Ok(()) => {}
        Err(super::SpoolError::NotFound { .. }) => {
            tracing::info!(%id, "deleted during the attempt (`queue delete`)");
            return;
        }
        Err(e) => {
            tracing::error!(%id, error = %crate::report::chain(&e), "cannot move a failed message out of the queue");
            return;
        }
    }
    let who: Vec<String> = envelope
        .failed_recipients
        .iter()
        .map(|(r, reply)| format!("{r}: {reply}"))
        .collect();
    gateway.alerts().raise(Alert {
        event: Event::MessageFailed,
        account: envelope.account.clone(),
        reason: format!(
            "message {id} from device {} ({}) was not delivered: {why}; {}",
            envelope.device,
            envelope.from,
            who.join("; ")
        ),
        advice: format!(
            "see `mailbridge queue list`; fix the cause, then `mailbridge queue retry {id}` (or `queue delete {id}`)"
        ),
    });
    if envelope.bounce
        && !envelope.from.is_empty()
        && let Err(e) = queue_report(spool, &envelope, why)
    {
        tracing::warn!(%id, error = %crate::report::chain(&e), "cannot queue the failure report");
    }
}

/// A short report to the sender, queued like any message (with the null
/// sender, so it never bounces itself).
fn queue_report(spool: &Spool, failed: &Envelope, why: &str) -> Result<(), super::SpoolError> {
    let lines: Vec<String> = failed
        .failed_recipients
        .iter()
        .map(|(r, reply)| format!("  {r}: {reply}"))
        .collect();
    let body = format!(
        "From: mailbridge <{from}>\r\nTo: <{from}>\r\nSubject: Undelivered: message {id}\r\n\
Auto-Submitted: auto-replied\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
mailbridge could not deliver a message your device ({device}) sent at {at} (unix time).\r\n\
Reason: {why}\r\n\r\nRecipients:\r\n{list}\r\n\r\n\
The message is kept on the mailbridge host: `mailbridge queue list`, then\r\n\
`mailbridge queue retry {id}` once the cause is fixed.\r\n",
        from = failed.from,
        id = failed.id,
        device = failed.device,
        at = failed.received_at,
        list = lines.join("\r\n"),
    );
    let report = Message {
        from: String::new(),
        recipients: vec![failed.from.clone()],
        data: body.into_bytes(),
        smtputf8: false,
        eight_bit: true,
        client_name: None,
    };
    spool.store(&failed.account, "mailbridge", "local", false, &report)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_asked_during_an_attempt_is_kept() {
        let message = mailbridge_proto::Message {
            from: "a@x".into(),
            recipients: vec!["b@x".into()],
            data: b"x".to_vec(),
            smtputf8: false,
            eight_bit: false,
            client_name: None,
        };
        let read = Envelope::new("a@x", "mfp", "192.0.2.7", false, &message);
        // The attempt failed and would wait; nobody asked meanwhile.
        let mut attempted = read.clone();
        attempted.next_attempt_at = 1_000;
        keep_retry(&read, &mut attempted);
        assert_eq!(attempted.next_attempt_at, 1_000);
        // `queue retry` came in while it ran.
        let mut current = read.clone();
        super::super::requeue(Area::Queue, &mut current);
        keep_retry(&current, &mut attempted);
        assert_eq!((attempted.next_attempt_at, attempted.retries_asked), (0, 1));
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let p = Policy {
            max_age: Duration::from_secs(3600),
            rate_per_minute: 30,
            retry_base: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            patience: Duration::from_secs(1),
        };
        let d: Vec<u64> = (1..=8).map(|a| p.retry_delay(a).as_secs()).collect();
        assert_eq!(d, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
    }

    #[test]
    fn pacing_allows_the_rate_per_minute() {
        let mut pace = Pace::default();
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(pace.next_slot("a", 3, t0), None, "{i}");
            pace.note("a", t0);
        }
        assert_eq!(
            pace.next_slot("a", 3, t0),
            Some(t0 + Duration::from_secs(60))
        );
        assert_eq!(pace.next_slot("b", 3, t0), None);
        assert_eq!(pace.next_slot("a", 3, t0 + Duration::from_secs(60)), None);
    }
}
