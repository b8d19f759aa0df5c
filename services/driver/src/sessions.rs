//! The driver's record of every session: its journal, and the messages waiting their turn.

use std::sync::Arc;
use std::time::SystemTime;

use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::{
    Event, Session, SessionSpec, SessionState, SessionStateChange, TokenUsage,
};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use crate::db::{Db, LoadedRow, Row, SubjectKind};
use crate::error::DriverError;
use crate::journal::{Journal, Reader, Record};
use crate::store::{Bookkeeping, DURABLE_PATIENCE, Live, QueuedMessage, millis};
use crate::writer::Writer;

pub fn is_final(state: SessionState) -> bool {
    state.is_final()
}

pub struct SessionRecord {
    session: Session,
    /// Messages waiting, the turn in flight, where the session lives once placed.
    book: Bookkeeping,
}

impl SessionRecord {
    fn state(&self) -> SessionState {
        self.session.state()
    }

    /// A message can go to the worker now.
    fn ready_for_next(&self) -> bool {
        self.book.in_flight.is_none()
            && !self.book.queue.is_empty()
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
                if change.state() != SessionState::Busy && self.book.in_flight == Some(event.turn) {
                    self.book.in_flight = None;
                }
                if is_final(change.state()) {
                    self.book.in_flight = None;
                    self.book.queue.clear();
                    session.queued_messages = 0;
                }
                session.last_activity_time = Some(SystemTime::now().into());
            }
            Some(Kind::Init(init)) => {
                session.agent_session_id = init.agent_session_id.clone();
                if !init.model.is_empty() {
                    session.model = init.model.clone();
                }
            }
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

    fn row(&self, last_sequence: u64) -> Row {
        let ended = self.ended();
        Row {
            kind: SubjectKind::Session,
            status: self.session.state,
            ended,
            idempotency_key: None,
            record: self.session.encode_to_vec(),
            bookkeeping: self.book.encode_to_vec(),
            last_sequence,
            end_time_ms: ended.then(|| {
                self.session
                    .last_activity_time
                    .as_ref()
                    .map_or_else(crate::db::now_ms, millis)
            }),
        }
    }
}

pub struct SessionEntry {
    pub id: String,
    pub journal: Arc<Journal<SessionRecord>>,
    /// The trace of the request that created the session; its run and turns join it.
    pub trace: std::sync::Mutex<claudecluster_telemetry::propagation::TraceParent>,
}

impl SessionEntry {
    /// The session as clients get it: its repository without the credentials its URL may carry.
    pub fn snapshot(&self) -> Session {
        let mut session = self.journal.read(|record| record.session.clone());
        if let Some(spec) = session.spec.as_mut() {
            spec.repo_url = claudecluster_proto::without_credentials(&spec.repo_url);
        }
        session
    }

    pub fn state(&self) -> SessionState {
        self.journal.read(|record| record.state())
    }

    /// The id of the key that created the session.
    pub fn owner(&self) -> String {
        self.journal.read(|record| record.session.owner.clone())
    }

    pub fn spec(&self) -> SessionSpec {
        self.journal
            .read(|record| record.session.spec.clone().unwrap_or_default())
    }

    pub fn worker_address(&self) -> Option<String> {
        self.journal.read(|record| {
            Some(record.book.worker_address.clone()).filter(|address| !address.is_empty())
        })
    }

    /// The worker's id and the last run sequence received from it.
    pub fn placement(&self) -> (String, u64) {
        self.journal
            .read(|record| (record.session.worker_id.clone(), record.book.run_sequence))
    }

    /// Appends an event the worker sent, remembering its run sequence for attaching again.
    pub fn append_from_worker(&self, event: Event, run_sequence: u64) -> Option<u64> {
        self.journal.append_with(event, |record| {
            record.book.run_sequence = record.book.run_sequence.max(run_sequence)
        })
    }

    /// The message sent to the worker and not answered, to send again after attaching anew.
    pub fn unanswered(&self) -> Option<(u32, String)> {
        self.journal.read(|record| {
            record
                .book
                .in_flight
                .map(|turn| (turn, record.book.in_flight_text.clone()))
        })
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
        let placed = self.journal.update(|record| {
            if record.state() != SessionState::Creating || !record.book.worker_address.is_empty() {
                return false;
            }
            record.book.worker_address = address.to_owned();
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
    pub async fn queue_message(
        &self,
        text: String,
        limit: usize,
    ) -> Result<(u32, u64), DriverError> {
        if let Some(reason) = self.journal.store_failure() {
            return Err(DriverError::NotDurable(reason));
        }
        let queued = self.journal.update(|record| {
            let state = record.state();
            if is_final(state) {
                return Err(DriverError::SessionEnded {
                    session_id: self.id.clone(),
                    state: state.label(),
                    reason: record.session.state_reason.clone(),
                });
            }
            if record.book.queue.len() >= limit {
                return Err(DriverError::SessionQueueFull {
                    session_id: self.id.clone(),
                    limit,
                });
            }
            record.book.next_turn += 1;
            let turn = record.book.next_turn;
            record.book.queue.push(QueuedMessage { turn, text });
            record.session.queued_messages = record.book.queue.len() as u32;
            record.session.last_activity_time = Some(SystemTime::now().into());
            Ok(turn)
        })?;
        let after = self.journal.last_sequence();
        // The message is accepted once it is stored. One that could not be is taken back, if
        // it still waits: the client was told it was not sent.
        if !self.journal.wait_stored(DURABLE_PATIENCE).await {
            self.journal.update(|record| {
                record.book.queue.retain(|message| message.turn != queued);
                record.session.queued_messages = record.book.queue.len() as u32;
            });
            return Err(DriverError::NotDurable(format!(
                "the message to session {} is not yet stored: {}",
                self.id,
                self.journal
                    .store_failure()
                    .unwrap_or_else(|| "the store is slow".to_owned())
            )));
        }
        Ok((queued, after))
    }

    /// The next message to send, once the session can take it; `None` once it has ended.
    pub async fn next_message(&self) -> Option<(u32, String)> {
        self.journal
            .wait_for(|record| record.ready_for_next() || record.ended())
            .await;
        self.journal.update(|record| {
            if record.ended() || record.book.queue.is_empty() {
                return None;
            }
            let QueuedMessage { turn, text } = record.book.queue.remove(0);
            record.book.in_flight = Some(turn);
            record.book.in_flight_text = text.clone();
            record.session.queued_messages = record.book.queue.len() as u32;
            Some((turn, text))
        })
    }

    /// Completes once the session is neither starting nor answering a message: its worker
    /// reads what the driver sends only then.
    pub async fn settled(&self) {
        self.journal
            .wait_for(|record| {
                !matches!(record.state(), SessionState::Creating | SessionState::Busy)
            })
            .await
    }

    /// Completes once the session has ended.
    pub async fn ended(&self) {
        self.journal.wait_for(|record| record.ended()).await
    }

    /// Streams the events of `turn` after `after` to `out`, ending with the state change that
    /// ends the turn (or the session).
    pub async fn follow_turn(
        self: Arc<Self>,
        reader: Reader,
        turn: u32,
        after: u64,
        out: mpsc::Sender<Result<Event, Status>>,
    ) {
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
            .follow_while(reader, after, out, wanted, ends_turn)
            .await
    }

    pub async fn follow(
        self: Arc<Self>,
        reader: Reader,
        after: u64,
        out: mpsc::Sender<Result<Event, Status>>,
    ) {
        self.journal.clone().follow(reader, after, out).await
    }
}

/// Every session: the live ones in memory, all of them in the store.
pub struct SessionStore {
    db: Arc<Db>,
    writer: Writer,
    live: Arc<Live>,
}

impl SessionStore {
    pub fn new(db: Arc<Db>, writer: Writer, live: Arc<Live>) -> Self {
        SessionStore { db, writer, live }
    }

    fn entry(&self, id: String, record: SessionRecord, last_sequence: u64) -> Arc<SessionEntry> {
        Arc::new(SessionEntry {
            journal: Journal::new(id.clone(), record, last_sequence, self.writer.clone()),
            id,
            trace: Default::default(),
        })
    }

    /// Records a new session; it is stored when this returns.
    pub async fn insert(
        &self,
        spec: SessionSpec,
        owner: &str,
    ) -> Result<Arc<SessionEntry>, DriverError> {
        if let Some(reason) = self.writer.failure() {
            return Err(DriverError::NotDurable(reason));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let session = Session {
            session_id: id.clone(),
            owner: owner.to_owned(),
            spec: Some(spec),
            state: SessionState::Unspecified as i32,
            create_time: Some(SystemTime::now().into()),
            ..Session::default()
        };
        let record = SessionRecord {
            session,
            book: Bookkeeping::default(),
        };
        let entry = self.entry(id.clone(), record, 0);
        self.live
            .sessions
            .write()
            .expect("live session lock poisoned")
            .insert(id, entry.clone());
        entry.set_state(
            SessionState::Creating,
            "waiting for a container worker",
            "",
            0,
        );
        if !entry.journal.wait_stored(DURABLE_PATIENCE).await {
            if entry.journal.abandon() {
                self.live
                    .sessions
                    .write()
                    .expect("live session lock poisoned")
                    .remove(&entry.id);
            }
            return Err(DriverError::NotDurable(format!(
                "session {} is not yet stored: {}",
                entry.id,
                entry
                    .journal
                    .store_failure()
                    .unwrap_or_else(|| "the store is slow".to_owned())
            )));
        }
        Ok(entry)
    }

    fn decode(&self, row: LoadedRow) -> Result<Arc<SessionEntry>, DriverError> {
        let corrupt = |err: prost::DecodeError| {
            crate::db::DbError::Corrupt(format!("session {}: {err}", row.id))
        };
        let session = Session::decode(row.record.as_slice()).map_err(corrupt)?;
        let book = Bookkeeping::decode(row.bookkeeping.as_slice()).map_err(corrupt)?;
        Ok(self.entry(
            row.id.clone(),
            SessionRecord { session, book },
            row.last_sequence,
        ))
    }

    pub async fn get(&self, id: &str) -> Result<Option<Arc<SessionEntry>>, DriverError> {
        let live = self
            .live
            .sessions
            .read()
            .expect("live session lock poisoned")
            .get(id)
            .cloned();
        if live.is_some() {
            return Ok(live);
        }
        match self.db.get(id).await? {
            Some(row) if row.kind == SubjectKind::Session => Ok(Some(self.decode(row)?)),
            _ => Ok(None),
        }
    }

    /// Sessions after position `after` in creation order in one of `states` (any when empty),
    /// at most `limit`; and the position where the next page starts.
    /// Live sessions of `owner` that are not closed: what its `openSessions` quota counts.
    pub fn open_owned_by(&self, owner: &str) -> usize {
        self.live
            .sessions
            .read()
            .expect("live session lock poisoned")
            .values()
            .filter(|entry| {
                entry
                    .journal
                    .read(|record| record.session.owner == owner && !record.state().is_final())
            })
            .count()
    }

    pub async fn page(
        &self,
        after: i64,
        limit: usize,
        states: &[i32],
        visible: impl Fn(&Session) -> bool,
    ) -> Result<(Vec<Session>, Option<i64>), DriverError> {
        let rows = self
            .db
            .page(SubjectKind::Session, after, limit + 1, states)
            .await?;
        let mut more = rows.len() > limit;
        let mut page = Vec::with_capacity(limit);
        let mut budget = crate::listing::PageBudget::default();
        let mut last = after;
        for row in rows.into_iter().take(limit) {
            let order = row.order;
            let live = self
                .live
                .sessions
                .read()
                .expect("live session lock poisoned")
                .get(&row.id)
                .cloned();
            let session = match live {
                Some(entry) => entry.snapshot(),
                None => self.decode(row)?.snapshot(),
            };
            if !visible(&session) {
                last = order;
                continue;
            }
            let session = crate::listing::listed_session(session);
            if !budget.admit(&session) {
                more = true;
                break;
            }
            page.push(session);
            last = order;
        }
        Ok((page, more.then_some(last)))
    }

    fn live_sessions(&self) -> Vec<Arc<SessionEntry>> {
        self.live
            .sessions
            .read()
            .expect("live session lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// Sessions waiting for a worker, to enqueue again when the scheduler reconnects.
    pub fn waiting(&self) -> Vec<Arc<SessionEntry>> {
        self.live_sessions()
            .into_iter()
            .filter(|entry| {
                entry.state() == SessionState::Creating && entry.worker_address().is_none()
            })
            .collect()
    }

    /// Loads every session that had not ended when the driver stopped, into memory.
    pub async fn recover(&self) -> Result<Vec<Arc<SessionEntry>>, DriverError> {
        let rows = self.db.live(SubjectKind::Session).await?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let entry = self.decode(row)?;
            self.live
                .sessions
                .write()
                .expect("live session lock poisoned")
                .insert(entry.id.clone(), entry.clone());
            entries.push(entry);
        }
        Ok(entries)
    }
}
