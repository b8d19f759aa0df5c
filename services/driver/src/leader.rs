//! One leading driver among those that share a PostgreSQL store.
//!
//! Every driver on PostgreSQL asks for a session-level advisory lock on a connection of its
//! own; the one that holds it leads (runs tasks, answers clients), the others wait as
//! standbys and take over when the lock comes free. PostgreSQL frees it the moment the
//! leader's connection ends, whether the leader shut down, crashed or was killed, so a
//! standby takes over within a poll. A leader that loses its lock's connection takes the lock
//! back when the store answers again, if no other driver led meanwhile (each leadership is
//! counted in the store); otherwise it stops, since two leaders must never write.
//! With SQLite there is one driver per file, and it leads.

use std::sync::Arc;
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
    /// The number of this leadership in the store.
    epoch: i64,
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
        return Ok(Attempt::Leads(Leadership {
            connection: None,
            epoch: 0,
        }));
    }
    let mut connection = db.dedicated_connection().await?;
    Ok(if ask(&mut connection).await? {
        Attempt::Leads(Leadership {
            connection: Some(connection),
            epoch: 0,
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
                    epoch: 0,
                }));
            }
        }
    }
}

impl Leadership {
    /// Counts this leadership in the store (after taking the lock), so that a later loss of
    /// the lock can tell whether another driver led meanwhile.
    pub async fn begin(&mut self, db: &Db) -> Result<(), DbError> {
        if self.connection.is_some() {
            self.epoch = db.next_leader_epoch().await?;
        }
        Ok(())
    }

    /// Checks the lock's connection until `stop`, then hands the lock back to be released once
    /// the last writes are stored.
    ///
    /// When the connection fails, the lock is taken again on a new one as soon as the store
    /// answers: if no other driver led meanwhile, this one goes on leading (what it holds in
    /// memory is still the truth; while the store is away it serves what it holds and refuses
    /// writes, as any driver does). If another driver holds the lock, or led since, this one
    /// cancels `lost` and gives `None`: it must stop.
    pub async fn keep(
        mut self,
        db: Arc<Db>,
        stop: CancellationToken,
        lost: CancellationToken,
    ) -> Option<Self> {
        if self.connection.is_none() {
            return Some(self);
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Some(self),
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            let connection = self
                .connection
                .as_mut()
                .expect("a leader holds its lock's connection");
            let checked = tokio::time::timeout(
                CHECK_WITHIN,
                sqlx::query("SELECT 1").execute(&mut *connection),
            )
            .await;
            if matches!(checked, Ok(Ok(_))) {
                continue;
            }
            tracing::warn!(
                "lost the connection that holds the leader's lock; taking the lock again once the store answers"
            );
            self.connection = None;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Some(self),
                    _ = tokio::time::sleep(POLL) => {}
                }
                let Ok(mut connection) = db.dedicated_connection().await else {
                    continue;
                };
                match ask(&mut connection).await {
                    Ok(true) => match db.leader_epoch().await {
                        Ok(epoch) if epoch == self.epoch => {
                            tracing::info!(
                                "holds the leader's lock again; no other driver led meanwhile"
                            );
                            self.connection = Some(connection);
                            break;
                        }
                        Ok(_) => {
                            tracing::error!("another driver led while the lock was lost; stopping");
                            let _ = sqlx::Connection::close(connection).await;
                            lost.cancel();
                            return None;
                        }
                        Err(_) => {
                            let _ = sqlx::Connection::close(connection).await;
                        }
                    },
                    Ok(false) => {
                        tracing::error!("another driver leads now; stopping");
                        lost.cancel();
                        return None;
                    }
                    Err(_) => {}
                }
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
