//! The spool in the shared PostgreSQL database (`[spool] store =
//! "database"`): a message one instance accepted is delivered by whichever
//! instance is alive.
//!
//! - **Table.** `mailbridge_spool` (made by the store's migrations, see
//!   [`crate::store::postgres`]): one row per message with its area
//!   (`queue` or `failed`), the envelope as JSON, the content as `bytea`.
//! - **Durability.** The `INSERT` is committed (PostgreSQL's synchronous
//!   commit: on the database's disk) before the device hears `250`.
//!   Delivered is one `DELETE`. A crash between the server's `250` and that
//!   `DELETE` sends the message again: at least once, never lost.
//! - **One sender at a time.** Before an attempt, the instance takes a
//!   session-level advisory lock keyed by the message
//!   (`pg_try_advisory_lock`) and reads the row again; an instance that
//!   does not get the lock leaves the message to the one that has it. The
//!   lock is released after the attempt is recorded, and by the database
//!   when the instance's connection ends (a killed instance holds nothing).
//! - **Changes** are single conditional statements (`WHERE id = $1 AND
//!   area = $2`): an entry deleted by `mailbridge queue delete` meanwhile is
//!   [`SpoolError::NotFound`], never brought back.
//!
//! The records hold messages in clear, as the spool directory's files do:
//! the database's access rules and TLS protect them (docs/DEPLOYMENT.md).

use std::fmt;
use std::sync::Arc;

use super::{Area, Envelope, SpoolError};
use crate::store::PgStore;

/// The spool's rows in a [`PgStore`]'s database.
#[derive(Clone)]
pub struct DbSpool {
    db: Arc<PgStore>,
}

impl fmt::Debug for DbSpool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbSpool")
            .field("database", &self.db.location())
            .finish()
    }
}

/// A held claim on one message (see [`super::Claim`]).
pub struct Held {
    db: Arc<PgStore>,
    key: i64,
}

impl Drop for Held {
    fn drop(&mut self) {
        let key = self.key;
        let released = self.db.call(move |inner| async move {
            let c = inner.client().await?;
            let row = c
                .query_one("SELECT pg_advisory_unlock($1)", &[&key])
                .await
                .map_err(|e| inner.db(&e))?;
            Ok(row.get::<_, bool>(0))
        });
        match released {
            Ok(true) => {}
            // The connection was replaced meanwhile: the database released
            // the lock with the old one.
            Ok(false) => tracing::debug!("a spool claim was already released"),
            Err(e) => tracing::debug!(error = %e, "releasing a spool claim"),
        }
    }
}

fn area_name(area: Area) -> &'static str {
    match area {
        Area::Queue => "queue",
        Area::Failed => "failed",
    }
}

fn area_from(name: &str) -> Area {
    if name == "failed" {
        Area::Failed
    } else {
        Area::Queue
    }
}

/// The advisory lock key of message `id` (a domain of its own, apart
/// from the refresh locks').
fn claim_key(id: &str) -> i64 {
    crate::store::postgres::lock_key("mailbridge spool claim", id)
}

fn encode(envelope: &Envelope) -> Result<String, SpoolError> {
    serde_json::to_string(envelope).map_err(|e| SpoolError::DamagedRecord {
        id: envelope.id.clone(),
        reason: e.to_string(),
    })
}

fn decode(id: &str, text: &str) -> Result<Envelope, SpoolError> {
    serde_json::from_str(text).map_err(|e| SpoolError::DamagedRecord {
        id: id.to_owned(),
        reason: e.to_string(),
    })
}

impl DbSpool {
    /// The spool in `db`'s database.
    pub fn new(db: Arc<PgStore>) -> DbSpool {
        DbSpool { db }
    }

    /// The database URL, password hidden.
    pub fn location(&self) -> String {
        format!("{} (table mailbridge_spool)", self.db.location())
    }

    /// One statement that changes rows; the number changed.
    fn execute(
        &self,
        sql: &'static str,
        params: Vec<Box<dyn tokio_postgres::types::ToSql + Send + Sync>>,
    ) -> Result<u64, SpoolError> {
        self.db
            .call(move |inner| async move {
                let c = inner.client().await?;
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                c.execute(sql, &refs).await.map_err(|e| inner.db(&e))
            })
            .map_err(SpoolError::Database)
    }

    /// Committed before it returns.
    pub fn store(&self, envelope: &Envelope, data: &[u8]) -> Result<(), SpoolError> {
        let json = encode(envelope)?;
        let received = i64::try_from(envelope.received_at).unwrap_or(i64::MAX);
        self.execute(
            "INSERT INTO mailbridge_spool (id, area, envelope, content, received_at)
             VALUES ($1, 'queue', $2::text::jsonb, $3, $4)",
            vec![
                Box::new(envelope.id.clone()),
                Box::new(json),
                Box::new(data.to_vec()),
                Box::new(received),
            ],
        )?;
        Ok(())
    }

    /// A message from a spool on disk, with its id and state, unless the
    /// database has it already (moved before, by a start that stopped
    /// before removing it from the disk).
    pub fn adopt(&self, area: Area, envelope: &Envelope, data: &[u8]) -> Result<(), SpoolError> {
        let json = encode(envelope)?;
        let received = i64::try_from(envelope.received_at).unwrap_or(i64::MAX);
        self.execute(
            "INSERT INTO mailbridge_spool (id, area, envelope, content, received_at)
             VALUES ($1, $5, $2::text::jsonb, $3, $4)
             ON CONFLICT (id) DO NOTHING",
            vec![
                Box::new(envelope.id.clone()),
                Box::new(json),
                Box::new(data.to_vec()),
                Box::new(received),
                Box::new(area_name(area)),
            ],
        )?;
        Ok(())
    }

    pub fn list(&self, area: Area) -> Result<Vec<Envelope>, SpoolError> {
        let area = area_name(area);
        let rows: Vec<(String, String)> = self
            .db
            .call(move |inner| async move {
                let c = inner.client().await?;
                let rows = c
                    .query(
                        "SELECT id, envelope::text FROM mailbridge_spool
                         WHERE area = $1 ORDER BY received_at, id",
                        &[&area],
                    )
                    .await
                    .map_err(|e| inner.db(&e))?;
                Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            })
            .map_err(SpoolError::Database)?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, text) in rows {
            match decode(&id, &text) {
                Ok(e) => out.push(e),
                Err(e) => tracing::warn!(error = %e, "skipping a spool record"),
            }
        }
        Ok(out)
    }

    pub fn find(&self, id: &str) -> Result<(Area, Envelope), SpoolError> {
        self.find_raw(id)
            .map(|(area, envelope, _)| (area, envelope))
    }

    /// [`DbSpool::find`], with the record as stored (for a change on the
    /// condition that nobody else changed it).
    fn find_raw(&self, id: &str) -> Result<(Area, Envelope, String), SpoolError> {
        let key = id.to_owned();
        let row: Option<(String, String)> = self
            .db
            .call(move |inner| async move {
                let c = inner.client().await?;
                let row = c
                    .query_opt(
                        "SELECT area, envelope::text FROM mailbridge_spool WHERE id = $1",
                        &[&key],
                    )
                    .await
                    .map_err(|e| inner.db(&e))?;
                Ok(row.map(|r| (r.get(0), r.get(1))))
            })
            .map_err(SpoolError::Database)?;
        match row {
            Some((area, text)) => {
                let envelope = decode(id, &text)?;
                Ok((area_from(&area), envelope, text))
            }
            None => Err(SpoolError::NotFound { id: id.to_owned() }),
        }
    }

    pub fn content(&self, area: Area, id: &str) -> Result<Vec<u8>, SpoolError> {
        let (key, area) = (id.to_owned(), area_name(area));
        let data: Option<Vec<u8>> = self
            .db
            .call(move |inner| async move {
                let c = inner.client().await?;
                let row = c
                    .query_opt(
                        "SELECT content FROM mailbridge_spool WHERE id = $1 AND area = $2",
                        &[&key, &area],
                    )
                    .await
                    .map_err(|e| inner.db(&e))?;
                Ok(row.map(|r| r.get(0)))
            })
            .map_err(SpoolError::Database)?;
        data.ok_or_else(|| SpoolError::NotFound { id: id.to_owned() })
    }

    fn found(id: &str, rows: u64) -> Result<(), SpoolError> {
        if rows == 0 {
            Err(SpoolError::NotFound { id: id.to_owned() })
        } else {
            Ok(())
        }
    }

    pub fn update(&self, area: Area, envelope: &Envelope) -> Result<(), SpoolError> {
        let rows = self.execute(
            "UPDATE mailbridge_spool SET envelope = $2::text::jsonb, updated_at = now()
             WHERE id = $1 AND area = $3",
            vec![
                Box::new(envelope.id.clone()),
                Box::new(encode(envelope)?),
                Box::new(area_name(area)),
            ],
        )?;
        Self::found(&envelope.id, rows)
    }

    pub fn remove(&self, area: Area, id: &str) -> Result<(), SpoolError> {
        let rows = self.execute(
            "DELETE FROM mailbridge_spool WHERE id = $1 AND area = $2",
            vec![Box::new(id.to_owned()), Box::new(area_name(area))],
        )?;
        Self::found(id, rows)
    }

    pub fn move_to(&self, envelope: &Envelope, from: Area, to: Area) -> Result<(), SpoolError> {
        let received = i64::try_from(envelope.received_at).unwrap_or(i64::MAX);
        let rows = self.execute(
            "UPDATE mailbridge_spool
             SET area = $4, envelope = $2::text::jsonb, received_at = $5, updated_at = now()
             WHERE id = $1 AND area = $3",
            vec![
                Box::new(envelope.id.clone()),
                Box::new(encode(envelope)?),
                Box::new(area_name(from)),
                Box::new(area_name(to)),
                Box::new(received),
            ],
        )?;
        Self::found(&envelope.id, rows)
    }

    /// Read, changed and written back only if nobody changed it meanwhile
    /// (the stored envelope compared as `jsonb`, as read, so a field this
    /// build adds with its default does not make it differ); tried again a
    /// few times.
    pub fn retry(&self, id: &str) -> Result<Envelope, SpoolError> {
        for _ in 0..5 {
            let (area, before, stored) = self.find_raw(id)?;
            let mut after = before;
            super::requeue(area, &mut after);
            let received = i64::try_from(after.received_at).unwrap_or(i64::MAX);
            let rows = self.execute(
                "UPDATE mailbridge_spool
                 SET area = 'queue', envelope = $2::text::jsonb, received_at = $4,
                     updated_at = now()
                 WHERE id = $1 AND envelope = $3::text::jsonb",
                vec![
                    Box::new(id.to_owned()),
                    Box::new(encode(&after)?),
                    Box::new(stored),
                    Box::new(received),
                ],
            )?;
            if rows == 1 {
                return Ok(after);
            }
        }
        Err(SpoolError::Database(crate::store::StoreError::Database {
            location: self.db.location().to_owned(),
            reason: format!(
                "message {id} kept changing while it was being queued again; try again"
            ),
        }))
    }

    pub fn delete(&self, id: &str) -> Result<Area, SpoolError> {
        let key = id.to_owned();
        let area: Option<String> = self
            .db
            .call(move |inner| async move {
                let c = inner.client().await?;
                let row = c
                    .query_opt(
                        "DELETE FROM mailbridge_spool WHERE id = $1 RETURNING area",
                        &[&key],
                    )
                    .await
                    .map_err(|e| inner.db(&e))?;
                Ok(row.map(|r| r.get(0)))
            })
            .map_err(SpoolError::Database)?;
        area.map(|a| area_from(&a))
            .ok_or_else(|| SpoolError::NotFound { id: id.to_owned() })
    }

    /// The advisory lock of `id`, if nobody else holds it.
    pub fn claim(&self, id: &str) -> Result<Option<Held>, SpoolError> {
        let key = claim_key(id);
        let got: bool = self
            .db
            .call(move |inner| async move {
                let c = inner.client().await?;
                let row = c
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                    .await
                    .map_err(|e| inner.db(&e))?;
                Ok(row.get(0))
            })
            .map_err(SpoolError::Database)?;
        Ok(got.then(|| Held {
            db: self.db.clone(),
            key,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_keys_differ_per_message_and_from_the_refresh_locks() {
        assert_eq!(claim_key("1A2B"), claim_key("1A2B"));
        assert_ne!(claim_key("1A2B"), claim_key("1A2C"));
        assert_ne!(
            claim_key("1A2B"),
            crate::store::postgres::lock_key("mailbridge refresh lock", "1A2B")
        );
    }

    #[test]
    fn areas_round_trip() {
        for a in [Area::Queue, Area::Failed] {
            assert_eq!(area_from(area_name(a)), a);
        }
    }
}
