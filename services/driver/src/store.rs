//! The driver's record of every task and its event log.
//!
//! Each task's log is append-only with sequence numbers from 1 and no gaps. Readers follow it
//! through a watch channel on the last sequence number, so a reader never misses an event and
//! never sees one twice, however slow it is.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::{Event, StatusChange, Task, TaskSpec, TaskStatus};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// One task: its record, its log, and the signal that asks it to stop.
pub struct TaskEntry {
    pub id: String,
    order: u64,
    state: Mutex<TaskState>,
    last_sequence: watch::Sender<u64>,
    cancel: CancellationToken,
}

struct TaskState {
    task: Task,
    events: Vec<Event>,
    cancel_reason: Option<String>,
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

impl TaskEntry {
    fn state(&self) -> std::sync::MutexGuard<'_, TaskState> {
        self.state.lock().expect("task lock poisoned")
    }

    pub fn snapshot(&self) -> Task {
        self.state().task.clone()
    }

    pub fn status(&self) -> TaskStatus {
        self.state().task.status()
    }

    pub fn spec(&self) -> TaskSpec {
        self.state().task.spec.clone().unwrap_or_default()
    }

    /// Appends an event, applying it to the task record. Nothing is appended once the task has
    /// ended, and a status change that does not change the status is dropped.
    pub fn append(&self, attempt: u32, kind: Kind) -> Option<u64> {
        let mut state = self.state();
        let task = &mut state.task;
        if task.status().is_terminal() {
            return None;
        }
        match &kind {
            Kind::StatusChange(change) => {
                let status = change.status();
                if status == task.status() {
                    return None;
                }
                let now = Some(SystemTime::now().into());
                task.set_status(status);
                task.status_reason = change.reason.clone();
                if !change.worker_id.is_empty() {
                    task.worker_id = change.worker_id.clone();
                }
                if !change.workspace.is_empty() {
                    task.workspace = change.workspace.clone();
                }
                if status == TaskStatus::Running && task.start_time.is_none() {
                    task.start_time = now;
                } else if status.is_terminal() {
                    task.end_time = now;
                }
            }
            Kind::Result(result) => task.result = Some(result.clone()),
            _ => {}
        }
        task.attempt = task.attempt.max(attempt);
        task.last_sequence += 1;
        let sequence = task.last_sequence;
        state.events.push(Event {
            sequence,
            time: Some(SystemTime::now().into()),
            task_id: self.id.clone(),
            attempt,
            kind: Some(kind),
        });
        drop(state);
        self.last_sequence.send_replace(sequence);
        Some(sequence)
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
                workspace: String::new(),
            }),
        )
        .is_some()
    }

    /// Updates why a pending task waits, without an event: it is a description, not a change.
    pub fn set_waiting_reason(&self, reason: String) {
        let mut state = self.state();
        if state.task.status() == TaskStatus::Pending && !reason.is_empty() {
            state.task.status_reason = reason;
        }
    }

    /// Moves a PENDING task of `attempt` to ASSIGNED on `worker_id`; false if it is not pending.
    pub fn assign(&self, attempt: u32, worker_id: &str) -> bool {
        if self.status() != TaskStatus::Pending {
            return false;
        }
        self.set_status(
            attempt,
            TaskStatus::Assigned,
            format!("placed on worker {worker_id}"),
            worker_id,
        )
    }

    /// Puts an ASSIGNED task back in the queue for another attempt.
    pub fn requeue(&self, attempt: u32, reason: String) -> bool {
        self.set_status(attempt, TaskStatus::Pending, reason, "")
    }

    pub fn cancel(&self, reason: &str) -> CancelAction {
        let action = {
            let mut state = self.state();
            match state.task.status() {
                status if status.is_terminal() => return CancelAction::AlreadyEnded,
                TaskStatus::Pending | TaskStatus::Unspecified => CancelAction::Dequeue,
                _ => {
                    state.cancel_reason.get_or_insert_with(|| reason.to_owned());
                    CancelAction::StopOnWorker
                }
            }
        };
        match action {
            CancelAction::Dequeue => {
                let attempt = self.state().task.attempt;
                self.set_status(attempt, TaskStatus::Cancelled, reason, "");
            }
            _ => self.cancel.cancel(),
        }
        action
    }

    pub fn cancel_requested(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn cancel_reason(&self) -> String {
        self.state()
            .cancel_reason
            .clone()
            .unwrap_or_else(|| "cancelled".to_owned())
    }

    /// Events after `after`, and whether they reach the end of a finished log.
    fn events_after(&self, after: u64) -> (Vec<Event>, bool) {
        let state = self.state();
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(state.events.len());
        (
            state.events[start..].to_vec(),
            state.task.status().is_terminal(),
        )
    }

    /// Sends the events after `after` to `out`, then follows the log until the task has ended
    /// and every event was sent, or `out` closes.
    pub async fn follow(self: Arc<Self>, after: u64, out: mpsc::Sender<Event>) {
        let mut changes = self.last_sequence.subscribe();
        let mut cursor = after;
        loop {
            let (batch, ended) = self.events_after(cursor);
            for event in batch {
                cursor = event.sequence;
                if out.send(event).await.is_err() {
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

    /// Waits until the task has ended.
    pub async fn ended(&self) {
        let mut changes = self.last_sequence.subscribe();
        while !self.status().is_terminal() {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Every task the driver knows, in submission order.
#[derive(Default)]
pub struct TaskStore {
    inner: RwLock<StoreInner>,
}

#[derive(Default)]
struct StoreInner {
    by_id: HashMap<String, Arc<TaskEntry>>,
    by_order: BTreeMap<u64, Arc<TaskEntry>>,
    by_idempotency_key: HashMap<String, Arc<TaskEntry>>,
    next_order: u64,
}

impl TaskStore {
    /// Records a new PENDING task, or returns the task already submitted with the same
    /// idempotency key (and `false`).
    pub fn insert(&self, spec: TaskSpec) -> (Arc<TaskEntry>, bool) {
        let mut inner = self.inner.write().expect("task store lock poisoned");
        if let Some(existing) = inner.by_idempotency_key.get(&spec.idempotency_key)
            && !spec.idempotency_key.is_empty()
        {
            return (existing.clone(), false);
        }
        inner.next_order += 1;
        let id = uuid::Uuid::new_v4().to_string();
        let task = Task {
            task_id: id.clone(),
            spec: Some(spec.clone()),
            status: TaskStatus::Unspecified as i32,
            attempt: 1,
            create_time: Some(SystemTime::now().into()),
            ..Task::default()
        };
        let entry = Arc::new(TaskEntry {
            id: id.clone(),
            order: inner.next_order,
            state: Mutex::new(TaskState {
                task,
                events: Vec::new(),
                cancel_reason: None,
            }),
            last_sequence: watch::Sender::new(0),
            cancel: CancellationToken::new(),
        });
        entry.set_status(1, TaskStatus::Pending, "queued", "");
        inner.by_id.insert(id, entry.clone());
        inner.by_order.insert(entry.order, entry.clone());
        if !spec.idempotency_key.is_empty() {
            inner
                .by_idempotency_key
                .insert(spec.idempotency_key, entry.clone());
        }
        (entry, true)
    }

    pub fn get(&self, id: &str) -> Option<Arc<TaskEntry>> {
        self.inner
            .read()
            .expect("task store lock poisoned")
            .by_id
            .get(id)
            .cloned()
    }

    /// Tasks from `start` (an order number) on, matching `filter`, at most `limit`; and the
    /// order number where the next page starts.
    pub fn page(
        &self,
        start: u64,
        limit: usize,
        filter: impl Fn(TaskStatus) -> bool,
    ) -> (Vec<Task>, Option<u64>) {
        let inner = self.inner.read().expect("task store lock poisoned");
        let mut tasks = Vec::new();
        for (order, entry) in inner.by_order.range(start..) {
            let task = entry.snapshot();
            if !filter(task.status()) {
                continue;
            }
            if tasks.len() == limit {
                return (tasks, Some(*order));
            }
            tasks.push(task);
        }
        (tasks, None)
    }

    pub fn pending(&self) -> Vec<Arc<TaskEntry>> {
        let inner = self.inner.read().expect("task store lock poisoned");
        inner
            .by_order
            .values()
            .filter(|entry| entry.status() == TaskStatus::Pending)
            .cloned()
            .collect()
    }

    pub fn count_by_status(&self) -> HashMap<String, u64> {
        let inner = self.inner.read().expect("task store lock poisoned");
        let mut counts = HashMap::new();
        for entry in inner.by_order.values() {
            *counts.entry(entry.status().label().to_owned()).or_default() += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    async fn drain(entry: Arc<TaskEntry>, after: u64) -> Vec<u64> {
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(entry.follow(after, tx));
        let mut seen = Vec::new();
        while let Some(event) = rx.recv().await {
            seen.push(event.sequence);
        }
        seen
    }

    #[tokio::test]
    async fn followers_get_every_event_once_in_order_and_stop_after_the_end() {
        let store = TaskStore::default();
        let (entry, _) = store.insert(spec("hi"));
        let early = tokio::spawn(drain(entry.clone(), 0));
        assert!(entry.assign(1, "w1"));
        assert!(entry.set_status(1, TaskStatus::Running, "", "w1"));
        for i in 0..50 {
            entry.append(1, text(&i.to_string()));
        }
        assert!(entry.set_status(1, TaskStatus::Completed, "", "w1"));
        assert!(entry.append(1, text("after the end")).is_none());
        let all: Vec<u64> = (1..=54).collect();
        assert_eq!(early.await.unwrap(), all);
        assert_eq!(drain(entry.clone(), 50).await, vec![51, 52, 53, 54]);
        assert_eq!(drain(entry, 54).await, Vec::<u64>::new());
    }

    #[test]
    fn a_pending_task_cancels_at_once_and_ended_tasks_stay_ended() {
        let store = TaskStore::default();
        let (entry, _) = store.insert(spec("hi"));
        assert!(matches!(
            entry.cancel("no longer needed"),
            CancelAction::Dequeue
        ));
        let task = entry.snapshot();
        assert_eq!(task.status(), TaskStatus::Cancelled);
        assert_eq!(task.status_reason, "no longer needed");
        assert!(task.end_time.is_some());
        assert!(matches!(entry.cancel("again"), CancelAction::AlreadyEnded));
        assert!(!entry.assign(1, "w1"), "a cancelled task is never placed");
    }

    #[test]
    fn idempotency_keys_return_the_existing_task() {
        let store = TaskStore::default();
        let keyed = TaskSpec {
            idempotency_key: "k1".into(),
            ..spec("hi")
        };
        let (first, created) = store.insert(keyed.clone());
        assert!(created);
        let (second, created) = store.insert(keyed);
        assert!(!created);
        assert_eq!(first.id, second.id);
    }

    #[test]
    fn pages_follow_submission_order_and_filters() {
        let store = TaskStore::default();
        let entries: Vec<_> = (0..5)
            .map(|i| store.insert(spec(&i.to_string())).0)
            .collect();
        entries[1].cancel("x");
        entries[3].cancel("x");
        let (page, next) = store.page(0, 2, |s| s == TaskStatus::Pending);
        let ids: Vec<_> = page.iter().map(|t| t.task_id.clone()).collect();
        assert_eq!(ids, vec![entries[0].id.clone(), entries[2].id.clone()]);
        let (rest, after) = store.page(next.unwrap(), 2, |s| s == TaskStatus::Pending);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].task_id, entries[4].id);
        assert_eq!(after, None);
    }
}
