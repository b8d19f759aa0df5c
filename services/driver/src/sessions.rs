//! The driver's record of every session: its journal, and the messages waiting their turn.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::{
    Event, Session, SessionSpec, SessionState, SessionStateChange, TokenUsage,
};
use tokio::sync::mpsc;

use crate::catalog::Catalog;
use crate::error::DriverError;
use crate::journal::{Journal, Record};

pub fn is_final(state: SessionState) -> bool {
    state.is_final()
}

pub struct SessionRecord {
    session: Session,
    /// Messages waiting, with their turn numbers.
    queue: VecDeque<(u32, String)>,
    next_turn: u32,
    /// The turn sent to the worker and not yet answered.
    in_flight: Option<u32>,
    /// Where the session lives, once placed.
    worker_address: Option<String>,
}

impl SessionRecord {
    fn state(&self) -> SessionState {
        self.session.state()
    }

    pub fn is_closed(&self) -> bool {
        self.state() == SessionState::Closed
    }

    /// A message can go to the worker now.
    fn ready_for_next(&self) -> bool {
        self.in_flight.is_none()
            && !self.queue.is_empty()
            && matches!(
                self.state(),
                SessionState::Ready | SessionState::Idle | SessionState::Stopped
            )
    }
}

impl Record for SessionRecord {
    fn apply(&mut self, event: &Event) -> bool {
        let session = &mut self.session;
        let closes =
            matches!(&event.kind, Some(Kind::SessionState(c)) if c.state() == SessionState::Closed);
        match session.state() {
            SessionState::Closed => return false,
            // A failed or lost session only closes.
            SessionState::Failed | SessionState::Lost if !closes => return false,
            _ => {}
        }
        match &event.kind {
            Some(Kind::SessionState(change)) => {
                session.set_state(change.state());
                session.state_reason = change.reason.clone();
                if !change.worker_id.is_empty() {
                    session.worker_id = change.worker_id.clone();
                }
                if !change.workspace.is_empty() {
                    session.workspace = change.workspace.clone();
                }
                if change.state() != SessionState::Busy && self.in_flight == Some(event.turn) {
                    self.in_flight = None;
                }
                if is_final(change.state()) {
                    self.in_flight = None;
                    self.queue.clear();
                    session.queued_messages = 0;
                }
                session.last_activity_time = Some(SystemTime::now().into());
            }
            Some(Kind::Init(init)) => session.agent_session_id = init.agent_session_id.clone(),
            Some(Kind::Result(result)) => {
                session.turns += 1;
                // The agent reports its cost cumulatively over its conversation, resumes included.
                session.total_cost_usd = session.total_cost_usd.max(result.total_cost_usd);
                let turn = result.usage.unwrap_or_default();
                let usage = session.usage.get_or_insert_with(TokenUsage::default);
                usage.input_tokens += turn.input_tokens;
                usage.output_tokens += turn.output_tokens;
                usage.cache_creation_input_tokens += turn.cache_creation_input_tokens;
                usage.cache_read_input_tokens += turn.cache_read_input_tokens;
            }
            _ => {}
        }
        true
    }

    fn ended(&self) -> bool {
        is_final(self.state())
    }

    fn stamp(&mut self, event: &mut Event) {
        event.session_id = self.session.session_id.clone();
        self.session.last_sequence = event.sequence;
    }
}

pub struct SessionEntry {
    pub id: String,
    pub journal: Arc<Journal<SessionRecord>>,
}

impl SessionEntry {
    pub fn snapshot(&self) -> Session {
        self.journal.with(|record| record.session.clone())
    }

    pub fn state(&self) -> SessionState {
        self.journal.with(|record| record.state())
    }

    pub fn spec(&self) -> SessionSpec {
        self.journal
            .with(|record| record.session.spec.clone().unwrap_or_default())
    }

    pub fn worker_address(&self) -> Option<String> {
        self.journal.with(|record| record.worker_address.clone())
    }

    pub fn set_state(
        &self,
        state: SessionState,
        reason: impl Into<String>,
        worker_id: &str,
        turn: u32,
    ) -> bool {
        self.journal
            .append(Event {
                turn,
                kind: Some(Kind::SessionState(SessionStateChange {
                    state: state as i32,
                    reason: reason.into(),
                    worker_id: worker_id.to_owned(),
                    workspace: String::new(),
                })),
                ..Event::default()
            })
            .is_some()
    }

    /// Records the worker the session was placed on; false if it is no longer waiting for one.
    pub fn assign(&self, worker_id: &str, address: &str) -> bool {
        let placed = self.journal.with(|record| {
            if record.state() != SessionState::Creating || record.worker_address.is_some() {
                return false;
            }
            record.worker_address = Some(address.to_owned());
            true
        });
        placed
            && self.set_state(
                SessionState::Creating,
                format!("starting on worker {worker_id}"),
                worker_id,
                0,
            )
    }

    /// Queues a message; returns its turn and the sequence number after which its events come.
    pub fn queue_message(&self, text: String, limit: usize) -> Result<(u32, u64), DriverError> {
        let queued = self.journal.with(|record| {
            let state = record.state();
            if is_final(state) {
                return Err(DriverError::SessionEnded {
                    session_id: self.id.clone(),
                    state: state.label(),
                    reason: record.session.state_reason.clone(),
                });
            }
            if record.queue.len() >= limit {
                return Err(DriverError::SessionQueueFull {
                    session_id: self.id.clone(),
                    limit,
                });
            }
            record.next_turn += 1;
            let turn = record.next_turn;
            record.queue.push_back((turn, text));
            record.session.queued_messages = record.queue.len() as u32;
            record.session.last_activity_time = Some(SystemTime::now().into());
            Ok(turn)
        })?;
        let after = self.journal.last_sequence();
        self.journal.poke();
        Ok((queued, after))
    }

    /// The next message to send, once the session can take it; `None` once it has ended.
    pub async fn next_message(&self) -> Option<(u32, String)> {
        self.journal
            .wait_for(|record| record.ready_for_next() || record.ended())
            .await;
        self.journal.with(|record| {
            if record.ended() {
                return None;
            }
            let (turn, text) = record.queue.pop_front()?;
            record.in_flight = Some(turn);
            record.session.queued_messages = record.queue.len() as u32;
            Some((turn, text))
        })
    }

    /// Ends a turn the worker could not take.
    pub fn turn_refused(&self, turn: u32, reason: String) {
        let state = self.state();
        self.journal.with(|record| {
            if record.in_flight == Some(turn) {
                record.in_flight = None;
            }
        });
        self.set_state(state, reason, "", turn);
    }

    /// Streams the events of `turn` after `after` to `out`, ending with the state change that
    /// ends the turn (or the session).
    pub async fn follow_turn(self: Arc<Self>, turn: u32, after: u64, out: mpsc::Sender<Event>) {
        let ends_turn = move |event: &Event| match &event.kind {
            Some(Kind::SessionState(change)) => {
                is_final(change.state())
                    || (event.turn == turn && change.state() != SessionState::Busy)
            }
            _ => false,
        };
        let wanted = move |event: &Event| event.turn == turn || ends_turn(event);
        self.journal
            .clone()
            .follow_while(after, out, wanted, ends_turn)
            .await
    }

    pub async fn follow(self: Arc<Self>, after: u64, out: mpsc::Sender<Event>) {
        self.journal.clone().follow(after, out).await
    }
}

#[derive(Default)]
pub struct SessionStore {
    sessions: RwLock<Catalog<SessionEntry>>,
}

impl SessionStore {
    pub fn insert(&self, spec: SessionSpec) -> Arc<SessionEntry> {
        let id = uuid::Uuid::new_v4().to_string();
        let session = Session {
            session_id: id.clone(),
            spec: Some(spec),
            state: SessionState::Unspecified as i32,
            create_time: Some(SystemTime::now().into()),
            ..Session::default()
        };
        let entry = Arc::new(SessionEntry {
            id: id.clone(),
            journal: Arc::new(Journal::new(SessionRecord {
                session,
                queue: VecDeque::new(),
                next_turn: 0,
                in_flight: None,
                worker_address: None,
            })),
        });
        entry.set_state(
            SessionState::Creating,
            "waiting for a container worker",
            "",
            0,
        );
        self.sessions
            .write()
            .expect("session store lock poisoned")
            .insert(id, entry.clone());
        entry
    }

    pub fn get(&self, id: &str) -> Option<Arc<SessionEntry>> {
        self.sessions
            .read()
            .expect("session store lock poisoned")
            .get(id)
    }

    pub fn page(
        &self,
        start: u64,
        limit: usize,
        filter: impl Fn(SessionState) -> bool,
    ) -> (Vec<Session>, Option<u64>) {
        self.sessions
            .read()
            .expect("session store lock poisoned")
            .page(start, limit, |entry| {
                let session = entry.snapshot();
                filter(session.state()).then_some(session)
            })
    }

    /// Sessions waiting for a worker, to enqueue again when the scheduler reconnects.
    pub fn waiting(&self) -> Vec<Arc<SessionEntry>> {
        self.sessions
            .read()
            .expect("session store lock poisoned")
            .all()
            .filter(|entry| {
                entry.state() == SessionState::Creating && entry.worker_address().is_none()
            })
            .cloned()
            .collect()
    }
}
