//! What the worker holds: task runs by task and attempt, sessions, the highest attempt seen of
//! each task, and which of them hold a slot.
//!
//! A run stays here after it ended, with its log, for `worker.runRetention`, so that a driver
//! that restarted can still collect its end; the fence of a task (the highest attempt seen, the
//! attempts stopped) is forgotten a retention after its last run went.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::WorkerError;
use crate::execution::supervisor::Cancellation;
use crate::run_log::RunLog;
use crate::session::InputHandover;

/// A run holding a slot: a task's attempt, or a session (attempt 0).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkId {
    pub id: String,
    pub attempt: u32,
}

impl WorkId {
    pub fn task(task_id: &str, attempt: u32) -> Self {
        WorkId {
            id: task_id.to_owned(),
            attempt,
        }
    }

    pub fn session(session_id: &str) -> Self {
        WorkId {
            id: session_id.to_owned(),
            attempt: 0,
        }
    }

    pub fn is_session(&self) -> bool {
        self.attempt == 0
    }
}

/// One attempt of a task on this worker.
pub struct TaskRun {
    pub attempt: u32,
    pub log: Arc<RunLog>,
    pub cancel: Cancellation,
}

impl std::fmt::Debug for TaskRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskRun")
            .field("attempt", &self.attempt)
            .field("running", &self.is_running())
            .finish()
    }
}

impl TaskRun {
    pub fn is_running(&self) -> bool {
        !self.log.is_finished()
    }
}

struct TaskRecord {
    /// Lower attempts are refused.
    highest_attempt: u32,
    /// Attempts up to this one were stopped here, and why: they are refused too.
    stopped: Option<(u32, String)>,
    runs: BTreeMap<u32, Arc<TaskRun>>,
    /// Last time the record was in use, to forget it a retention later.
    touched: Instant,
}

impl TaskRecord {
    fn new(now: Instant) -> Self {
        TaskRecord {
            highest_attempt: 0,
            stopped: None,
            runs: BTreeMap::new(),
            touched: now,
        }
    }

    fn check(&self, task_id: &str, attempt: u32) -> Result<(), WorkerError> {
        if attempt < self.highest_attempt {
            return Err(WorkerError::StaleAttempt {
                task_id: task_id.to_owned(),
                attempt,
                seen: self.highest_attempt,
            });
        }
        if let Some((through, reason)) = &self.stopped
            && attempt <= *through
        {
            return Err(WorkerError::AttemptStopped {
                task_id: task_id.to_owned(),
                attempt,
                reason: reason.clone(),
            });
        }
        match self.runs.get(&attempt) {
            Some(run) if run.is_running() => Err(WorkerError::AlreadyRunning(task_id.to_owned())),
            Some(_) => Err(WorkerError::AlreadyRan {
                task_id: task_id.to_owned(),
                attempt,
            }),
            None => Ok(()),
        }
    }
}

/// A session on this worker: its log, and while its actor lives, how to attach to and stop it.
pub struct SessionRecord {
    pub log: Arc<RunLog>,
    pub live: Option<LiveSession>,
}

pub struct LiveSession {
    /// Where a driver that attaches leaves its input for the session.
    pub handover: Arc<InputHandover>,
    /// Stops the session's container (keeping its volumes) and ends the session here.
    pub stop: Cancellation,
}

#[derive(Default)]
pub struct Runs {
    tasks: HashMap<String, TaskRecord>,
    sessions: HashMap<String, SessionRecord>,
    holding: BTreeSet<WorkId>,
    /// A mode switch is under way: nothing new is admitted.
    pub switching: bool,
}

impl Runs {
    /// Checks `attempt` of `task_id` against the attempts seen, and records it as seen.
    /// Returns the older attempts still running here: the new one supersedes them.
    pub fn fence(
        &mut self,
        task_id: &str,
        attempt: u32,
        now: Instant,
    ) -> Result<Vec<Arc<TaskRun>>, WorkerError> {
        let record = self
            .tasks
            .entry(task_id.to_owned())
            .or_insert_with(|| TaskRecord::new(now));
        record.check(task_id, attempt)?;
        record.highest_attempt = attempt;
        record.touched = now;
        Ok(record
            .runs
            .range(..attempt)
            .map(|(_, run)| run.clone())
            .filter(|run| run.is_running())
            .collect())
    }

    /// Records a run that starts now; refused when the fence moved past it meanwhile.
    pub fn insert_task(
        &mut self,
        task_id: &str,
        run: Arc<TaskRun>,
        now: Instant,
    ) -> Result<(), WorkerError> {
        let record = self
            .tasks
            .entry(task_id.to_owned())
            .or_insert_with(|| TaskRecord::new(now));
        record.check(task_id, run.attempt)?;
        record.highest_attempt = run.attempt;
        record.touched = now;
        record.runs.insert(run.attempt, run);
        Ok(())
    }

    pub fn task_run(&self, task_id: &str, attempt: u32) -> Option<Arc<TaskRun>> {
        self.tasks.get(task_id)?.runs.get(&attempt).cloned()
    }

    /// The attempts of `task_id` still running here.
    pub fn running_attempts(&self, task_id: &str) -> Vec<Arc<TaskRun>> {
        self.tasks
            .get(task_id)
            .map(|record| {
                record
                    .runs
                    .values()
                    .filter(|run| run.is_running())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every task run still running, for a shutdown.
    pub fn all_running(&self) -> Vec<Arc<TaskRun>> {
        self.tasks
            .values()
            .flat_map(|record| record.runs.values())
            .filter(|run| run.is_running())
            .cloned()
            .collect()
    }

    /// Refuses attempts of `task_id` up to `attempt` from now on; returns its run here, if any,
    /// for the caller to cancel.
    pub fn stop_task(
        &mut self,
        task_id: &str,
        attempt: u32,
        reason: &str,
        now: Instant,
    ) -> Option<Arc<TaskRun>> {
        let record = self
            .tasks
            .entry(task_id.to_owned())
            .or_insert_with(|| TaskRecord::new(now));
        record.highest_attempt = record.highest_attempt.max(attempt);
        if record
            .stopped
            .as_ref()
            .is_none_or(|(through, _)| *through < attempt)
        {
            record.stopped = Some((attempt, reason.to_owned()));
        }
        record.touched = now;
        record.runs.get(&attempt).cloned()
    }

    /// Records a newly opened session; refused while one of that id is open.
    pub fn open_session(
        &mut self,
        session_id: &str,
        record: SessionRecord,
    ) -> Result<(), WorkerError> {
        if self
            .sessions
            .get(session_id)
            .is_some_and(|open| open.live.is_some())
        {
            return Err(WorkerError::AlreadyRunning(session_id.to_owned()));
        }
        self.sessions.insert(session_id.to_owned(), record);
        Ok(())
    }

    pub fn session_log(&self, session_id: &str) -> Option<Arc<RunLog>> {
        Some(self.sessions.get(session_id)?.log.clone())
    }

    pub fn live_session(&self, session_id: &str) -> Option<&LiveSession> {
        self.sessions.get(session_id)?.live.as_ref()
    }

    pub fn live_sessions(&self) -> impl Iterator<Item = &LiveSession> {
        self.sessions
            .values()
            .filter_map(|record| record.live.as_ref())
    }

    /// Counts `work` as holding a slot; returns how many do.
    pub fn hold(&mut self, work: WorkId) -> usize {
        self.holding.insert(work);
        self.holding.len()
    }

    /// `work` gave its slot back; returns how many still hold one.
    pub fn release(&mut self, work: &WorkId) -> usize {
        self.holding.remove(work);
        if work.is_session()
            && let Some(record) = self.sessions.get_mut(&work.id)
        {
            record.live = None;
        }
        self.holding.len()
    }

    /// What holds a slot, in order.
    pub fn holding(&self) -> impl Iterator<Item = &WorkId> {
        self.holding.iter()
    }

    /// Forgets runs that ended more than `retention` ago, and fences unused as long.
    pub fn sweep(&mut self, now: Instant, retention: Duration) {
        let kept = |ended: Option<Instant>| ended.is_none_or(|ended| now < ended + retention);
        self.tasks.retain(|_, record| {
            record.runs.retain(|_, run| kept(run.log.ended_at()));
            if record.runs.is_empty() {
                now < record.touched + retention
            } else {
                record.touched = now;
                true
            }
        });
        self.sessions
            .retain(|_, record| record.live.is_some() || kept(record.log.ended_at()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_log::LogBounds;

    fn run(attempt: u32) -> Arc<TaskRun> {
        Arc::new(TaskRun {
            attempt,
            log: RunLog::new(
                format!("task t attempt {attempt}"),
                std::env::temp_dir().join("unused.events"),
                LogBounds::default(),
            ),
            cancel: Cancellation::default(),
        })
    }

    #[test]
    fn the_fence_refuses_older_and_stopped_attempts_and_names_them() {
        let now = Instant::now();
        let mut runs = Runs::default();
        assert!(runs.fence("t", 2, now).unwrap().is_empty());
        runs.insert_task("t", run(2), now).unwrap();
        let stale = runs.fence("t", 1, now).unwrap_err().to_string();
        assert_eq!(
            stale,
            "attempt 1 of task t is older than attempt 2, which this worker has seen"
        );
        assert!(matches!(
            runs.fence("t", 2, now),
            Err(WorkerError::AlreadyRunning(_))
        ));
        let superseded = runs.fence("t", 3, now).unwrap();
        assert_eq!(
            superseded.iter().map(|r| r.attempt).collect::<Vec<_>>(),
            [2]
        );
        runs.stop_task("t", 3, "given to worker-b", now);
        let stopped = runs.fence("t", 3, now).unwrap_err().to_string();
        assert_eq!(
            stopped,
            "attempt 3 of task t was stopped on this worker: given to worker-b"
        );
        assert!(runs.fence("t", 4, now).is_ok());
    }

    #[test]
    fn ended_runs_and_then_fences_are_forgotten_after_the_retention() {
        let start = Instant::now();
        let retention = Duration::from_secs(600);
        let mut runs = Runs::default();
        runs.fence("t", 2, start).unwrap();
        let ended = run(2);
        runs.insert_task("t", ended.clone(), start).unwrap();
        ended.log.finish();
        let ended_at = ended.log.ended_at().unwrap();
        runs.sweep(ended_at + retention - Duration::from_secs(1), retention);
        assert!(runs.task_run("t", 2).is_some(), "kept for the retention");
        runs.sweep(ended_at + retention, retention);
        assert!(runs.task_run("t", 2).is_none(), "dropped after it");
        assert!(
            runs.fence("t", 1, ended_at + retention).is_err(),
            "the fence outlives the run"
        );
        runs.sweep(ended_at + retention * 3, retention);
        assert!(
            runs.fence("t", 1, ended_at + retention * 3).is_ok(),
            "then it is forgotten too"
        );
    }
}
