//! A record and its event log, for tasks and sessions alike.
//!
//! The log is append-only with sequence numbers from 1 and no gaps; each event is applied to
//! the record under the same lock, so a snapshot and the log always agree. Readers follow the
//! log through a watch channel on the last sequence number, so a reader never misses an event
//! and never sees one twice, however slow it is.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use claudecluster_proto::v1::Event;
use tokio::sync::{mpsc, watch};

/// What a log is about: a task or a session.
pub trait Record: Send + 'static {
    /// Applies an event about to be appended; false refuses it (nothing is appended).
    fn apply(&mut self, event: &Event) -> bool;
    /// Whether the record can no longer change; followers stop at the end of its log.
    fn ended(&self) -> bool;
    /// Names the subject on an event (its task or session id) and records the sequence.
    fn stamp(&mut self, event: &mut Event);
}

pub struct Journal<R> {
    state: Mutex<(R, Vec<Event>)>,
    last_sequence: watch::Sender<u64>,
}

impl<R: Record> Journal<R> {
    pub fn new(record: R) -> Self {
        Journal {
            state: Mutex::new((record, Vec::new())),
            last_sequence: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (R, Vec<Event>)> {
        self.state.lock().expect("journal lock poisoned")
    }

    /// Reads or changes the record without an event.
    pub fn with<T>(&self, f: impl FnOnce(&mut R) -> T) -> T {
        f(&mut self.lock().0)
    }

    pub fn last_sequence(&self) -> u64 {
        *self.last_sequence.borrow()
    }

    /// Wakes everyone waiting on the record ([`Journal::wait_for`]) after a change made
    /// without an event.
    pub fn poke(&self) {
        self.last_sequence.send_modify(|_| {});
    }

    /// Appends an event the record accepts; returns its sequence number.
    pub fn append(&self, mut event: Event) -> Option<u64> {
        event.kind.as_ref()?;
        let mut state = self.lock();
        let (record, events) = &mut *state;
        if !record.apply(&event) {
            return None;
        }
        let sequence = events.len() as u64 + 1;
        event.sequence = sequence;
        event.time = Some(SystemTime::now().into());
        record.stamp(&mut event);
        events.push(event);
        drop(state);
        self.last_sequence.send_replace(sequence);
        Some(sequence)
    }

    /// Events after `after`, and whether they reach the end of a finished log.
    fn events_after(&self, after: u64) -> (Vec<Event>, bool) {
        let state = self.lock();
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(state.1.len());
        (state.1[start..].to_vec(), state.0.ended())
    }

    /// Sends the events after `after` that `wanted` keeps to `out`, then follows the log until
    /// `last` says an event sent was the last one, the record has ended and every event was
    /// seen, or `out` closes.
    pub async fn follow_while(
        self: Arc<Self>,
        after: u64,
        out: mpsc::Sender<Event>,
        wanted: impl Fn(&Event) -> bool + Send,
        last: impl Fn(&Event) -> bool + Send,
    ) {
        let mut changes = self.last_sequence.subscribe();
        let mut cursor = after;
        loop {
            let (batch, ended) = self.events_after(cursor);
            for event in batch {
                cursor = event.sequence;
                if !wanted(&event) {
                    continue;
                }
                let is_last = last(&event);
                if out.send(event).await.is_err() || is_last {
                    return;
                }
            }
            if ended {
                return;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = out.closed() => return,
            }
        }
    }

    /// Sends every event after `after` to `out` and follows the log to its end.
    pub async fn follow(self: Arc<Self>, after: u64, out: mpsc::Sender<Event>) {
        self.follow_while(after, out, |_| true, |_| false).await
    }

    /// Waits until `done` holds of the record.
    pub async fn wait_for(&self, done: impl Fn(&R) -> bool) {
        let mut changes = self.last_sequence.subscribe();
        while !self.with(|record| done(record)) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}
