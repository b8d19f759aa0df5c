//! The scheduler's state: workers, the queue and the placements in force.

mod slots;

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::time::{Duration, Instant, SystemTime};

use claudecluster_proto::v1::{
    DrainRequested, ExecutionMode, Priority, RegisterWorker, StreamPlacementsResponse, TaskNeeds,
    WorkerHeartbeat, WorkerInfo, WorkerLinkResponse, worker_link_response,
};
use tokio::sync::mpsc;
use tonic::Status;

use crate::placement::{Candidate, FreeWorkers, TaskRequirements, explain_unplaceable, offer_key};
use slots::Placement;

pub(crate) type PlacementSender = mpsc::UnboundedSender<Result<StreamPlacementsResponse, Status>>;
/// Messages from the scheduler to one worker, over its link.
pub(crate) type LinkReplies = mpsc::Sender<Result<WorkerLinkResponse, Status>>;

/// Queue order: higher priority first, then first in first out.
type QueueKey = (Reverse<i32>, u64);

#[derive(Debug)]
struct QueuedTask {
    task_id: String,
    attempt: u32,
    requirements: TaskRequirements,
    /// The priority it was queued with; aging may have raised its rank since.
    priority: i32,
    queued_at: Instant,
    /// From enqueue to placement, in the trace of the request that enqueued it.
    span: tracing::Span,
}

#[derive(Debug)]
struct WorkerEntry {
    registration: RegisterWorker,
    /// The modes the worker runs, its default first.
    modes: Vec<ExecutionMode>,
    labels: HashMap<String, String>,
    /// What it offers, as placement groups workers (see [`offer_key`]): fixed from its
    /// registration on.
    offer: Vec<u8>,
    /// Identifies the link the worker registered on; a re-registration makes a new one.
    link: u64,
    connected: bool,
    reported_healthy: bool,
    health_reason: String,
    last_heartbeat: Instant,
    last_heartbeat_time: SystemTime,
    /// Missed heartbeats for longer than the timeout.
    stale: bool,
    /// The tasks (and sessions) placed on the worker, as recorded in `State::placed`.
    placed: HashSet<String>,
    /// Runs (id, attempt) the worker was told to stop and still reports: they hold their slots
    /// until they end, or the worker would be given more work than it has room for.
    stopping: HashSet<(String, u32)>,
    idle_warm_agents: u32,
    /// What its workspaces hold, and the disk free for more, as last reported.
    workspace_bytes: u64,
    disk_free_bytes: u64,
    /// Gets no new work.
    draining: bool,
    /// Draining, and the worker says nothing runs on it any more.
    drained: bool,
    /// Where messages to the worker go, over its link.
    link_replies: Option<LinkReplies>,
    last_placed: u64,
}

impl WorkerEntry {
    fn healthy(&self) -> bool {
        self.connected && self.reported_healthy && !self.stale
    }

    /// Slots taken: derived from the placements, so that no count drifts from them.
    fn load(&self) -> u32 {
        (self.placed.len() + self.stopping.len()) as u32
    }

    fn candidate(&self) -> Candidate<'_> {
        Candidate {
            worker_id: &self.registration.worker_id,
            healthy: self.healthy(),
            draining: self.draining,
            execution_modes: &self.modes,
            labels: &self.labels,
            admits: self.registration.admits.as_ref(),
            capacity: self.registration.capacity,
            load: self.load(),
            last_placed: self.last_placed,
        }
    }

    fn info(&self) -> WorkerInfo {
        let health_reason = if !self.connected {
            "disconnected from the scheduler".to_owned()
        } else if self.stale {
            "missed its heartbeats".to_owned()
        } else {
            self.health_reason.clone()
        };
        WorkerInfo {
            worker_id: self.registration.worker_id.clone(),
            address: self.registration.address.clone(),
            execution_mode: self.registration.execution_mode,
            capacity: self.registration.capacity,
            load: self.load(),
            labels: self.labels.clone(),
            version: self.registration.version.clone(),
            healthy: self.healthy(),
            health_reason,
            last_heartbeat_time: Some(self.last_heartbeat_time.into()),
            execution_modes: self.modes.iter().map(|mode| *mode as i32).collect(),
            idle_warm_agents: self.idle_warm_agents,
            draining: self.draining,
            drained: self.drained,
            admits: self.registration.admits.clone(),
            workspace_bytes: self.workspace_bytes,
            disk_free_bytes: self.disk_free_bytes,
        }
    }
}

/// Heartbeat timeouts after which a disconnected worker holding nothing is forgotten.
const FORGET_AFTER_TIMEOUTS: u32 = 10;

#[derive(Debug)]
pub(crate) struct State {
    workers: HashMap<String, WorkerEntry>,
    queue: BTreeMap<QueueKey, QueuedTask>,
    queued: HashMap<String, QueueKey>,
    /// Task (or session) id to where it holds a slot; each worker keeps the ids placed on it.
    placed: HashMap<String, Placement>,
    /// A worker silent this long is stale, and a placement its worker has not reported running
    /// after this long was never started.
    heartbeat_timeout: Duration,
    placements_tx: Option<PlacementSender>,
    next_queue_seq: u64,
    next_link: u64,
    /// Placements made since start; also tells which worker got work least recently.
    pub placements: u64,
    pub placement_nanos: u64,
}

/// What enqueuing a task led to.
pub(crate) struct Enqueued {
    pub queue_position: u64,
    pub waiting_reason: String,
}

impl State {
    pub fn new(heartbeat_timeout: Duration) -> State {
        State {
            workers: HashMap::new(),
            queue: BTreeMap::new(),
            queued: HashMap::new(),
            placed: HashMap::new(),
            heartbeat_timeout,
            placements_tx: None,
            next_queue_seq: 0,
            next_link: 0,
            placements: 0,
            placement_nanos: 0,
        }
    }

    /// Registers a worker, afresh or again on a new link, taking what it reports running as the
    /// truth for its slots; returns the link's identity.
    pub fn register(
        &mut self,
        mut registration: RegisterWorker,
        replies: LinkReplies,
        now: Instant,
    ) -> u64 {
        self.next_link += 1;
        let link = self.next_link;
        let running = std::mem::take(&mut registration.running);
        let labels = registration.labels.clone();
        let worker_id = registration.worker_id.clone();
        let mut modes = vec![registration.execution_mode()];
        for mode in registration.execution_modes() {
            if mode != ExecutionMode::Unspecified && !modes.contains(&mode) {
                modes.push(mode);
            }
        }
        // A worker that registers again keeps its placements; its report below says which of
        // them still run.
        let (placed, stopping, last_placed) = match self.workers.remove(&worker_id) {
            Some(previous) => (previous.placed, previous.stopping, previous.last_placed),
            None => Default::default(),
        };
        let offer = offer_key(&modes, &labels, registration.admits.as_ref());
        self.workers.insert(
            worker_id.clone(),
            WorkerEntry {
                registration,
                modes,
                labels,
                offer,
                link,
                connected: true,
                reported_healthy: true,
                health_reason: String::new(),
                last_heartbeat: now,
                last_heartbeat_time: SystemTime::now(),
                stale: false,
                placed,
                stopping,
                idle_warm_agents: 0,
                workspace_bytes: 0,
                disk_free_bytes: 0,
                last_placed,
                // A worker that registers afresh has been restarted or switched: it takes work.
                draining: false,
                drained: false,
                link_replies: Some(replies),
            },
        );
        self.reconcile(&worker_id, running, now);
        self.place();
        link
    }

    /// Records a heartbeat and what the worker reports running; false when the link has been
    /// replaced by a newer registration.
    pub fn heartbeat(
        &mut self,
        worker_id: &str,
        link: u64,
        mut beat: WorkerHeartbeat,
        now: Instant,
    ) -> bool {
        let Some(worker) = self.workers.get_mut(worker_id).filter(|w| w.link == link) else {
            return false;
        };
        let was_healthy = worker.healthy();
        worker.last_heartbeat = now;
        worker.last_heartbeat_time = SystemTime::now();
        worker.stale = false;
        worker.reported_healthy = beat.healthy;
        // Listed to every client: a reason is a line, not a dump.
        worker.health_reason = std::mem::take(&mut beat.health_reason)
            .chars()
            .take(1024)
            .collect();
        worker.idle_warm_agents = beat.idle_warm_agents;
        worker.workspace_bytes = beat.workspace_bytes;
        worker.disk_free_bytes = beat.disk_free_bytes;
        worker.drained = worker.draining && beat.drained;
        let became_healthy = !was_healthy && worker.healthy();
        if became_healthy {
            tracing::info!(worker = worker_id, "worker is healthy");
        }
        let freed = self.reconcile(worker_id, beat.running, now);
        if became_healthy || freed {
            self.place();
        }
        true
    }

    /// Stops placing work on a worker and asks it to report when nothing runs on it.
    pub fn drain(&mut self, worker_id: &str) -> Option<WorkerInfo> {
        let worker = self.workers.get_mut(worker_id)?;
        if !worker.draining {
            worker.draining = true;
            tracing::info!(worker = worker_id, "draining");
            if let Some(replies) = &worker.link_replies {
                let drain = WorkerLinkResponse {
                    message: Some(worker_link_response::Message::Drain(DrainRequested {})),
                };
                let _ = replies.try_send(Ok(drain));
            }
        }
        Some(worker.info())
    }

    pub fn link_closed(&mut self, worker_id: &str, link: u64, reason: &str) {
        if let Some(worker) = self.workers.get_mut(worker_id).filter(|w| w.link == link) {
            worker.connected = false;
            worker.link_replies = None;
            worker.health_reason = reason.to_owned();
            tracing::warn!(worker = worker_id, reason, "worker link closed");
        }
    }

    /// Marks workers silent for longer than the heartbeat timeout as unhealthy, and lets go of
    /// the placements such workers never reported running.
    pub fn expire(&mut self, now: Instant) {
        let timeout = self.heartbeat_timeout;
        for (worker_id, worker) in &mut self.workers {
            let silent_for = now.saturating_duration_since(worker.last_heartbeat);
            if worker.connected && !worker.stale && silent_for > timeout {
                worker.stale = true;
                tracing::warn!(
                    worker = %worker_id,
                    ?silent_for,
                    "worker missed its heartbeats; it gets no new work"
                );
            }
        }
        // The slots freed are on workers that take no work, so there is nothing to place.
        self.expire_unreported_on_silent_workers(now);
        // A worker gone for good (or a registration that never was a worker) is forgotten once
        // nothing is placed on it, so that the list of workers does not grow for ever; one that
        // comes back registers afresh.
        let forget_after = timeout * FORGET_AFTER_TIMEOUTS;
        self.workers.retain(|worker_id, worker| {
            let gone = !worker.connected
                && worker.placed.is_empty()
                && worker.stopping.is_empty()
                && now.saturating_duration_since(worker.last_heartbeat) > forget_after;
            if gone {
                tracing::info!(worker = %worker_id, "forgetting a worker disconnected for long");
            }
            !gone
        });
    }

    pub fn enqueue(
        &mut self,
        task_id: String,
        attempt: u32,
        priority: Priority,
        requirements: TaskRequirements,
    ) -> Enqueued {
        if !self.make_way_for_enqueue(&task_id, attempt) {
            return Enqueued {
                queue_position: 0,
                waiting_reason: String::new(),
            };
        }
        if let Some(key) = self.queued.get(&task_id) {
            // The driver moved on to a newer attempt while the task waited: that one is placed.
            let queued = self
                .queue
                .get_mut(key)
                .expect("queued ids have queue entries");
            queued.attempt = queued.attempt.max(attempt);
        } else {
            self.next_queue_seq += 1;
            let key = (Reverse(priority_rank(priority)), self.next_queue_seq);
            self.queued.insert(task_id.clone(), key);
            self.queue.insert(
                key,
                QueuedTask {
                    task_id: task_id.clone(),
                    attempt,
                    requirements: requirements.clone(),
                    priority: priority_rank(priority),
                    queued_at: Instant::now(),
                    span: tracing::info_span!(
                        "task.queued",
                        otel.name = "queue and place",
                        task.id = %task_id,
                        task.attempt = attempt,
                        worker.id = tracing::field::Empty,
                    ),
                },
            );
        }
        let queue_position = self.queue.len().saturating_sub(1) as u64;
        self.place();
        let waiting_reason = if self.queued.contains_key(&task_id) {
            if self.placements_tx.is_none() {
                "waiting for the driver's placement stream".to_owned()
            } else {
                explain_unplaceable(
                    &requirements,
                    self.workers.values().map(WorkerEntry::candidate),
                )
            }
        } else {
            String::new()
        };
        Enqueued {
            queue_position,
            waiting_reason,
        }
    }

    pub fn dequeue(&mut self, task_id: &str) -> bool {
        match self.queued.remove(task_id) {
            Some(key) => {
                self.queue.remove(&key);
                true
            }
            None => false,
        }
    }

    pub fn set_placement_stream(&mut self, sender: PlacementSender) {
        self.placements_tx = Some(sender);
        self.place();
    }

    pub fn workers(&self) -> Vec<WorkerInfo> {
        let mut workers: Vec<_> = self.workers.values().map(WorkerEntry::info).collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        workers
    }

    pub fn queued_tasks(&self) -> usize {
        self.queue.len()
    }

    pub fn placed_tasks(&self) -> usize {
        self.placed.len()
    }

    /// Places queued tasks, in queue order, while workers have room.
    fn place(&mut self) {
        let Some(sender) = self.placements_tx.clone() else {
            return;
        };
        if self.queue.is_empty() {
            return;
        }
        // Indexed once per round, then kept as tasks are placed: with no slot free anywhere,
        // no queued task is looked at.
        let mut free = FreeWorkers::with_offers(
            self.workers
                .values()
                .map(|worker| (worker.candidate(), worker.offer.as_slice())),
        );
        // The queue is walked in order without copying it: a full cluster with a long queue
        // pays nothing per enqueue, and placing stops at the first moment no slot is left.
        let mut after: Option<QueueKey> = None;
        while !free.is_empty() {
            let next = match after {
                None => self.queue.keys().next(),
                Some(previous) => self
                    .queue
                    .range((Bound::Excluded(previous), Bound::Unbounded))
                    .map(|(key, _)| key)
                    .next(),
            };
            let Some(&key) = next else {
                return;
            };
            after = Some(key);
            let started = Instant::now();
            let task = &self.queue[&key];
            let Some(worker) = free
                .choose(&task.requirements)
                .and_then(|worker_id| self.workers.get(worker_id))
            else {
                continue;
            };
            let worker_id = worker.registration.worker_id.clone();
            let placement = StreamPlacementsResponse {
                task_id: task.task_id.clone(),
                attempt: task.attempt,
                worker_id: worker_id.clone(),
                worker_address: worker.registration.address.clone(),
            };
            if sender.send(Ok(placement)).is_err() {
                tracing::warn!("the driver's placement stream closed; holding the queue");
                self.placements_tx = None;
                return;
            }
            self.placements += 1;
            free.took(&worker_id, self.placements);
            if let Some(worker) = self.workers.get_mut(&worker_id) {
                worker.last_placed = self.placements;
            }
            let task = self.queue.remove(&key).expect("key taken from the queue");
            self.queued.remove(&task.task_id);
            task.span.record("worker.id", worker_id.as_str());
            let metrics = crate::metrics::metrics();
            metrics.placements.inc();
            metrics
                .placement_latency
                .observe(task.queued_at.elapsed().as_secs_f64());
            tracing::debug!(task = %task.task_id, worker = %worker_id, "placed");
            self.add_placement(
                task.task_id,
                Placement {
                    worker_id,
                    attempt: task.attempt,
                    placed_at: started,
                    confirmed: false,
                },
            );
            self.placement_nanos += started.elapsed().as_nanos() as u64;
        }
    }
}

const CRITICAL: i32 = Priority::Critical as i32;

impl State {
    /// Raises a task one priority level for every `interval` it has waited, up to critical, so
    /// that no task waits behind newer, higher-priority work for ever: a low-priority task is
    /// served as critical after `3 × interval`, and critical tasks are served in the order they
    /// were queued.
    pub fn age_queue(&mut self, now: Instant, interval: std::time::Duration) {
        if interval.is_zero() {
            return;
        }
        let due: Vec<QueueKey> = self
            .queue
            .iter()
            .filter(|((Reverse(rank), _), task)| {
                let earned =
                    now.saturating_duration_since(task.queued_at).as_nanos() / interval.as_nanos();
                *rank < CRITICAL && i64::from(task.priority) + earned as i64 > i64::from(*rank)
            })
            .map(|(key, _)| *key)
            .collect();
        if due.is_empty() {
            return;
        }
        for key in due {
            let task = self.queue.remove(&key).expect("a key just read");
            let earned = (now.saturating_duration_since(task.queued_at).as_nanos()
                / interval.as_nanos()) as i32;
            let rank = (task.priority + earned).min(CRITICAL);
            // The sequence number stays: among equal ranks the older task goes first.
            let aged = (Reverse(rank), key.1);
            self.queued.insert(task.task_id.clone(), aged);
            self.queue.insert(aged, task);
        }
        self.place();
    }

    /// Queued tasks by the priority they were queued with.
    pub fn queued_by_priority(&self) -> std::collections::HashMap<String, u64> {
        let mut counts = std::collections::HashMap::new();
        for task in self.queue.values() {
            let label = Priority::try_from(task.priority)
                .unwrap_or(Priority::Normal)
                .label();
            *counts.entry(label.to_owned()).or_default() += 1;
        }
        counts
    }

    /// The ids of queued tasks in the order they would be placed.
    #[cfg(test)]
    fn queue_order(&self) -> Vec<String> {
        self.queue
            .values()
            .map(|task| task.task_id.clone())
            .collect()
    }
}

fn priority_rank(priority: Priority) -> i32 {
    match priority {
        Priority::Unspecified => Priority::Normal as i32,
        other => other as i32,
    }
}

pub(crate) fn requirements(
    mode: ExecutionMode,
    selector: HashMap<String, String>,
    needs: TaskNeeds,
) -> TaskRequirements {
    TaskRequirements {
        execution_mode: mode,
        worker_selector: selector,
        needs,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;

    fn any() -> TaskRequirements {
        requirements(
            ExecutionMode::Unspecified,
            HashMap::new(),
            TaskNeeds::default(),
        )
    }

    #[test]
    fn higher_priorities_go_first_and_equal_ones_in_order() {
        let mut state = State::new(Duration::from_secs(5));
        for (id, priority) in [
            ("low", Priority::Low),
            ("normal-1", Priority::Unspecified),
            ("critical", Priority::Critical),
            ("high", Priority::High),
            ("normal-2", Priority::Normal),
        ] {
            state.enqueue(id.into(), 1, priority, any());
        }
        assert_eq!(
            state.queue_order(),
            vec!["critical", "high", "normal-1", "normal-2", "low"]
        );
    }

    #[test]
    fn a_low_priority_task_is_served_as_critical_after_three_intervals() {
        let mut state = State::new(Duration::from_secs(5));
        let interval = Duration::from_secs(60);
        state.enqueue("old-low".into(), 1, Priority::Low, any());
        let start = Instant::now();
        state.age_queue(start + interval * 2 + Duration::from_secs(1), interval);
        state.enqueue("new-critical".into(), 1, Priority::Critical, any());
        state.enqueue("new-high".into(), 1, Priority::High, any());
        assert_eq!(
            state.queue_order(),
            vec!["new-critical", "old-low", "new-high"],
            "two intervals: high"
        );
        state.age_queue(start + interval * 3 + Duration::from_secs(1), interval);
        assert_eq!(
            state.queue_order(),
            vec!["old-low", "new-critical", "new-high"],
            "three intervals: critical, and older"
        );
        assert_eq!(state.queued_by_priority().get("low"), Some(&1));
    }
}
