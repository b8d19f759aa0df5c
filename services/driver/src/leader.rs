//! One leading driver among those that share a PostgreSQL store.
//!
//! Every driver on PostgreSQL asks for a session-level advisory lock on a connection of its
//! own; the one that holds it leads (runs tasks, answers clients), the others wait as
//! standbys and take over when the lock comes free. PostgreSQL frees it the moment the
//! leader's connection ends, whether the leader shut down, crashed or was killed, so a
//! standby takes over within a poll. A leader that cannot reach its lock's connection any
//! more stops serving at once: a standby may already lead, and two leaders must never write.
//! With SQLite there is one driver per file, and it leads.

use std::time::Duration;

use sqlx::AnyConnection;
use tokio_util::sync::CancellationToken;

use crate::db::{Backend, Db, DbError, LEADER_LOCK};

/// How often a standby asks for the lock.
const POLL: Duration = Duration::from_millis(200);
/// How often a leader checks that its lock's connection is alive, and how long a check may
/// take.
const CHECK_EVERY: Duration = Duration::from_secs(1);
const CHECK_WITHIN: Duration = Duration::from_secs(3);

/// The lock a leader holds, on its connection.
pub struct Leadership {
    connection: Option<AnyConnection>,
}

/// A driver's first ask for the lock.
pub enum Attempt {
    Leads(Leadership),
    Waits(Standby),
}

/// A driver that waits for the lock, on its own connection.
pub struct Standby {
    connection: AnyConnection,
}

/// Asks for the lock once.
pub async fn try_lead(db: &Db) -> Result<Attempt, DbError> {
    if db.backend != Backend::Postgres {
        return Ok(Attempt::Leads(Leadership { connection: None }));
    }
    let mut connection = db.dedicated_connection().await?;
    Ok(if ask(&mut connection).await? {
        Attempt::Leads(Leadership {
            connection: Some(connection),
        })
    } else {
        tracing::info!(store = %db.place, "another driver leads on this store; standing by");
        Attempt::Waits(Standby { connection })
    })
}

async fn ask(connection: &mut AnyConnection) -> Result<bool, DbError> {
    let (held,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
        .bind(LEADER_LOCK)
        .fetch_one(&mut *connection)
        .await?;
    Ok(held)
}

impl Standby {
    /// Waits until the lock comes free and takes it, or `stop` (`None`).
    pub async fn wait(mut self, stop: &CancellationToken) -> Result<Option<Leadership>, DbError> {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(None),
                _ = tokio::time::sleep(POLL) => {}
            }
            if ask(&mut self.connection).await? {
                return Ok(Some(Leadership {
                    connection: Some(self.connection),
                }));
            }
        }
    }
}

impl Leadership {
    /// Checks the lock's connection until `stop`, then hands the lock back to be released once
    /// the last writes are stored. When the connection fails, cancels `lost` and gives `None`.
    pub async fn keep(mut self, stop: CancellationToken, lost: CancellationToken) -> Option<Self> {
        let Some(connection) = self.connection.as_mut() else {
            return Some(self);
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Some(self),
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            let checked = tokio::time::timeout(
                CHECK_WITHIN,
                sqlx::query("SELECT 1").execute(&mut *connection),
            )
            .await;
            if !matches!(checked, Ok(Ok(_))) {
                tracing::error!(
                    "lost the connection that holds the leader's lock; stopping, since a standby may lead now"
                );
                lost.cancel();
                return None;
            }
        }
    }

    /// Gives the lock up: a standby takes over at its next poll.
    pub async fn release(mut self) {
        if let Some(mut connection) = self.connection.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(LEADER_LOCK)
                .execute(&mut connection)
                .await;
            let _ = sqlx::Connection::close(connection).await;
        }
    }
}
