//! A record and its event log, for tasks and sessions alike.
//!
//! The log is append-only with sequence numbers from 1 and no gaps; each event is applied to
//! the record under the same lock, so a snapshot and the log always agree. Appending is
//! in memory; the [`Writer`] then commits the new events and the record's row in one
//! transaction, many records at a time (group commit), and moves the log's durable mark.
//!
//! Readers see only durable events: an event a client has seen is one a restarted driver still
//! has, so a client that resumes after a restart finds every sequence number where it left
//! it. Memory holds the recent part of a log; older events are read back from the store.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use claudecluster_proto::v1::Event;
use claudecluster_proto::v1::event::Kind;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::db::{Db, Row, StoredEvent, Write};
use crate::writer::Writer;

/// Durable events kept in memory beyond what followers need; older ones are read back from the
/// store.
const EVENTS_IN_MEMORY: usize = 512;
/// Chunks of events read from the store at a time while replaying.
const REPLAY_CHUNKS: usize = 4;

/// What a follower reads with: the store, for events no longer in memory, and the signal that
/// the driver shuts down, which ends the follow with UNAVAILABLE naming where to resume.
#[derive(Clone)]
pub struct Reader {
    pub db: Arc<Db>,
    pub stop: tokio_util::sync::CancellationToken,
}

/// What a log is about: a task or a session.
pub trait Record: Send + 'static {
    /// Applies an event about to be appended; false refuses it (nothing is appended).
    fn apply(&mut self, event: &Event) -> bool;
    /// Whether the record can no longer change; followers stop at the end of its log.
    fn ended(&self) -> bool;
    /// Names the subject on an event (its task or session id) and records the sequence.
    fn stamp(&mut self, event: &mut Event);
    /// The row the store keeps for the record.
    fn row(&self, last_sequence: u64) -> Row;
}

struct State<R> {
    record: R,
    /// The events after `base`, in order; those up to `base` are only in the store.
    events: VecDeque<Event>,
    base: u64,
    /// Committed to the store up to here.
    durable: u64,
    /// Handed to the writer and not yet taken by a commit.
    queued: bool,
    /// Counts every change (events and updates), and what of them is stored.
    changes: u64,
    stored_changes: u64,
    /// Given up before anything of it was stored (its creation was refused): never written.
    abandoned: bool,
}

impl<R> State<R> {
    fn last(&self) -> u64 {
        self.base + self.events.len() as u64
    }
}

pub struct Journal<R> {
    pub id: String,
    state: Mutex<State<R>>,
    /// The durable mark: what readers may see.
    durable: watch::Sender<u64>,
    writer: Writer,
}

/// What the writer takes from a journal for one commit.
pub struct Unwritten {
    pub write: Write,
    pub up_to: u64,
    pub changes: u64,
}

/// A journal as the writer sees it, whatever its record.
pub trait Persist: Send + Sync {
    fn id(&self) -> &str;
    /// The row and the events not yet committed; the journal counts as no longer queued.
    /// `None` for a record given up before it was ever stored.
    fn unwritten(&self) -> Option<Unwritten>;
    /// The commit holding events up to `up_to` and the first `changes` changes succeeded.
    /// True when the record has ended and everything is durable: it may leave memory.
    fn written(&self, up_to: u64, changes: u64) -> bool;
    /// The commit failed; the writer keeps the journal and tries again.
    fn requeue(&self);
}

impl<R: Record> Journal<R> {
    /// A journal whose first `last_sequence` events are already in the store.
    pub fn new(id: String, record: R, last_sequence: u64, writer: Writer) -> Arc<Self> {
        Arc::new(Journal {
            id,
            state: Mutex::new(State {
                record,
                events: VecDeque::new(),
                base: last_sequence,
                durable: last_sequence,
                queued: false,
                changes: 0,
                stored_changes: 0,
                abandoned: false,
            }),
            durable: watch::Sender::new(last_sequence),
            writer,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<R>> {
        self.state.lock().expect("journal lock poisoned")
    }

    /// Reads the record.
    pub fn read<T>(&self, f: impl FnOnce(&R) -> T) -> T {
        f(&self.lock().record)
    }

    /// Changes the record without an event; the change is stored with the next commit.
    pub fn update<T>(self: &Arc<Self>, f: impl FnOnce(&mut R) -> T) -> T {
        let mut state = self.lock();
        let value = f(&mut state.record);
        state.changes += 1;
        let enqueue = !std::mem::replace(&mut state.queued, true);
        drop(state);
        if enqueue {
            self.writer.enqueue(self.clone());
        }
        self.durable.send_modify(|_| {});
        value
    }

    /// Changes the record in memory only: the change goes with the next commit of the record,
    /// if there is one. For what the driver learns again after a restart anyway.
    pub fn note<T>(&self, f: impl FnOnce(&mut R) -> T) -> T {
        let value = f(&mut self.lock().record);
        self.durable.send_modify(|_| {});
        value
    }

    pub fn last_sequence(&self) -> u64 {
        self.lock().last()
    }

    /// Why the store cannot be written, while that lasts.
    pub fn store_failure(&self) -> Option<String> {
        self.writer.failure()
    }

    /// Gives up a record whose creation was refused, so that it is never written; false when
    /// some of it is stored already (it stays).
    pub fn abandon(&self) -> bool {
        let mut state = self.lock();
        if state.stored_changes > 0 {
            return false;
        }
        state.abandoned = true;
        true
    }

    /// Appends an event the record accepts, running `also` on the record under the same lock;
    /// returns its sequence number.
    pub fn append_with(
        self: &Arc<Self>,
        mut event: Event,
        also: impl FnOnce(&mut R),
    ) -> Option<u64> {
        event.kind.as_ref()?;
        let mut state = self.lock();
        if !state.record.apply(&event) {
            return None;
        }
        also(&mut state.record);
        let sequence = state.last() + 1;
        event.sequence = sequence;
        event.time = Some(SystemTime::now().into());
        state.record.stamp(&mut event);
        state.events.push_back(event);
        state.changes += 1;
        let enqueue = !std::mem::replace(&mut state.queued, true);
        drop(state);
        if enqueue {
            self.writer.enqueue(self.clone());
        }
        Some(sequence)
    }

    pub fn append(self: &Arc<Self>, event: Event) -> Option<u64> {
        self.append_with(event, |_| {})
    }

    /// Waits until every change made so far (events and updates) is stored; false when the
    /// store did not commit within `patience`.
    pub async fn wait_stored(&self, patience: std::time::Duration) -> bool {
        let target = self.lock().changes;
        let mut notices = self.durable.subscribe();
        let stored = async {
            loop {
                notices.borrow_and_update();
                if self.lock().stored_changes >= target {
                    return true;
                }
                if notices.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::time::timeout(patience, stored)
            .await
            .unwrap_or(false)
    }

    /// Durable events after `after` held in memory, the durable mark, the memory's base and
    /// whether the record ended.
    fn durable_after(&self, after: u64) -> (Vec<Event>, u64, u64, bool) {
        let state = self.lock();
        let start = after.max(state.base);
        let events = state
            .events
            .iter()
            .skip((start - state.base) as usize)
            .take_while(|event| event.sequence <= state.durable)
            .cloned()
            .collect();
        (events, state.durable, state.base, state.record.ended())
    }

    /// Sends the durable events after `after` that `wanted` keeps to `out`, then follows the
    /// log until `last` says an event sent was the last one, the record has ended and every
    /// event was sent, or `out` closes. Events no longer in memory come from `db`.
    pub async fn follow_while(
        self: Arc<Self>,
        reader: Reader,
        after: u64,
        out: mpsc::Sender<Result<Event, Status>>,
        wanted: impl Fn(&Event) -> bool + Send,
        last: impl Fn(&Event) -> bool + Send,
    ) {
        let mut changes = self.durable.subscribe();
        let mut cursor = after;
        loop {
            changes.borrow_and_update();
            let (batch, durable, base, ended) = self.durable_after(cursor);
            if cursor < base {
                let (stored, complete) = match reader
                    .db
                    .events(&self.id, cursor, base, REPLAY_CHUNKS)
                    .await
                {
                    Ok(read) => read,
                    Err(err) => {
                        let _ = out.send(Err(Status::unavailable(err.to_string()))).await;
                        return;
                    }
                };
                // Compaction may have removed events: go on after what was read either way.
                cursor = if complete {
                    base
                } else {
                    stored.last().map_or(base, |(sequence, _)| *sequence)
                };
                for (sequence, bytes) in stored {
                    let event = match Event::decode(bytes.as_slice()) {
                        Ok(event) => event,
                        Err(err) => {
                            tracing::error!(subject = %self.id, sequence, error = %err, "a stored event is damaged; skipping it");
                            continue;
                        }
                    };
                    if !wanted(&event) {
                        continue;
                    }
                    let is_last = last(&event);
                    if !deliver(&out, &reader, event).await || is_last {
                        return;
                    }
                }
                continue;
            }
            for event in batch {
                cursor = event.sequence;
                if !wanted(&event) {
                    continue;
                }
                let is_last = last(&event);
                if !deliver(&out, &reader, event).await || is_last {
                    return;
                }
            }
            if ended && cursor >= durable && durable == self.last_sequence() {
                return;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = out.closed() => return,
                _ = reader.stop.cancelled() => {
                    let shutting_down: Status =
                        crate::error::DriverError::ShuttingDown { after: cursor }.into();
                    let _ = out.send(Err(shutting_down)).await;
                    return;
                }
            }
        }
    }

    /// Sends every event after `after` to `out` and follows the log to its end.
    pub async fn follow(
        self: Arc<Self>,
        reader: Reader,
        after: u64,
        out: mpsc::Sender<Result<Event, Status>>,
    ) {
        self.follow_while(reader, after, out, |_| true, |_| false)
            .await
    }

    /// Waits until `done` holds of the record.
    pub async fn wait_for(&self, done: impl Fn(&R) -> bool) {
        let mut changes = self.durable.subscribe();
        loop {
            changes.borrow_and_update();
            if self.read(|record| done(record)) {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Sends `event` to a follower's client; false when the client left or the driver shuts down
/// meanwhile (a client that does not read must not hold the shutdown up).
async fn deliver(out: &mpsc::Sender<Result<Event, Status>>, reader: &Reader, event: Event) -> bool {
    let sequence = event.sequence;
    tokio::select! {
        sent = out.send(Ok(event)) => sent.is_ok(),
        _ = reader.stop.cancelled() => {
            let after = sequence.saturating_sub(1);
            let shutting_down: Status = crate::error::DriverError::ShuttingDown { after }.into();
            let _ = out.try_send(Err(shutting_down));
            false
        }
    }
}

/// Whether compaction keeps an event (its protobuf): the status changes and the result.
pub fn kept_by_compaction(bytes: &[u8]) -> bool {
    Event::decode(bytes).is_ok_and(|event| {
        matches!(
            event.kind,
            Some(Kind::StatusChange(_) | Kind::Result(_) | Kind::SessionState(_))
        )
    })
}

impl<R: Record> Persist for Journal<R> {
    fn id(&self) -> &str {
        &self.id
    }

    fn unwritten(&self) -> Option<Unwritten> {
        let mut state = self.lock();
        state.queued = false;
        if state.abandoned {
            return None;
        }
        let durable = state.durable;
        let events = state
            .events
            .iter()
            .skip(durable.saturating_sub(state.base) as usize)
            .map(|event| StoredEvent {
                sequence: event.sequence,
                bytes: event.encode_to_vec(),
            })
            .collect();
        let up_to = state.last();
        Some(Unwritten {
            write: Write {
                id: self.id.clone(),
                row: state.record.row(up_to),
                events,
            },
            up_to,
            changes: state.changes,
        })
    }

    fn written(&self, up_to: u64, changes: u64) -> bool {
        let mut state = self.lock();
        state.durable = state.durable.max(up_to);
        state.stored_changes = state.stored_changes.max(changes);
        // Durable events beyond what memory keeps are read back from the store.
        let durable_in_memory = (state.durable - state.base) as usize;
        if durable_in_memory > 2 * EVENTS_IN_MEMORY {
            let drop = durable_in_memory - EVENTS_IN_MEMORY;
            state.events.drain(..drop);
            state.base += drop as u64;
        }
        let settled = state.record.ended() && state.durable == state.last() && !state.queued;
        let durable = state.durable;
        drop(state);
        self.durable.send_replace(durable);
        settled
    }

    fn requeue(&self) {
        self.lock().queued = true;
    }
}
