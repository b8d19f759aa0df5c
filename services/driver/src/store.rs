//! The driver's record of every task and its event log.
//!
//! Tasks live in the store ([`Db`]); memory holds only the tasks that have not ended (and their
//! recent events), so memory stays flat however many finished tasks are kept. A finished task
//! is read back from the store when asked for.

use claudecluster_telemetry::propagation::TraceParent;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::{Event, StatusChange, Task, TaskSpec, TaskStatus};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::db::{Db, LoadedRow, Row, SubjectKind};
use crate::error::DriverError;
use crate::journal::{Journal, Reader, Record};
use crate::writer::Writer;

/// How long a submit waits for its task to be durable before answering UNAVAILABLE.
pub const DURABLE_PATIENCE: Duration = Duration::from_secs(10);

/// What the driver keeps about a task or session besides its public record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Bookkeeping {
    /// Where the worker running it is reached.
    #[prost(string, tag = "1")]
    pub worker_address: String,
    /// The last run sequence received from that worker: where to attach again.
    #[prost(uint64, tag = "2")]
    pub run_sequence: u64,
    /// Waiting for the tasks it depends on; not handed to the scheduler yet.
    #[prost(bool, tag = "3")]
    pub blocked: bool,
    #[prost(string, optional, tag = "4")]
    pub cancel_reason: Option<String>,
    /// A session's messages waiting their turn.
    #[prost(message, repeated, tag = "5")]
    pub queue: Vec<QueuedMessage>,
    #[prost(uint32, tag = "6")]
    pub next_turn: u32,
    /// A session's message sent to the worker and not yet answered.
    #[prost(uint32, optional, tag = "7")]
    pub in_flight: Option<u32>,
    /// Its text, to send again after a restart.
    #[prost(string, tag = "8")]
    pub in_flight_text: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct QueuedMessage {
    #[prost(uint32, tag = "1")]
    pub turn: u32,
    #[prost(string, tag = "2")]
    pub text: String,
}

/// A task's record as its log builds it.
pub struct TaskRecord {
    task: Task,
    book: Bookkeeping,
}

pub fn new_task_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn millis(time: &claudecluster_proto::Timestamp) -> i64 {
    time.seconds * 1000 + i64::from(time.nanos) / 1_000_000
}

impl Record for TaskRecord {
    fn apply(&mut self, event: &Event) -> bool {
        let task = &mut self.task;
        if task.status().is_terminal() {
            return false;
        }
        // Fencing: what an earlier attempt still says arrives too late to count.
        if event.attempt < task.attempt {
            return false;
        }
        match &event.kind {
            Some(Kind::StatusChange(change)) => {
                let status = change.status();
                if status == task.status() {
                    return false;
                }
                let now = Some(SystemTime::now().into());
                task.set_status(status);
                task.status_reason = change.reason.clone();
                if change.metered_usage.is_some() {
                    task.metered_usage = change.metered_usage;
                    task.metered_cost_usd = change.metered_cost_usd;
                }
                if change.changes.is_some() {
                    task.changes = change.changes.clone();
                }
                if change.branch.is_some() {
                    task.branch = change.branch.clone();
                }
                if !change.worker_id.is_empty() {
                    task.worker_id = change.worker_id.clone();
                }
                if !change.workspace.is_empty() {
                    task.workspace = change.workspace.clone();
                }
                if !change.runner.is_empty() {
                    task.runner = change.runner.clone();
                }
                if status == TaskStatus::Running && task.start_time.is_none() {
                    task.start_time = now;
                } else if status.is_terminal() {
                    task.end_time = now;
                }
            }
            Some(Kind::Result(result)) => task.result = Some(result.clone()),
            Some(Kind::ToolUse(tool)) => task.last_tool = tool.name.clone(),
            Some(Kind::Init(init)) if !init.model.is_empty() => task.model = init.model.clone(),
            _ => {}
        }
        task.attempt = task.attempt.max(event.attempt);
        true
    }

    fn ended(&self) -> bool {
        self.task.status().is_terminal()
    }

    fn stamp(&mut self, event: &mut Event) {
        event.task_id = self.task.task_id.clone();
        self.task.last_sequence = event.sequence;
    }

    fn row(&self, last_sequence: u64) -> Row {
        let key = key_of(&self.task);
        Row {
            kind: SubjectKind::Task,
            status: self.task.status,
            ended: self.ended(),
            idempotency_key: key,
            record: self.task.encode_to_vec(),
            bookkeeping: self.book.encode_to_vec(),
            last_sequence,
            end_time_ms: self.task.end_time.as_ref().map(millis),
        }
    }
}

/// One task: its journal, and the signal that asks it to stop.
pub struct TaskEntry {
    pub id: String,
    journal: Arc<Journal<TaskRecord>>,
    cancel: CancellationToken,
    /// The trace of the request that submitted the task, which its placement and run join.
    pub trace: std::sync::Mutex<TraceParent>,
}

/// What a cancel request found.
pub enum CancelAction {
    /// The task had already ended.
    AlreadyEnded,
    /// The task was waiting; it is now CANCELLED.
    Dequeue,
    /// The task is on a worker; its dispatcher has been told to stop it.
    StopOnWorker,
}

/// What clients see of an environment variable's value: they may hold tokens.
pub const HIDDEN_VALUE: &str = "(hidden)";

/// A task as clients get it: the values of its agent environment hidden, and its repository
/// without the credentials its URL may carry.
pub fn redacted(mut task: Task) -> Task {
    if let Some(spec) = task.spec.as_mut() {
        for value in spec.environment.values_mut() {
            *value = HIDDEN_VALUE.to_owned();
        }
        spec.repo_url = claudecluster_proto::without_credentials(&spec.repo_url);
    }
    task
}

impl TaskEntry {
    pub fn snapshot(&self) -> Task {
        self.journal.read(|record| record.task.clone())
    }

    /// The record as clients get it.
    pub fn public(&self) -> Task {
        redacted(self.snapshot())
    }

    pub fn status(&self) -> TaskStatus {
        self.journal.read(|record| record.task.status())
    }

    /// The id of the key that submitted the task.
    pub fn owner(&self) -> String {
        self.journal.read(|record| record.task.owner.clone())
    }

    pub fn attempt(&self) -> u32 {
        self.journal.read(|record| record.task.attempt)
    }

    pub fn spec(&self) -> TaskSpec {
        self.journal
            .read(|record| record.task.spec.clone().unwrap_or_default())
    }

    /// Where the task runs and the last run sequence received from there.
    pub fn placement(&self) -> (String, String, u64) {
        self.journal.read(|record| {
            (
                record.task.worker_id.clone(),
                record.book.worker_address.clone(),
                record.book.run_sequence,
            )
        })
    }

    /// Appends an event, applying it to the task record. Nothing is appended once the task has
    /// ended, and a status change that does not change the status is dropped.
    pub fn append(&self, attempt: u32, kind: Kind) -> Option<u64> {
        self.journal.append(Event {
            attempt,
            kind: Some(kind),
            ..Event::default()
        })
    }

    /// Appends an event a worker sent, remembering its run sequence for attaching again.
    pub fn append_from_worker(&self, attempt: u32, kind: Kind, run_sequence: u64) -> Option<u64> {
        self.journal.append_with(
            Event {
                attempt,
                kind: Some(kind),
                ..Event::default()
            },
            |record| record.book.run_sequence = record.book.run_sequence.max(run_sequence),
        )
    }

    pub fn set_status(
        &self,
        attempt: u32,
        status: TaskStatus,
        reason: impl Into<String>,
        worker_id: &str,
    ) -> bool {
        self.append(
            attempt,
            Kind::StatusChange(StatusChange {
                status: status as i32,
                reason: reason.into(),
                worker_id: worker_id.to_owned(),
                ..StatusChange::default()
            }),
        )
        .is_some()
    }

    /// Updates why a pending task waits, without an event: it is a description, not a change.
    pub fn set_waiting_reason(&self, reason: String) {
        // Not a commit of its own: a task that waits is enqueued again when a driver takes up
        // the stored work, and the scheduler tells the reason again. Most tasks are placed at
        // once and get no reason.
        if !reason.is_empty() {
            self.journal.note(|record| {
                if record.task.status() == TaskStatus::Pending {
                    record.task.status_reason = reason;
                }
            })
        }
    }

    /// Moves a PENDING task of `attempt` to ASSIGNED on `worker_id` at `address`; false if it
    /// is not pending (or the placement is for an attempt it no longer has).
    pub fn assign(&self, attempt: u32, worker_id: &str, address: &str) -> bool {
        if self.status() != TaskStatus::Pending || attempt < self.attempt() {
            return false;
        }
        self.journal
            .append_with(
                Event {
                    attempt,
                    kind: Some(Kind::StatusChange(StatusChange {
                        status: TaskStatus::Assigned as i32,
                        reason: format!("placed on worker {worker_id}"),
                        worker_id: worker_id.to_owned(),
                        ..StatusChange::default()
                    })),
                    ..Event::default()
                },
                |record| {
                    record.book.worker_address = address.to_owned();
                    record.book.run_sequence = 0;
                },
            )
            .is_some()
    }

    /// Puts an ASSIGNED task back in the queue for another attempt.
    pub fn requeue(&self, attempt: u32, reason: String) -> bool {
        self.set_status(attempt, TaskStatus::Pending, reason, "")
    }

    pub fn cancel(&self, reason: &str) -> CancelAction {
        let (action, attempt) = self.journal.update(|record| {
            let action = match record.task.status() {
                status if status.is_terminal() => CancelAction::AlreadyEnded,
                TaskStatus::Pending | TaskStatus::Unspecified => CancelAction::Dequeue,
                _ => {
                    record
                        .book
                        .cancel_reason
                        .get_or_insert_with(|| reason.to_owned());
                    CancelAction::StopOnWorker
                }
            };
            (action, record.task.attempt)
        });
        match action {
            CancelAction::Dequeue => {
                self.set_status(attempt, TaskStatus::Cancelled, reason, "");
            }
            CancelAction::StopOnWorker => self.cancel.cancel(),
            CancelAction::AlreadyEnded => {}
        }
        action
    }

    pub fn cancel_requested(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn cancel_reason(&self) -> String {
        self.journal.read(|record| {
            record
                .book
                .cancel_reason
                .clone()
                .unwrap_or_else(|| "cancelled".to_owned())
        })
    }

    /// Sends the events after `after` to `out`, then follows the log until the task has ended
    /// and every event was sent, or `out` closes.
    pub async fn follow(
        self: Arc<Self>,
        reader: Reader,
        after: u64,
        out: mpsc::Sender<Result<Event, Status>>,
    ) {
        self.journal.clone().follow(reader, after, out).await
    }

    pub fn is_blocked(&self) -> bool {
        self.journal.read(|record| record.book.blocked)
    }

    /// The tasks it depended on have all completed: it can be placed.
    pub fn unblock(&self) {
        self.journal.update(|record| record.book.blocked = false)
    }

    /// Waits until the task has ended.
    pub async fn ended(&self) {
        self.journal.wait_for(|record| record.ended()).await
    }

    /// Waits until everything the task's record holds now is stored.
    pub async fn durable(&self) -> Result<(), DriverError> {
        if self.journal.wait_stored(DURABLE_PATIENCE).await {
            Ok(())
        } else {
            Err(DriverError::NotDurable(format!(
                "task {} is not yet stored: {}",
                self.id,
                self.journal
                    .store_failure()
                    .unwrap_or_else(|| "the store is slow".to_owned())
            )))
        }
    }
}

/// Tasks and sessions that have not ended, by id: what memory holds.
#[derive(Default)]
pub struct Live {
    pub tasks: RwLock<HashMap<String, Arc<TaskEntry>>>,
    pub sessions: RwLock<HashMap<String, Arc<crate::sessions::SessionEntry>>>,
}

impl Live {
    /// A record ended and is durable: it leaves memory.
    pub fn settle(&self, id: &str) {
        self.tasks
            .write()
            .expect("live task lock poisoned")
            .remove(id);
        self.sessions
            .write()
            .expect("live session lock poisoned")
            .remove(id);
    }
}

/// Every task the driver knows: the live ones in memory, all of them in the store.
pub struct TaskStore {
    db: Arc<Db>,
    writer: Writer,
    live: Arc<Live>,
    /// Held while a task with an idempotency key is submitted, so two submits with one key
    /// make one task.
    keyed_submits: tokio::sync::Mutex<()>,
}

impl TaskStore {
    pub fn new(db: Arc<Db>, writer: Writer, live: Arc<Live>) -> Self {
        TaskStore {
            db,
            writer,
            live,
            keyed_submits: tokio::sync::Mutex::new(()),
        }
    }

    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    /// Records a new PENDING task, or returns the task already submitted with the same
    /// idempotency key (and `false`). The task is durable when this returns.
    pub async fn insert(
        &self,
        spec: TaskSpec,
        owner: &str,
    ) -> Result<(Arc<TaskEntry>, bool), DriverError> {
        let _serialised = if spec.idempotency_key.is_empty() {
            None
        } else {
            let guard = self.keyed_submits.lock().await;
            let key = owned_key(owner, &spec.idempotency_key);
            if let Some(existing) = self.find_by_key(&key).await? {
                return Ok((existing, false));
            }
            Some(guard)
        };
        self.refuse_while_failing()?;
        let entry = self.record(new_task_id(), spec, owner);
        if let Err(err) = entry.durable().await {
            self.give_up(&entry);
            return Err(err);
        }
        Ok((entry, true))
    }

    /// Refuses new work at once while the store cannot be written: it could not be kept.
    fn refuse_while_failing(&self) -> Result<(), DriverError> {
        match self.writer.failure() {
            Some(reason) => Err(DriverError::NotDurable(reason)),
            None => Ok(()),
        }
    }

    /// Forgets a task whose submission was refused because it could not be stored: the client
    /// was told it does not exist, so it never will.
    fn give_up(&self, entry: &TaskEntry) {
        if entry.journal.abandon() {
            self.live
                .tasks
                .write()
                .expect("live task lock poisoned")
                .remove(&entry.id);
        }
    }

    async fn find_by_key(&self, key: &str) -> Result<Option<Arc<TaskEntry>>, DriverError> {
        let live = self
            .live
            .tasks
            .read()
            .expect("live task lock poisoned")
            .values()
            .find(|entry| {
                entry
                    .journal
                    .read(|r| key_of(&r.task).as_deref() == Some(key))
            })
            .cloned();
        if live.is_some() {
            return Ok(live);
        }
        match self.db.by_idempotency_key(key).await? {
            Some(id) => self.get(&id).await,
            None => Ok(None),
        }
    }

    /// Records tasks whose ids were chosen beforehand (a batch naming each other); durable when
    /// this returns.
    pub async fn insert_all(
        &self,
        tasks: Vec<(String, TaskSpec)>,
        owner: &str,
    ) -> Result<Vec<Arc<TaskEntry>>, DriverError> {
        self.refuse_while_failing()?;
        let entries: Vec<_> = tasks
            .into_iter()
            .map(|(id, spec)| self.record(id, spec, owner))
            .collect();
        for entry in &entries {
            if let Err(err) = entry.durable().await {
                for entry in &entries {
                    self.give_up(entry);
                }
                return Err(err);
            }
        }
        Ok(entries)
    }

    /// Live tasks of `owner` that have not ended: what its `runningTasks` quota counts.
    /// Tasks not yet ended, by status label and requested mode.
    pub fn live_counts(&self) -> HashMap<(String, String), u64> {
        let mut counts = HashMap::new();
        for entry in self
            .live
            .tasks
            .read()
            .expect("live task lock poisoned")
            .values()
        {
            let (status, mode) = entry.journal.read(|r| {
                (
                    r.task.status(),
                    r.task.spec.as_ref().map_or(0, |spec| spec.execution_mode),
                )
            });
            if !status.is_terminal() {
                *counts
                    .entry((status.label().to_owned(), crate::metrics::mode_label(mode)))
                    .or_default() += 1;
            }
        }
        counts
    }

    /// Tasks of `owner` not yet ended, to stop when its budget is spent.
    pub fn live_owned_by(&self, owner: Option<&str>) -> Vec<Arc<TaskEntry>> {
        self.live
            .tasks
            .read()
            .expect("live task lock poisoned")
            .values()
            .filter(|entry| {
                entry.journal.read(|r| {
                    owner.is_none_or(|owner| r.task.owner == owner)
                        && !r.task.status().is_terminal()
                })
            })
            .cloned()
            .collect()
    }

    pub fn running_owned_by(&self, owner: &str) -> usize {
        self.live
            .tasks
            .read()
            .expect("live task lock poisoned")
            .values()
            .filter(|entry| {
                entry
                    .journal
                    .read(|r| r.task.owner == owner && !r.task.status().is_terminal())
            })
            .count()
    }

    fn record(&self, id: String, spec: TaskSpec, owner: &str) -> Arc<TaskEntry> {
        let task = Task {
            task_id: id.clone(),
            owner: owner.to_owned(),
            spec: Some(spec.clone()),
            status: TaskStatus::Unspecified as i32,
            attempt: 1,
            create_time: Some(SystemTime::now().into()),
            ..Task::default()
        };
        let book = Bookkeeping {
            blocked: !spec.depends_on.is_empty(),
            ..Bookkeeping::default()
        };
        let entry = self.entry(id.clone(), TaskRecord { task, book }, 0);
        let reason = if spec.depends_on.is_empty() {
            "queued".to_owned()
        } else {
            format!("waiting for tasks {}", spec.depends_on.join(", "))
        };
        self.live
            .tasks
            .write()
            .expect("live task lock poisoned")
            .insert(id, entry.clone());
        entry.set_status(1, TaskStatus::Pending, reason, "");
        entry
    }

    fn entry(&self, id: String, record: TaskRecord, last_sequence: u64) -> Arc<TaskEntry> {
        Arc::new(TaskEntry {
            journal: Journal::new(id.clone(), record, last_sequence, self.writer.clone()),
            id,
            cancel: CancellationToken::new(),
            trace: Default::default(),
        })
    }

    fn decode(&self, row: LoadedRow) -> Result<Arc<TaskEntry>, DriverError> {
        let task = Task::decode(row.record.as_slice())
            .map_err(|err| crate::db::DbError::Corrupt(format!("task {}: {err}", row.id)))?;
        let book = Bookkeeping::decode(row.bookkeeping.as_slice()).map_err(|err| {
            crate::db::DbError::Corrupt(format!("task {} bookkeeping: {err}", row.id))
        })?;
        Ok(self.entry(row.id, TaskRecord { task, book }, row.last_sequence))
    }

    /// The task, from memory when it is live, otherwise from the store.
    pub async fn get(&self, id: &str) -> Result<Option<Arc<TaskEntry>>, DriverError> {
        if let Some(entry) = self.live_entry(id) {
            return Ok(Some(entry));
        }
        match self.db.get(id).await? {
            Some(row) if row.kind == SubjectKind::Task => {
                // It may have become live meanwhile only if it is new, which a stored row is not.
                Ok(Some(self.decode(row)?))
            }
            _ => Ok(None),
        }
    }

    /// Removes an ended task, its record and its events, once what it wrote is durable.
    /// False when it was gone already.
    pub async fn delete(&self, entry: &TaskEntry) -> Result<bool, DriverError> {
        entry.durable().await?;
        self.live.settle(&entry.id);
        Ok(self.db.delete_subject(&entry.id).await?)
    }

    pub fn live_entry(&self, id: &str) -> Option<Arc<TaskEntry>> {
        self.live
            .tasks
            .read()
            .expect("live task lock poisoned")
            .get(id)
            .cloned()
    }

    /// Tasks after position `after` in submission order with one of `statuses`, matching
    /// `filter`, at most `limit`; and the position where the next page starts.
    pub async fn page(
        &self,
        after: i64,
        limit: usize,
        statuses: &[i32],
        filter: impl Fn(&Task) -> bool,
    ) -> Result<(Vec<Task>, Option<i64>), DriverError> {
        let mut page = Vec::new();
        let mut budget = crate::listing::PageBudget::default();
        let mut cursor = after;
        loop {
            let rows = self
                .db
                .page(SubjectKind::Task, cursor, limit.max(16), statuses)
                .await?;
            let exhausted = rows.len() < limit.max(16);
            for row in rows {
                let order = row.order;
                let before = cursor;
                let task = match self.live_entry(&row.id) {
                    Some(entry) => entry.snapshot(),
                    None => Task::decode(row.record.as_slice()).map_err(|err| {
                        crate::db::DbError::Corrupt(format!("task {}: {err}", row.id))
                    })?,
                };
                cursor = order;
                let status_matches = statuses.is_empty() || statuses.contains(&task.status);
                if !status_matches || !filter(&task) {
                    continue;
                }
                let task = crate::listing::listed_task(redacted(task));
                if !budget.admit(&task) {
                    // Full: the next page starts with this task.
                    return Ok((page, Some(before)));
                }
                page.push(task);
                if page.len() == limit {
                    return Ok((page, Some(order)));
                }
            }
            if exhausted {
                return Ok((page, None));
            }
        }
    }

    /// Live tasks waiting for the scheduler, in submission order (the order the scheduler
    /// queues them in, within a priority).
    pub fn pending(&self) -> Vec<Arc<TaskEntry>> {
        let mut pending: Vec<(i64, Arc<TaskEntry>)> = self
            .live
            .tasks
            .read()
            .expect("live task lock poisoned")
            .values()
            .filter(|entry| entry.status() == TaskStatus::Pending && !entry.is_blocked())
            .map(|entry| {
                let created = entry.journal.read(|record| {
                    record.task.create_time.as_ref().map_or(0, |time| {
                        time.seconds * 1_000_000_000 + i64::from(time.nanos)
                    })
                });
                (created, entry.clone())
            })
            .collect();
        pending.sort_by_key(|(created, _)| *created);
        pending.into_iter().map(|(_, entry)| entry).collect()
    }

    pub async fn count_by_status(&self) -> Result<HashMap<String, u64>, DriverError> {
        let mut counts = HashMap::new();
        for (status, count) in self.db.count_by_status(SubjectKind::Task).await? {
            let label = TaskStatus::try_from(status)
                .unwrap_or(TaskStatus::Unspecified)
                .label();
            *counts.entry(label.to_owned()).or_default() += count;
        }
        Ok(counts)
    }

    /// Loads every task that had not ended when the driver stopped, into memory.
    pub async fn recover(&self) -> Result<Vec<Arc<TaskEntry>>, DriverError> {
        let rows = self.db.live(SubjectKind::Task).await?;
        let mut entries = Vec::with_capacity(rows.len());
        let mut live = self.live.tasks.write().expect("live task lock poisoned");
        for row in rows {
            let entry = self.decode(row)?;
            live.insert(entry.id.clone(), entry.clone());
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// The idempotency key of `task` as stored: in its owner's namespace, so that one key's
/// submissions never find another's.
fn key_of(task: &Task) -> Option<String> {
    task.spec
        .as_ref()
        .map(|spec| spec.idempotency_key.as_str())
        .filter(|key| !key.is_empty())
        .map(|key| owned_key(&task.owner, key))
}

fn owned_key(owner: &str, key: &str) -> String {
    if owner.is_empty() {
        key.to_owned()
    } else {
        // A unit separator: no valid idempotency key holds a control character.
        format!("{owner}\u{1f}{key}")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A store at `url`, with its writer running.
    pub(crate) async fn store_at(url: &str) -> (TaskStore, Arc<Live>, CancellationToken) {
        let db = Arc::new(Db::open(url, 4).await.unwrap());
        let live = Arc::new(Live::default());
        let stop = CancellationToken::new();
        let settle = live.clone();
        let (writer, _task) = crate::writer::start(
            db.clone(),
            Box::new(move |id| settle.settle(id)),
            stop.clone(),
        );
        (TaskStore::new(db, writer, live.clone()), live, stop)
    }

    fn reader(store: &TaskStore) -> Reader {
        Reader {
            db: store.db().clone(),
            stop: CancellationToken::new(),
        }
    }

    fn spec(prompt: &str) -> TaskSpec {
        TaskSpec {
            prompt: prompt.into(),
            ..TaskSpec::default()
        }
    }

    fn text(t: &str) -> Kind {
        Kind::Text(claudecluster_proto::v1::AgentText {
            text: t.into(),
            ..Default::default()
        })
    }

    async fn drain(store: &TaskStore, entry: Arc<TaskEntry>, after: u64) -> Vec<u64> {
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(entry.follow(reader(store), after, tx));
        let mut seen = Vec::new();
        while let Some(event) = rx.recv().await {
            seen.push(event.unwrap().sequence);
        }
        seen
    }

    #[tokio::test]
    async fn followers_get_every_event_once_in_order_and_stop_after_the_end() {
        let dir = tempfile::tempdir().unwrap();
        for url in crate::test_support::store_urls(dir.path()).await {
            let (store, _, _stop) = store_at(&url).await;
            let (entry, _) = store.insert(spec("hi"), "").await.unwrap();
            let early = {
                let (tx, mut rx) = mpsc::channel(4);
                tokio::spawn(entry.clone().follow(reader(&store), 0, tx));
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while let Some(event) = rx.recv().await {
                        seen.push(event.unwrap().sequence);
                    }
                    seen
                })
            };
            assert!(entry.assign(1, "w1", "127.0.0.1:1"));
            assert!(entry.set_status(1, TaskStatus::Running, "", "w1"));
            for i in 0..2000 {
                entry.append(1, text(&i.to_string()));
            }
            assert!(entry.set_status(1, TaskStatus::Completed, "", "w1"));
            assert!(entry.append(1, text("after the end")).is_none());
            let all: Vec<u64> = (1..=2004).collect();
            assert_eq!(early.await.unwrap(), all);
            entry.durable().await.unwrap();
            // Most of the log has left memory by now: replays read it back from the store.
            assert_eq!(
                drain(&store, entry.clone(), 50).await,
                (51..=2004).collect::<Vec<_>>()
            );
            assert_eq!(drain(&store, entry, 2004).await, Vec::<u64>::new());
        }
    }

    #[tokio::test]
    async fn a_reopened_store_has_every_task_and_event() {
        let dir = tempfile::tempdir().unwrap();
        for url in crate::test_support::store_urls(dir.path()).await {
            let (id, running_id) = {
                let (store, _, stop) = store_at(&url).await;
                let (done, _) = store.insert(spec("done"), "").await.unwrap();
                done.assign(1, "w1", "127.0.0.1:1");
                done.set_status(1, TaskStatus::Running, "", "w1");
                done.append(1, text("hello"));
                done.set_status(1, TaskStatus::Completed, "", "w1");
                done.durable().await.unwrap();
                let (running, _) = store.insert(spec("running"), "").await.unwrap();
                running.assign(1, "w2", "127.0.0.1:2");
                running.append_from_worker(1, text("partial"), 7);
                running.durable().await.unwrap();
                stop.cancel();
                (done.id.clone(), running.id.clone())
            };
            let (store, live, _stop) = store_at(&url).await;
            let recovered = store.recover().await.unwrap();
            assert_eq!(
                recovered.len(),
                1,
                "only the unfinished task comes back to memory"
            );
            let running = &recovered[0];
            assert_eq!(running.id, running_id);
            assert_eq!(running.status(), TaskStatus::Assigned);
            assert_eq!(
                running.placement(),
                ("w2".into(), "127.0.0.1:2".into(), 7),
                "where to attach again survives"
            );
            assert!(live.tasks.read().unwrap().get(&id).is_none());
            let done = store.get(&id).await.unwrap().expect("stored");
            assert_eq!(done.status(), TaskStatus::Completed);
            assert_eq!(drain(&store, done, 0).await, vec![1, 2, 3, 4, 5]);
            let counts = store.count_by_status().await.unwrap();
            assert_eq!(counts.get("completed"), Some(&1));
            assert_eq!(counts.get("assigned"), Some(&1));
        }
    }

    /// A waiting reason is shown at once but costs no commit of its own; it is stored with the
    /// task's next change.
    #[tokio::test]
    async fn a_waiting_reason_is_shown_and_stored_with_the_next_change() {
        use crate::journal::Persist as _;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("driver.db").display());
        let (store, _, _stop) = store_at(&url).await;
        let (entry, _) = store.insert(spec("hi"), "").await.unwrap();
        let changes = || entry.journal.unwritten().unwrap().changes;
        let before = changes();
        let accepted = entry.snapshot().status_reason;
        entry.set_waiting_reason(String::new());
        assert_eq!(
            entry.snapshot().status_reason,
            accepted,
            "no reason: unchanged"
        );
        entry.set_waiting_reason("no worker runs process_pool".into());
        assert_eq!(changes(), before, "no write of its own");
        assert_eq!(
            entry.snapshot().status_reason,
            "no worker runs process_pool"
        );
        let stored = |id: String| {
            let db = store.db.clone();
            async move {
                let row = db.get(&id).await.unwrap().unwrap();
                Task::decode(row.record.as_slice()).unwrap()
            }
        };
        assert_eq!(stored(entry.id.clone()).await.status_reason, accepted);
        // Any later change of the task, say its next event.
        entry.journal.update(|_| ());
        assert!(entry.journal.wait_stored(Duration::from_secs(5)).await);
        assert_eq!(
            stored(entry.id.clone()).await.status_reason,
            "no worker runs process_pool",
            "stored with the next change"
        );
    }

    #[tokio::test]
    async fn a_pending_task_cancels_at_once_and_ended_tasks_stay_ended() {
        let dir = tempfile::tempdir().unwrap();
        for url in crate::test_support::store_urls(dir.path()).await {
            let (store, _, _stop) = store_at(&url).await;
            let (entry, _) = store.insert(spec("hi"), "").await.unwrap();
            assert!(matches!(
                entry.cancel("no longer needed"),
                CancelAction::Dequeue
            ));
            let task = entry.snapshot();
            assert_eq!(task.status(), TaskStatus::Cancelled);
            assert_eq!(task.status_reason, "no longer needed");
            assert!(task.end_time.is_some());
            assert!(matches!(entry.cancel("again"), CancelAction::AlreadyEnded));
            assert!(
                !entry.assign(1, "w1", "a:1"),
                "a cancelled task is never placed"
            );
        }
    }

    #[tokio::test]
    async fn a_deleted_task_leaves_no_record_and_no_events() {
        let dir = tempfile::tempdir().unwrap();
        for url in crate::test_support::store_urls(dir.path()).await {
            let (store, _, _stop) = store_at(&url).await;
            let (kept, _) = store.insert(spec("kept"), "").await.unwrap();
            let (entry, _) = store.insert(spec("hi"), "").await.unwrap();
            entry.cancel("done");
            entry.durable().await.unwrap();
            let stored = |id: String| {
                let db = store.db().clone();
                async move { db.events(&id, 0, i64::MAX as u64, 100).await.unwrap().0 }
            };
            assert!(!stored(entry.id.clone()).await.is_empty(), "{url}");
            assert!(store.delete(&entry).await.unwrap());
            assert!(store.get(&entry.id).await.unwrap().is_none(), "{url}");
            assert!(stored(entry.id.clone()).await.is_empty(), "{url}");
            assert!(!store.delete(&entry).await.unwrap(), "deleted once");
            assert!(store.get(&kept.id).await.unwrap().is_some());
        }
    }

    #[tokio::test]
    async fn events_of_an_earlier_attempt_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        for url in crate::test_support::store_urls(dir.path()).await {
            let (store, _, _stop) = store_at(&url).await;
            let (entry, _) = store.insert(spec("hi"), "").await.unwrap();
            entry.assign(1, "w1", "a:1");
            entry.requeue(2, "lost worker w1".into());
            assert!(entry.append(1, text("stale")).is_none());
            assert!(entry.append(2, text("fresh")).is_some());
        }
    }

    #[tokio::test]
    async fn idempotency_keys_return_the_existing_task_even_after_it_left_memory() {
        let dir = tempfile::tempdir().unwrap();
        for url in crate::test_support::store_urls(dir.path()).await {
            let (store, live, _stop) = store_at(&url).await;
            let keyed = TaskSpec {
                idempotency_key: "k1".into(),
                ..spec("hi")
            };
            let (first, created) = store.insert(keyed.clone(), "").await.unwrap();
            assert!(created);
            let (second, created) = store.insert(keyed.clone(), "").await.unwrap();
            assert!(!created);
            assert_eq!(first.id, second.id);
            first.cancel("done with it");
            first.durable().await.unwrap();
            crate::test_support::wait(|| live.tasks.read().unwrap().is_empty()).await;
            let (third, created) = store.insert(keyed, "").await.unwrap();
            assert!(!created);
            assert_eq!(third.id, first.id);
        }
    }

    #[tokio::test]
    async fn pages_follow_submission_order_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        for url in crate::test_support::store_urls(dir.path()).await {
            let (store, _, _stop) = store_at(&url).await;
            let mut entries = Vec::new();
            for i in 0..5 {
                entries.push(store.insert(spec(&i.to_string()), "").await.unwrap().0);
            }
            entries[1].cancel("x");
            entries[3].cancel("x");
            for entry in &entries {
                entry.durable().await.unwrap();
            }
            let pending = [TaskStatus::Pending as i32];
            let (page, next) = store.page(0, 2, &pending, |_| true).await.unwrap();
            let ids: Vec<_> = page.iter().map(|t| t.task_id.clone()).collect();
            assert_eq!(ids, vec![entries[0].id.clone(), entries[2].id.clone()]);
            let (rest, after) = store
                .page(next.unwrap(), 2, &pending, |_| true)
                .await
                .unwrap();
            assert_eq!(rest.len(), 1);
            assert_eq!(rest[0].task_id, entries[4].id);
            assert_eq!(after, None);
        }
    }

    #[tokio::test]
    async fn damaged_stored_events_and_records_are_reported_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        for url in crate::test_support::store_urls(dir.path()).await {
            let (store, live, _stop) = store_at(&url).await;
            // One commit per event: each is a chunk of its own in the store.
            let (entry, _) = store.insert(spec("hi"), "").await.unwrap();
            entry.assign(1, "w1", "a:1");
            entry.durable().await.unwrap();
            entry.append(1, text("one"));
            entry.durable().await.unwrap();
            entry.set_status(1, TaskStatus::Completed, "", "w1");
            entry.durable().await.unwrap();
            crate::test_support::wait(|| live.tasks.read().unwrap().is_empty()).await;
            store.db().damage_event(&entry.id, 3).await;
            let stored = store.get(&entry.id).await.unwrap().unwrap();
            assert_eq!(
                drain(&store, stored, 0).await,
                vec![1, 2, 4],
                "the damaged event is skipped, the rest streams"
            );
            store.db().damage_record(&entry.id).await;
            let err = match store.get(&entry.id).await {
                Err(err) => err,
                Ok(_) => panic!("a damaged record cannot be read"),
            };
            let status: tonic::Status = err.into();
            assert_eq!(status.code(), tonic::Code::DataLoss);
            assert!(status.message().contains(&entry.id), "{}", status.message());
        }
    }

    #[tokio::test]
    async fn compaction_keeps_a_finished_logs_status_changes_and_result_only() {
        let dir = tempfile::tempdir().unwrap();
        for url in crate::test_support::store_urls(dir.path()).await {
            let (store, live, _stop) = store_at(&url).await;
            let (old, _) = store.insert(spec("old"), "").await.unwrap();
            old.assign(1, "w1", "a:1");
            for i in 0..3000 {
                old.append(1, text(&i.to_string()));
            }
            old.append(
                1,
                Kind::Result(claudecluster_proto::v1::AgentResult {
                    text: "done".into(),
                    ..Default::default()
                }),
            );
            old.set_status(1, TaskStatus::Completed, "", "w1");
            old.durable().await.unwrap();
            let (newer, _) = store.insert(spec("newer"), "").await.unwrap();
            newer.append(1, text("kept whole"));
            newer.cancel("not needed");
            newer.durable().await.unwrap();
            crate::test_support::wait(|| live.tasks.read().unwrap().is_empty()).await;

            // Keep the newest finished task's whole log; compact the rest.
            let compacted = store
                .db()
                .compact(0, 1, crate::journal::kept_by_compaction)
                .await
                .unwrap();
            assert_eq!(compacted, 1);
            let stored = store.get(&old.id).await.unwrap().unwrap();
            assert_eq!(stored.status(), TaskStatus::Completed);
            assert_eq!(
                drain(&store, stored, 0).await,
                vec![1, 2, 3003, 3004],
                "PENDING, ASSIGNED, the result and COMPLETED"
            );
            let whole = store.get(&newer.id).await.unwrap().unwrap();
            assert_eq!(drain(&store, whole, 0).await, vec![1, 2, 3]);
            assert_eq!(
                store
                    .db()
                    .compact(0, 1, crate::journal::kept_by_compaction)
                    .await
                    .unwrap(),
                0,
                "a compacted log is not compacted again"
            );
        }
    }
}
