//! The driver's record of every task and its event log.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::{Event, StatusChange, Task, TaskSpec, TaskStatus};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::journal::{Journal, Record};

/// A task's record as its log builds it.
pub struct TaskRecord {
    task: Task,
    cancel_reason: Option<String>,
    /// Waiting for the tasks it depends on; not handed to the scheduler yet.
    blocked: bool,
}

pub fn new_task_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Record for TaskRecord {
    fn apply(&mut self, event: &Event) -> bool {
        let task = &mut self.task;
        if task.status().is_terminal() {
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
}

/// One task: its journal, and the signal that asks it to stop.
pub struct TaskEntry {
    pub id: String,
    journal: Arc<Journal<TaskRecord>>,
    cancel: CancellationToken,
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

impl TaskEntry {
    pub fn snapshot(&self) -> Task {
        self.journal.with(|record| record.task.clone())
    }

    /// The record as clients get it: the values of its agent environment hidden.
    pub fn public(&self) -> Task {
        let mut task = self.snapshot();
        if let Some(spec) = task.spec.as_mut() {
            for value in spec.environment.values_mut() {
                *value = HIDDEN_VALUE.to_owned();
            }
        }
        task
    }

    pub fn status(&self) -> TaskStatus {
        self.journal.with(|record| record.task.status())
    }

    pub fn spec(&self) -> TaskSpec {
        self.journal
            .with(|record| record.task.spec.clone().unwrap_or_default())
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
                runner: String::new(),
            }),
        )
        .is_some()
    }

    /// Updates why a pending task waits, without an event: it is a description, not a change.
    pub fn set_waiting_reason(&self, reason: String) {
        self.journal.with(|record| {
            if record.task.status() == TaskStatus::Pending && !reason.is_empty() {
                record.task.status_reason = reason;
            }
        })
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
        let (action, attempt) = self.journal.with(|record| {
            let action = match record.task.status() {
                status if status.is_terminal() => CancelAction::AlreadyEnded,
                TaskStatus::Pending | TaskStatus::Unspecified => CancelAction::Dequeue,
                _ => {
                    record
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
        self.journal.with(|record| {
            record
                .cancel_reason
                .clone()
                .unwrap_or_else(|| "cancelled".to_owned())
        })
    }

    /// Sends the events after `after` to `out`, then follows the log until the task has ended
    /// and every event was sent, or `out` closes.
    pub async fn follow(self: Arc<Self>, after: u64, out: mpsc::Sender<Event>) {
        self.journal.clone().follow(after, out).await
    }

    pub fn is_blocked(&self) -> bool {
        self.journal.with(|record| record.blocked)
    }

    /// The tasks it depended on have all completed: it can be placed.
    pub fn unblock(&self) {
        self.journal.with(|record| record.blocked = false)
    }

    /// Waits until the task has ended.
    pub async fn ended(&self) {
        self.journal.wait_for(|record| record.ended()).await
    }
}

/// Every task the driver knows, in submission order.
#[derive(Default)]
pub struct TaskStore {
    inner: RwLock<StoreInner>,
}

#[derive(Default)]
struct StoreInner {
    tasks: Catalog<TaskEntry>,
    by_idempotency_key: HashMap<String, Arc<TaskEntry>>,
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
        let entry = Self::record(&mut inner, new_task_id(), spec);
        (entry, true)
    }

    /// Records tasks whose ids were chosen beforehand (a batch naming each other).
    pub fn insert_all(&self, tasks: Vec<(String, TaskSpec)>) -> Vec<Arc<TaskEntry>> {
        let mut inner = self.inner.write().expect("task store lock poisoned");
        tasks
            .into_iter()
            .map(|(id, spec)| Self::record(&mut inner, id, spec))
            .collect()
    }

    fn record(inner: &mut StoreInner, id: String, spec: TaskSpec) -> Arc<TaskEntry> {
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
            journal: Arc::new(Journal::new(TaskRecord {
                blocked: !spec.depends_on.is_empty(),
                task,
                cancel_reason: None,
            })),
            cancel: CancellationToken::new(),
        });
        let reason = if spec.depends_on.is_empty() {
            "queued".to_owned()
        } else {
            format!("waiting for tasks {}", spec.depends_on.join(", "))
        };
        entry.set_status(1, TaskStatus::Pending, reason, "");
        inner.tasks.insert(id, entry.clone());
        if !spec.idempotency_key.is_empty() {
            inner
                .by_idempotency_key
                .insert(spec.idempotency_key, entry.clone());
        }
        entry
    }

    pub fn get(&self, id: &str) -> Option<Arc<TaskEntry>> {
        self.inner
            .read()
            .expect("task store lock poisoned")
            .tasks
            .get(id)
    }

    /// Tasks from position `start` on, matching `filter`, at most `limit`; and the position
    /// where the next page starts.
    pub fn page(
        &self,
        start: u64,
        limit: usize,
        filter: impl Fn(&Task) -> bool,
    ) -> (Vec<Task>, Option<u64>) {
        let inner = self.inner.read().expect("task store lock poisoned");
        inner.tasks.page(start, limit, |entry| {
            let task = entry.public();
            filter(&task).then_some(task)
        })
    }

    pub fn pending(&self) -> Vec<Arc<TaskEntry>> {
        let inner = self.inner.read().expect("task store lock poisoned");
        inner
            .tasks
            .all()
            .filter(|entry| entry.status() == TaskStatus::Pending && !entry.is_blocked())
            .cloned()
            .collect()
    }

    pub fn count_by_status(&self) -> HashMap<String, u64> {
        let inner = self.inner.read().expect("task store lock poisoned");
        let mut counts = HashMap::new();
        for entry in inner.tasks.all() {
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
        let (page, next) = store.page(0, 2, |t| t.status() == TaskStatus::Pending);
        let ids: Vec<_> = page.iter().map(|t| t.task_id.clone()).collect();
        assert_eq!(ids, vec![entries[0].id.clone(), entries[2].id.clone()]);
        let (rest, after) = store.page(next.unwrap(), 2, |t| t.status() == TaskStatus::Pending);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].task_id, entries[4].id);
        assert_eq!(after, None);
    }
}
