//! Group commit: one task writes every journal's new events and row to the store, many
//! journals per transaction, as fast as the store commits.
//!
//! A journal enqueues itself once when it changes; whatever changed while a commit ran goes
//! into the next one. A commit that fails (the database went away) is retried with back-off,
//! and nothing is lost meanwhile: the events stay in memory, and readers and submitters wait
//! for the durable mark.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::db::Db;
use crate::journal::Persist;

/// Journals in one transaction, at most.
const JOURNALS_PER_COMMIT: usize = 1024;
/// At shutdown, the writer goes on while changes keep coming, each within `QUIET` of the last,
/// for at most `FINAL_WRITES`.
const QUIET: Duration = Duration::from_millis(250);
const FINAL_WRITES: Duration = Duration::from_secs(5);

/// Where journals announce that they have something to write.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::UnboundedSender<Arc<dyn Persist>>,
    health: Arc<Mutex<Option<String>>>,
}

impl Writer {
    pub fn enqueue(&self, journal: Arc<dyn Persist>) {
        // After shutdown nothing is written any more; the store holds what was committed.
        let _ = self.queue.send(journal);
    }

    /// Why the store cannot be written, while that lasts.
    pub fn failure(&self) -> Option<String> {
        self.health
            .lock()
            .expect("writer health lock poisoned")
            .clone()
    }
}

/// Called with the id of a journal whose record ended and is fully durable.
pub type Settled = Box<dyn Fn(&str) + Send + Sync>;

/// Starts the writer; it runs until `stop`, then commits what is left once more.
pub fn start(
    db: Arc<Db>,
    settled: Settled,
    stop: CancellationToken,
) -> (Writer, tokio::task::JoinHandle<()>) {
    let (queue, mut incoming) = mpsc::unbounded_channel::<Arc<dyn Persist>>();
    let health = Arc::new(Mutex::new(None));
    let writer = Writer {
        queue,
        health: health.clone(),
    };
    let task = tokio::spawn(async move {
        let mut retry: Vec<Arc<dyn Persist>> = Vec::new();
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut batch = std::mem::take(&mut retry);
            if batch.is_empty() {
                tokio::select! {
                    first = incoming.recv() => match first {
                        Some(first) => batch.push(first),
                        None => return,
                    },
                    _ = stop.cancelled() => {
                        // What the driver's last moments record (a run a worker gave back as
                        // it stopped) is still written, until nothing comes for a moment.
                        let until = tokio::time::Instant::now() + FINAL_WRITES;
                        loop {
                            let next = tokio::time::timeout(QUIET, incoming.recv());
                            match tokio::time::timeout_at(until, next).await {
                                Ok(Ok(Some(journal))) => batch.push(journal),
                                _ => break,
                            }
                            while let Ok(journal) = incoming.try_recv() {
                                batch.push(journal);
                            }
                            if commit(&db, &batch, &settled).await.is_err() {
                                return;
                            }
                            batch.clear();
                        }
                        return;
                    }
                }
            }
            while batch.len() < JOURNALS_PER_COMMIT {
                match incoming.try_recv() {
                    Ok(journal) => batch.push(journal),
                    Err(_) => break,
                }
            }
            match commit(&db, &batch, &settled).await {
                Ok(()) => {
                    backoff = Duration::from_millis(50);
                    if health
                        .lock()
                        .expect("writer health lock poisoned")
                        .take()
                        .is_some()
                    {
                        tracing::info!(store = %db.place, "the store is writable again");
                    }
                }
                Err(message) => {
                    let first = health
                        .lock()
                        .expect("writer health lock poisoned")
                        .replace(message.clone())
                        .is_none();
                    if first {
                        tracing::error!(store = %db.place, error = %message, "cannot write to the store; retrying");
                    }
                    for journal in &batch {
                        journal.requeue();
                    }
                    retry = batch;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    });
    (writer, task)
}

async fn commit(db: &Db, batch: &[Arc<dyn Persist>], settled: &Settled) -> Result<(), String> {
    // A journal enqueued twice is written once, with everything it holds, in the order the
    // journals first changed: subjects made in one commit keep the order they were made in.
    let mut seen = HashSet::with_capacity(batch.len());
    let unique = batch
        .iter()
        .filter(|journal| seen.insert(Arc::as_ptr(journal) as *const () as usize));
    let mut taken = Vec::with_capacity(batch.len());
    let mut writes = Vec::with_capacity(batch.len());
    for journal in unique {
        let Some(unwritten) = journal.unwritten() else {
            continue;
        };
        taken.push((journal, unwritten.up_to, unwritten.changes));
        writes.push(unwritten.write);
    }
    if !writes.is_empty() {
        let started = std::time::Instant::now();
        db.commit(&writes).await.map_err(|err| err.to_string())?;
        crate::metrics::metrics()
            .store_latency
            .get_or_create(&vec![("operation", "commit".to_owned())])
            .observe(started.elapsed().as_secs_f64());
    }
    for (journal, up_to, changes) in taken {
        if journal.written(up_to, changes) {
            settled(journal.id());
        }
    }
    Ok(())
}
