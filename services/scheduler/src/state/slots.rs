//! What holds a slot on which worker.
//!
//! The scheduler places tasks, but what a worker reports running is the truth for its slots:
//! a report confirms the placements the worker started, adds the runs the scheduler did not
//! know (that is how a restarted scheduler learns its workers' load), and ends the placements
//! whose runs are gone. A run whose task has since gone to a newer attempt or to another worker
//! is told to stop, and holds its slot until it has.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use claudecluster_proto::v1::StreamPlacementsResponse;
use claudecluster_proto::v1::{RunningWork, StopRuns, WorkerLinkResponse, worker_link_response};

use super::{State, WorkerEntry};

/// Where a task (or session) holds a slot.
#[derive(Debug)]
pub(super) struct Placement {
    pub(super) worker_id: String,
    pub(super) attempt: u32,
    pub(super) placed_at: Instant,
    /// The worker has reported the run. Until then the driver may not have started it at all.
    pub(super) confirmed: bool,
}

/// How a reported attempt compares with the one the scheduler holds. Sessions have no attempts
/// (workers report them as 0), so 0 matches any.
fn compare_attempts(reported: u32, held: u32) -> Ordering {
    if reported == 0 || held == 0 {
        Ordering::Equal
    } else {
        reported.cmp(&held)
    }
}

/// What a worker's report of one run comes to.
enum Claim {
    /// The run holds a slot on the reporting worker; `freed_elsewhere` when a slot another
    /// worker held for the task was let go.
    Holds { freed_elsewhere: bool },
    /// A newer attempt or another worker has the task: the run must stop.
    Fenced { reason: String },
}

impl WorkerEntry {
    /// Tells the worker, over its link, to stop `runs`. A message lost to a full or closed link
    /// is sent again when the worker next reports those runs.
    fn tell_to_stop(&self, runs: Vec<RunningWork>, reason: String) {
        let Some(replies) = &self.link_replies else {
            return;
        };
        let stop = WorkerLinkResponse {
            message: Some(worker_link_response::Message::StopRuns(StopRuns {
                runs,
                reason,
            })),
        };
        if replies.try_send(Ok(stop)).is_err() {
            tracing::debug!(
                worker = %self.registration.worker_id,
                "cannot send stop-runs now; it goes again with the worker's next report"
            );
        }
    }
}

impl State {
    /// Records a placement, on its worker too, so that the worker's load counts it.
    pub(super) fn add_placement(&mut self, task_id: String, placement: Placement) {
        self.remove_placement(&task_id);
        let Some(worker) = self.workers.get_mut(&placement.worker_id) else {
            debug_assert!(false, "placements are made only on registered workers");
            return;
        };
        worker.placed.insert(task_id.clone());
        self.placed.insert(task_id, placement);
    }

    /// Removes a placement, from its worker too, freeing its slot.
    pub(super) fn remove_placement(&mut self, task_id: &str) -> Option<Placement> {
        let placement = self.placed.remove(task_id)?;
        if let Some(worker) = self.workers.get_mut(&placement.worker_id) {
            worker.placed.remove(task_id);
        }
        Some(placement)
    }

    /// Frees the slot of `task_id`'s placement if it is of `attempt` (0: of any attempt), so
    /// that a late release of an earlier attempt leaves the current one alone.
    pub fn release(&mut self, task_id: &str, attempt: u32) {
        let Some(placement) = self.placed.get(task_id) else {
            return;
        };
        if compare_attempts(attempt, placement.attempt) != Ordering::Equal {
            tracing::debug!(
                task = task_id,
                attempt,
                placed_attempt = placement.attempt,
                "release of another attempt; the placement stays"
            );
            return;
        }
        self.remove_placement(task_id);
        self.place();
    }

    /// Lets go of `task_id`'s placement for an enqueue of `attempt` where that is right; false
    /// when the placement stands and the task must not be queued.
    pub(super) fn make_way_for_enqueue(&mut self, task_id: &str, attempt: u32) -> bool {
        let Some(placement) = self.placed.get(task_id) else {
            return true;
        };
        match compare_attempts(attempt, placement.attempt) {
            // The driver gave up on the placed attempt (its worker was lost, or refused it).
            Ordering::Greater => {
                let reason = format!("{task_id} is queued again as attempt {attempt}");
                self.supersede(task_id, reason);
                true
            }
            // The driver enqueues only tasks it holds as pending, so a placement the worker
            // never reported was never received (the placement stream broke): it is made again.
            Ordering::Equal if !placement.confirmed => {
                self.remove_placement(task_id);
                true
            }
            // It runs there, and the driver does not know it (it restarted before it recorded
            // the placement): the placement is given to the driver again, which attaches to the
            // run instead of starting another.
            Ordering::Equal => {
                let address = self
                    .workers
                    .get(&placement.worker_id)
                    .map(|worker| worker.registration.address.clone());
                if let (Some(sender), Some(worker_address)) = (&self.placements_tx, address) {
                    let again = StreamPlacementsResponse {
                        task_id: task_id.to_owned(),
                        attempt,
                        worker_id: placement.worker_id.clone(),
                        worker_address,
                    };
                    tracing::info!(task = task_id, attempt, worker = %placement.worker_id, "the task already runs; placement sent again");
                    let _ = sender.send(Ok(again));
                }
                false
            }
            // A newer attempt is placed: placing this one would run the task twice.
            _ => {
                tracing::debug!(
                    task = task_id,
                    attempt,
                    worker = %placement.worker_id,
                    placed_attempt = placement.attempt,
                    "enqueue of a task that is placed; nothing to do"
                );
                false
            }
        }
    }

    /// Takes a task's placement away from its worker, for `reason`. A run the worker confirmed
    /// is told to stop and keeps its slot until the worker no longer reports it; a placement
    /// never confirmed frees its slot at once (true).
    fn supersede(&mut self, task_id: &str, reason: String) -> bool {
        let Some(old) = self.remove_placement(task_id) else {
            return false;
        };
        tracing::info!(
            task = task_id,
            worker = %old.worker_id,
            attempt = old.attempt,
            reason,
            "placement superseded"
        );
        if !old.confirmed {
            return true;
        }
        if let Some(worker) = self.workers.get_mut(&old.worker_id) {
            worker.stopping.insert((task_id.to_owned(), old.attempt));
            let run = RunningWork {
                id: task_id.to_owned(),
                attempt: old.attempt,
            };
            worker.tell_to_stop(vec![run], reason);
        }
        false
    }

    /// Makes the scheduler's record of `worker_id`'s slots what the worker reports running at
    /// `now`; true when slots were freed.
    pub(super) fn reconcile(
        &mut self,
        worker_id: &str,
        running: Vec<RunningWork>,
        now: Instant,
    ) -> bool {
        let mut to_stop: Vec<(RunningWork, String)> = Vec::new();
        // One run per id: a worker that starts a newer attempt stops the older one itself, so an
        // older attempt still reported is on its way out.
        let mut reported: BTreeMap<String, u32> = BTreeMap::new();
        for run in running {
            if run.id.is_empty() {
                continue;
            }
            let newest = reported.entry(run.id.clone()).or_insert(run.attempt);
            let older = match run.attempt.cmp(newest) {
                Ordering::Equal => continue,
                Ordering::Less => run.attempt,
                Ordering::Greater => std::mem::replace(newest, run.attempt),
            };
            let reason = format!("attempt {} of {} runs on this worker", *newest, run.id);
            let older = RunningWork {
                id: run.id,
                attempt: older,
            };
            to_stop.push((older, reason));
        }
        let mut held = HashSet::new();
        let mut freed = false;
        for (id, attempt) in reported {
            match self.claim(worker_id, &id, attempt, now) {
                Claim::Holds { freed_elsewhere } => {
                    freed |= freed_elsewhere;
                    held.insert(id);
                }
                Claim::Fenced { reason } => to_stop.push((RunningWork { id, attempt }, reason)),
            }
        }
        let timeout = self.heartbeat_timeout;
        let Some(worker) = self.workers.get_mut(worker_id) else {
            return freed;
        };
        // Runs told to stop hold their slots until the worker no longer reports them.
        let stopping: HashSet<(String, u32)> = to_stop
            .iter()
            .map(|(run, _)| (run.id.clone(), run.attempt))
            .collect();
        freed |= worker.stopping.iter().any(|run| !stopping.contains(run));
        for (run, reason) in &to_stop {
            if worker.stopping.contains(&(run.id.clone(), run.attempt)) {
                tracing::debug!(
                    worker = worker_id,
                    task = %run.id,
                    attempt = run.attempt,
                    "still runs; told to stop again"
                );
            } else {
                tracing::warn!(
                    worker = worker_id,
                    task = %run.id,
                    attempt = run.attempt,
                    reason,
                    "worker runs a superseded run; told to stop"
                );
            }
        }
        worker.stopping = stopping;
        if !to_stop.is_empty() {
            let reason = to_stop
                .iter()
                .map(|(_, reason)| reason.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            let runs = to_stop.into_iter().map(|(run, _)| run).collect();
            worker.tell_to_stop(runs, reason);
        }
        // A confirmed run the worker no longer reports has ended; a placement it never reported
        // within the timeout was never started (the driver died first, or the worker refused it).
        let gone: Vec<String> = worker
            .placed
            .iter()
            .filter(|id| !held.contains(*id))
            .filter(|id| {
                let placement = &self.placed[*id];
                placement.confirmed || now.saturating_duration_since(placement.placed_at) > timeout
            })
            .cloned()
            .collect();
        for id in &gone {
            if let Some(placement) = self.remove_placement(id) {
                if placement.confirmed {
                    tracing::debug!(worker = worker_id, task = %id, "run ended; its slot is free");
                } else {
                    tracing::warn!(
                        worker = worker_id,
                        task = %id,
                        "placement never reported running; its slot is free"
                    );
                }
            }
        }
        freed || !gone.is_empty()
    }

    /// What `worker_id` reporting `id` at `attempt` comes to, given what the scheduler holds.
    fn claim(&mut self, worker_id: &str, id: &str, attempt: u32, now: Instant) -> Claim {
        let mut freed_elsewhere = false;
        let mut attempt_held = attempt;
        if let Some(placement) = self.placed.get_mut(id) {
            let here = placement.worker_id == worker_id;
            match compare_attempts(attempt, placement.attempt) {
                Ordering::Less => {
                    let reason = format!(
                        "attempt {} of {id} is placed on worker {}",
                        placement.attempt, placement.worker_id
                    );
                    return Claim::Fenced { reason };
                }
                _ if here => {
                    placement.attempt = placement.attempt.max(attempt);
                    placement.confirmed = true;
                    return Claim::Holds {
                        freed_elsewhere: false,
                    };
                }
                // Two workers run the same attempt: the one that reported it first keeps it.
                Ordering::Equal if placement.confirmed => {
                    let reason = format!("{id} already runs on worker {}", placement.worker_id);
                    return Claim::Fenced { reason };
                }
                // The other worker never reported it, or runs an older attempt: this one wins.
                _ => {
                    attempt_held = attempt.max(placement.attempt);
                    let reason = format!("attempt {attempt} of {id} runs on worker {worker_id}");
                    freed_elsewhere = self.supersede(id, reason);
                }
            }
        } else if let Some(key) = self.queued.get(id) {
            let queued_attempt = self.queue[key].attempt;
            if compare_attempts(attempt, queued_attempt) == Ordering::Less {
                let reason = format!("{id} is queued again as attempt {queued_attempt}");
                return Claim::Fenced { reason };
            }
            // It runs already: placing it as well would run it twice.
            self.dequeue(id);
            attempt_held = attempt.max(queued_attempt);
            tracing::info!(
                task = id,
                worker = worker_id,
                attempt,
                "a queued task already runs on a worker; no longer queued"
            );
        } else {
            tracing::info!(
                task = id,
                worker = worker_id,
                attempt,
                "worker runs what the scheduler did not know; it holds a slot"
            );
        }
        self.add_placement(
            id.to_owned(),
            Placement {
                worker_id: worker_id.to_owned(),
                attempt: attempt_held,
                placed_at: now,
                confirmed: true,
            },
        );
        Claim::Holds { freed_elsewhere }
    }

    /// Lets go of the placements that workers sending no reports (silent or disconnected) have
    /// not confirmed within the timeout. What they confirmed stays until they report again.
    pub(super) fn expire_unreported_on_silent_workers(&mut self, now: Instant) {
        let timeout = self.heartbeat_timeout;
        let expired: Vec<String> = self
            .workers
            .values()
            .filter(|worker| !worker.connected || worker.stale)
            .flat_map(|worker| &worker.placed)
            .filter(|id| {
                let placement = &self.placed[*id];
                !placement.confirmed && now.saturating_duration_since(placement.placed_at) > timeout
            })
            .cloned()
            .collect();
        for id in expired {
            if let Some(placement) = self.remove_placement(&id) {
                tracing::warn!(
                    worker = %placement.worker_id,
                    task = %id,
                    "placement on a silent worker never reported running; its slot is free"
                );
            }
        }
    }
}

#[cfg(test)]
impl State {
    /// Every placement is on its worker's list and nothing else is; nothing is queued and
    /// placed at once.
    fn assert_consistent(&self) {
        for (id, placement) in &self.placed {
            assert!(
                self.workers[&placement.worker_id].placed.contains(id),
                "{id} is missing from worker {}'s placements",
                placement.worker_id
            );
        }
        let on_workers: usize = self.workers.values().map(|w| w.placed.len()).sum();
        assert_eq!(
            on_workers,
            self.placed.len(),
            "workers list stray placements"
        );
        for id in self.queued.keys() {
            assert!(!self.placed.contains_key(id), "{id} is queued and placed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use claudecluster_proto::v1::{
        ExecutionMode, Priority, RegisterWorker, StreamPlacementsResponse, WorkerHeartbeat,
    };
    use tokio::sync::mpsc;
    use tonic::Status;

    use super::*;
    use crate::state::requirements;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn runs(list: &[(&str, u32)]) -> Vec<RunningWork> {
        list.iter()
            .map(|(id, attempt)| RunningWork {
                id: (*id).to_owned(),
                attempt: *attempt,
            })
            .collect()
    }

    /// A fresh scheduler (as after a restart) with the driver's placement stream connected,
    /// and the far ends of its workers' links.
    struct Cluster {
        state: State,
        placements: mpsc::UnboundedReceiver<Result<StreamPlacementsResponse, Status>>,
        links: HashMap<String, mpsc::Receiver<Result<WorkerLinkResponse, Status>>>,
    }

    impl Cluster {
        fn new() -> Cluster {
            let mut state = State::new(TIMEOUT);
            let (sender, placements) = mpsc::unbounded_channel();
            state.set_placement_stream(sender);
            Cluster {
                state,
                placements,
                links: HashMap::new(),
            }
        }

        fn register(
            &mut self,
            worker_id: &str,
            capacity: u32,
            running: &[(&str, u32)],
            now: Instant,
        ) -> u64 {
            let (replies, link) = mpsc::channel(16);
            self.links.insert(worker_id.to_owned(), link);
            let registration = RegisterWorker {
                worker_id: worker_id.to_owned(),
                address: format!("{worker_id}:50053"),
                execution_mode: ExecutionMode::ProcessPool as i32,
                capacity,
                running: runs(running),
                ..Default::default()
            };
            let link = self.state.register(registration, replies, now);
            self.state.assert_consistent();
            link
        }

        fn heartbeat(
            &mut self,
            worker_id: &str,
            link: u64,
            running: &[(&str, u32)],
            now: Instant,
        ) -> bool {
            let beat = WorkerHeartbeat {
                healthy: true,
                running: runs(running),
                ..Default::default()
            };
            let current = self.state.heartbeat(worker_id, link, beat, now);
            self.state.assert_consistent();
            current
        }

        fn enqueue(&mut self, task_id: &str, attempt: u32) {
            let any = requirements(
                ExecutionMode::Unspecified,
                HashMap::new(),
                Default::default(),
            );
            self.state
                .enqueue(task_id.to_owned(), attempt, Priority::Normal, any);
            self.state.assert_consistent();
        }

        fn release(&mut self, task_id: &str, attempt: u32) {
            self.state.release(task_id, attempt);
            self.state.assert_consistent();
        }

        fn expire(&mut self, now: Instant) {
            self.state.expire(now);
            self.state.assert_consistent();
        }

        /// The placements sent to the driver since last asked: (task, attempt, worker).
        fn placed(&mut self) -> Vec<(String, u32, String)> {
            let mut placed = Vec::new();
            while let Ok(placement) = self.placements.try_recv() {
                let placement = placement.expect("placements are not errors");
                placed.push((placement.task_id, placement.attempt, placement.worker_id));
            }
            placed
        }

        /// The stop-runs sent to `worker_id` since last asked: (runs, reason).
        fn stops(&mut self, worker_id: &str) -> Vec<(Vec<(String, u32)>, String)> {
            let link = self.links.get_mut(worker_id).expect("a registered worker");
            let mut stops = Vec::new();
            while let Ok(reply) = link.try_recv() {
                if let Some(worker_link_response::Message::StopRuns(stop)) =
                    reply.expect("link replies are not errors").message
                {
                    let runs = stop.runs.into_iter().map(|r| (r.id, r.attempt)).collect();
                    stops.push((runs, stop.reason));
                }
            }
            stops
        }

        fn load(&self, worker_id: &str) -> u32 {
            self.state.workers[worker_id].load()
        }

        /// Where `task_id` is placed: (worker, attempt, confirmed).
        fn placement(&self, task_id: &str) -> Option<(&str, u32, bool)> {
            self.state
                .placed
                .get(task_id)
                .map(|p| (p.worker_id.as_str(), p.attempt, p.confirmed))
        }
    }

    fn run(id: &str, attempt: u32) -> Vec<(String, u32)> {
        vec![(id.to_owned(), attempt)]
    }

    #[test]
    fn a_restarted_scheduler_learns_load_from_registrations() {
        let mut cluster = Cluster::new();
        let now = Instant::now();
        // The driver enqueues its pending tasks again before the workers are back.
        for index in 0..6 {
            cluster.enqueue(&format!("new-{index}"), 1);
        }
        assert!(cluster.placed().is_empty(), "no worker yet");

        let w1 = cluster.register("w1", 3, &[("old-a", 1), ("old-b", 2)], now);
        cluster.register("w2", 2, &[("old-c", 1)], now);

        let placed = cluster.placed();
        assert_eq!(
            placed,
            vec![
                ("new-0".to_owned(), 1, "w1".to_owned()),
                ("new-1".to_owned(), 1, "w2".to_owned()),
            ],
            "exactly capacity - running new tasks: (3 - 2) + (2 - 1)"
        );
        assert_eq!((cluster.load("w1"), cluster.load("w2")), (3, 2));
        assert_eq!(cluster.placement("old-b"), Some(("w1", 2, true)));
        assert_eq!(cluster.state.queued_tasks(), 4);
        assert_eq!(cluster.state.placed_tasks(), 5);

        // The next report names the new run too: still full, nothing more placed.
        let running = [("old-a", 1), ("old-b", 2), ("new-0", 1)];
        cluster.heartbeat("w1", w1, &running, now);
        assert!(cluster.placed().is_empty());
        assert_eq!(cluster.load("w1"), 3);
        assert_eq!(cluster.placement("new-0"), Some(("w1", 1, true)));
        assert!(cluster.stops("w1").is_empty() && cluster.stops("w2").is_empty());
    }

    #[test]
    fn heartbeats_free_the_slots_of_runs_that_ended() {
        let mut cluster = Cluster::new();
        let now = Instant::now();
        let link = cluster.register("w", 2, &[], now);
        cluster.enqueue("a", 1);
        cluster.enqueue("b", 1);
        assert_eq!(cluster.placed().len(), 2);
        cluster.heartbeat("w", link, &[("a", 1), ("b", 1)], now);
        cluster.enqueue("c", 1);
        assert!(cluster.placed().is_empty(), "w is full");

        // `a` ended and its release never came (the driver died): the report frees its slot.
        cluster.heartbeat("w", link, &[("b", 1)], now);
        assert_eq!(cluster.placement("a"), None);
        assert_eq!(cluster.placed(), vec![("c".to_owned(), 1, "w".to_owned())]);
        assert_eq!(cluster.load("w"), 2);

        // `b` ended too; `c` was placed a moment ago and may not have started yet.
        cluster.heartbeat("w", link, &[], now);
        assert_eq!(cluster.placement("b"), None);
        assert_eq!(cluster.placement("c"), Some(("w", 1, false)));
        assert_eq!(cluster.load("w"), 1);
    }

    #[test]
    fn a_placement_its_worker_never_reports_expires() {
        let mut cluster = Cluster::new();
        let before = Instant::now();
        let link = cluster.register("w", 1, &[], before);
        cluster.enqueue("a", 1);
        cluster.enqueue("b", 1);
        assert_eq!(cluster.placed(), vec![("a".to_owned(), 1, "w".to_owned())]);

        cluster.heartbeat("w", link, &[], before);
        assert_eq!(cluster.placement("a"), Some(("w", 1, false)), "still young");
        assert!(cluster.placed().is_empty());

        let later = Instant::now() + TIMEOUT * 2;
        cluster.heartbeat("w", link, &[], later);
        assert_eq!(cluster.placement("a"), None);
        assert_eq!(cluster.placed(), vec![("b".to_owned(), 1, "w".to_owned())]);
        assert_eq!(cluster.load("w"), 1);
    }

    #[test]
    fn a_silent_worker_loses_only_the_placements_it_never_reported() {
        let mut cluster = Cluster::new();
        let before = Instant::now();
        cluster.register("w", 2, &[("running", 1)], before);
        cluster.enqueue("unstarted", 1);
        assert_eq!(cluster.load("w"), 2);

        cluster.expire(before + TIMEOUT / 2);
        assert_eq!(cluster.load("w"), 2, "nothing is old enough yet");

        cluster.expire(Instant::now() + TIMEOUT * 2);
        assert_eq!(cluster.placement("unstarted"), None);
        assert_eq!(cluster.placement("running"), Some(("w", 1, true)));
        assert_eq!(cluster.load("w"), 1);
    }

    #[test]
    fn a_stale_worker_is_told_to_stop_a_task_given_to_a_newer_attempt() {
        let mut cluster = Cluster::new();
        let now = Instant::now();
        let w1 = cluster.register("w1", 1, &[], now);
        let w2 = cluster.register("w2", 1, &[], now);
        cluster.enqueue("t", 1);
        assert_eq!(cluster.placed(), vec![("t".to_owned(), 1, "w1".to_owned())]);
        cluster.heartbeat("w1", w1, &[("t", 1)], now);

        // w1 stops answering (SIGSTOP); the driver gives up on it and queues attempt 2.
        let later = now + TIMEOUT * 2;
        cluster.heartbeat("w2", w2, &[], later);
        cluster.expire(later);
        cluster.enqueue("t", 2);
        assert_eq!(cluster.placed(), vec![("t".to_owned(), 2, "w2".to_owned())]);
        let stops = cluster.stops("w1");
        assert_eq!(stops.len(), 1);
        assert_eq!(stops[0].0, run("t", 1));
        assert!(stops[0].1.contains("attempt 2"), "{}", stops[0].1);

        // w1 comes back still running attempt 1: told again, and its slot stays taken.
        cluster.heartbeat("w1", w1, &[("t", 1)], later);
        let stops = cluster.stops("w1");
        assert_eq!(
            stops,
            vec![(
                run("t", 1),
                "attempt 2 of t is placed on worker w2".to_owned()
            )]
        );
        assert_eq!(cluster.placement("t"), Some(("w2", 2, false)));
        assert_eq!(cluster.load("w1"), 1);
        cluster.enqueue("u", 1);
        assert!(
            cluster.placed().is_empty(),
            "w1 still holds the stopping run"
        );

        cluster.heartbeat("w1", w1, &[], later);
        assert_eq!(cluster.load("w1"), 1, "now `u`'s");
        assert_eq!(cluster.placed(), vec![("u".to_owned(), 1, "w1".to_owned())]);
        assert!(cluster.stops("w1").is_empty());
    }

    #[test]
    fn a_run_of_a_task_queued_again_is_stopped_before_its_slot_is_reused() {
        let mut cluster = Cluster::new();
        let now = Instant::now();
        let link = cluster.register("w", 1, &[], now);
        cluster.enqueue("t", 1);
        cluster.heartbeat("w", link, &[("t", 1)], now);
        let later = now + TIMEOUT * 2;
        cluster.expire(later);
        cluster.enqueue("t", 2);
        cluster.placed();
        cluster.stops("w");
        assert_eq!(cluster.state.queued_tasks(), 1, "no healthy worker");

        cluster.heartbeat("w", link, &[("t", 1)], later);
        assert_eq!(
            cluster.stops("w"),
            vec![(run("t", 1), "t is queued again as attempt 2".to_owned())]
        );
        assert!(
            cluster.placed().is_empty(),
            "attempt 1 still holds the slot"
        );

        cluster.heartbeat("w", link, &[], later);
        assert_eq!(cluster.placed(), vec![("t".to_owned(), 2, "w".to_owned())]);
    }

    #[test]
    fn of_two_workers_reporting_one_task_the_higher_attempt_wins() {
        let mut cluster = Cluster::new();
        let now = Instant::now();
        let w1 = cluster.register("w1", 2, &[("t", 1)], now);
        cluster.register("w2", 2, &[("t", 2)], now);
        assert_eq!(cluster.placement("t"), Some(("w2", 2, true)));
        assert_eq!(
            cluster.stops("w1"),
            vec![(run("t", 1), "attempt 2 of t runs on worker w2".to_owned())]
        );
        assert!(cluster.stops("w2").is_empty());
        assert_eq!((cluster.load("w1"), cluster.load("w2")), (1, 1));

        // The older attempt reported again does not take the task back.
        cluster.heartbeat("w1", w1, &[("t", 1)], now);
        assert_eq!(cluster.placement("t"), Some(("w2", 2, true)));
        assert_eq!(cluster.stops("w1").len(), 1);

        // With equal attempts, the worker that had it first keeps it.
        cluster.register("w3", 2, &[("t", 2)], now);
        assert_eq!(cluster.placement("t"), Some(("w2", 2, true)));
        assert_eq!(
            cluster.stops("w3"),
            vec![(run("t", 2), "t already runs on worker w2".to_owned())]
        );
        assert!(cluster.placed().is_empty());
    }

    #[test]
    fn release_frees_only_the_attempt_it_names() {
        let mut cluster = Cluster::new();
        cluster.register("w", 1, &[], Instant::now());
        cluster.enqueue("t", 2);
        cluster.enqueue("u", 1);
        cluster.placed();

        cluster.release("t", 1);
        assert_eq!(
            cluster.placement("t"),
            Some(("w", 2, false)),
            "a late release"
        );
        assert!(cluster.placed().is_empty());

        cluster.release("t", 2);
        assert_eq!(cluster.placement("t"), None);
        assert_eq!(cluster.placed(), vec![("u".to_owned(), 1, "w".to_owned())]);

        cluster.release("u", 0);
        assert_eq!(cluster.placement("u"), None);
        assert_eq!(cluster.load("w"), 0);
    }

    #[test]
    fn a_reregistration_does_not_double_book() {
        let mut cluster = Cluster::new();
        let now = Instant::now();
        let first = cluster.register("w", 2, &[], now);
        cluster.enqueue("a", 1);
        cluster.enqueue("b", 1);
        cluster.heartbeat("w", first, &[("a", 1), ("b", 1)], now);
        cluster.enqueue("c", 1);
        assert_eq!(cluster.placed().len(), 2);

        // The link broke and the worker registered again, running the same two.
        let second = cluster.register("w", 2, &[("a", 1), ("b", 1)], now);
        assert!(cluster.placed().is_empty());
        assert_eq!(cluster.load("w"), 2);
        assert_eq!(cluster.state.placed_tasks(), 2);
        assert!(
            !cluster.heartbeat("w", first, &[], now),
            "the old link is done"
        );
        assert_eq!(cluster.load("w"), 2);

        cluster.register("w", 2, &[("a", 1)], now);
        assert_eq!(cluster.placed(), vec![("c".to_owned(), 1, "w".to_owned())]);
        assert_eq!(cluster.load("w"), 2);
        assert!(!cluster.heartbeat("w", second, &[], now));
    }

    #[test]
    fn enqueueing_a_task_that_runs_does_not_place_it_twice() {
        let mut cluster = Cluster::new();
        let now = Instant::now();
        let w1 = cluster.register("w1", 2, &[], now);
        cluster.register("w2", 2, &[], now);
        cluster.enqueue("t", 1);
        assert_eq!(cluster.placed(), vec![("t".to_owned(), 1, "w1".to_owned())]);
        cluster.heartbeat("w1", w1, &[("t", 1)], now);

        // A restarted driver that did not record the placement enqueues it again: it is told
        // where the task runs, and nothing is placed anew.
        cluster.enqueue("t", 1);
        assert_eq!(cluster.placed(), vec![("t".to_owned(), 1, "w1".to_owned())]);
        assert_eq!(cluster.state.queued_tasks(), 0);
        assert_eq!(cluster.placement("t"), Some(("w1", 1, true)));
        assert_eq!(cluster.load("w1"), 1);

        // A newer attempt replaces the run: its worker is told to stop, and it is placed once.
        cluster.enqueue("t", 2);
        assert_eq!(cluster.placed(), vec![("t".to_owned(), 2, "w2".to_owned())]);
        assert_eq!(
            cluster.stops("w1"),
            vec![(run("t", 1), "t is queued again as attempt 2".to_owned())]
        );
    }

    #[test]
    fn a_queued_task_a_worker_reports_running_leaves_the_queue() {
        let mut cluster = Cluster::new();
        let now = Instant::now();
        cluster.enqueue("t", 1);
        cluster.enqueue("u", 2);
        cluster.register("w2", 1, &[("u", 1)], now);
        assert_eq!(
            cluster.stops("w2"),
            vec![(run("u", 1), "u is queued again as attempt 2".to_owned())]
        );
        assert!(
            cluster.placed().is_empty(),
            "w2's slot is its stopping run's"
        );

        cluster.register("w", 2, &[("t", 1)], now);
        assert_eq!(cluster.placement("t"), Some(("w", 1, true)));
        assert_eq!(
            cluster.placed(),
            vec![("u".to_owned(), 2, "w".to_owned())],
            "`t` is not placed again"
        );
        assert_eq!(cluster.state.queued_tasks(), 0);
    }

    #[test]
    fn a_placement_the_driver_never_received_is_made_again() {
        let mut cluster = Cluster::new();
        cluster.register("w", 1, &[], Instant::now());
        cluster.enqueue("t", 1);
        assert_eq!(cluster.placed().len(), 1);
        // The placement stream broke before the driver read it; it enqueues the task again.
        cluster.enqueue("t", 1);
        assert_eq!(cluster.placed(), vec![("t".to_owned(), 1, "w".to_owned())]);
        assert_eq!(cluster.load("w"), 1);
    }

    #[test]
    fn a_session_reported_as_attempt_zero_keeps_its_placement() {
        let mut cluster = Cluster::new();
        let now = Instant::now();
        let link = cluster.register("w", 2, &[], now);
        cluster.enqueue("session", 1);
        cluster.placed();
        cluster.heartbeat("w", link, &[("session", 0)], now);
        assert!(cluster.stops("w").is_empty());
        assert_eq!(cluster.placement("session"), Some(("w", 1, true)));
        cluster.enqueue("session", 1);
        assert_eq!(
            cluster.placed(),
            vec![("session".to_owned(), 1, "w".to_owned())],
            "the same placement, told again"
        );
        assert_eq!(cluster.load("w"), 1);
        cluster.release("session", 1);
        assert_eq!(cluster.load("w"), 0);
    }

    #[test]
    fn an_older_attempt_a_worker_still_reports_beside_the_newer_is_stopped() {
        let mut cluster = Cluster::new();
        let now = Instant::now();
        cluster.register("w", 3, &[("t", 2), ("t", 1)], now);
        assert_eq!(cluster.placement("t"), Some(("w", 2, true)));
        assert_eq!(
            cluster.stops("w"),
            vec![(run("t", 1), "attempt 2 of t runs on this worker".to_owned())]
        );
        assert_eq!(cluster.load("w"), 2);
    }
}
