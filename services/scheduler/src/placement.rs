//! The placement policy, as a pure function.
//!
//! A task goes only to a healthy worker that runs the requested execution mode (any worker
//! when none is requested) that carries every label of the task's selector and has a free slot. Among
//! those, the least loaded by fraction of capacity wins; ties go to the worker that was
//! given work least recently, so that equal workers take turns.

use std::collections::{BTreeMap, HashMap};

use claudecluster_proto::v1::{ExecutionMode, TaskNeeds, WorkerAdmits};

/// What a task needs of a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRequirements {
    pub execution_mode: ExecutionMode,
    pub worker_selector: HashMap<String, String>,
    /// Its repository scheme and limits, which the worker must admit.
    pub needs: TaskNeeds,
}

/// A worker as placement sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub worker_id: &'a str,
    pub healthy: bool,
    /// Takes no new work.
    pub draining: bool,
    /// The modes the worker runs tasks in.
    pub execution_modes: &'a [ExecutionMode],
    pub labels: &'a HashMap<String, String>,
    /// What the worker accepts of a task; `None` (a worker that reported nothing) admits only
    /// tasks that ask for nothing beyond the defaults.
    pub admits: Option<&'a WorkerAdmits>,
    pub capacity: u32,
    pub load: u32,
    /// Placement counter value when this worker last got work.
    pub last_placed: u64,
}

impl Candidate<'_> {
    fn runs_mode_of(&self, task: &TaskRequirements) -> bool {
        task.execution_mode == ExecutionMode::Unspecified
            || self.execution_modes.contains(&task.execution_mode)
    }

    fn has_labels_of(&self, task: &TaskRequirements) -> bool {
        task.worker_selector
            .iter()
            .all(|(key, value)| self.labels.get(key) == Some(value))
    }

    fn admits(&self, task: &TaskRequirements) -> bool {
        match self.admits {
            Some(admits) => admits.refusal(&task.needs).is_none(),
            None => task.needs.is_default(),
        }
    }

    fn matches(&self, task: &TaskRequirements) -> bool {
        self.runs_mode_of(task) && self.has_labels_of(task) && self.admits(task)
    }

    fn can_run(&self, task: &TaskRequirements) -> bool {
        self.healthy && !self.draining && self.load < self.capacity && self.matches(task)
    }
}

/// The worker `task` should go to, if any can take it now.
pub fn choose_worker<'a>(
    task: &TaskRequirements,
    candidates: impl IntoIterator<Item = Candidate<'a>>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|candidate| candidate.can_run(task))
        .min_by(|a, b| {
            // load/capacity compared without division: a.load * b.capacity vs b.load * a.capacity
            let left = u64::from(a.load) * u64::from(b.capacity);
            let right = u64::from(b.load) * u64::from(a.capacity);
            left.cmp(&right)
                .then(a.last_placed.cmp(&b.last_placed))
                .then(a.worker_id.cmp(b.worker_id))
        })
        .map(|candidate| candidate.worker_id)
}

/// The workers that can take work now, for one placement round: grouped by what they offer
/// (modes, labels, what they admit), each group ordered as [`choose_worker`] orders workers.
/// A decision looks at the best worker of each group that matches the task, not at every
/// worker: with a few kinds of worker, its cost hardly grows with their number.
pub struct FreeWorkers {
    groups: Vec<Group>,
    /// Each worker with a free slot: its group and its place there.
    members: HashMap<String, (usize, Slot)>,
}

/// Workers that offer the same: a task matches all of them or none.
struct Group {
    execution_modes: Vec<ExecutionMode>,
    labels: HashMap<String, String>,
    admits: Option<WorkerAdmits>,
    free: std::collections::BTreeSet<Slot>,
}

impl Group {
    fn matches(&self, task: &TaskRequirements) -> bool {
        Candidate {
            worker_id: "",
            healthy: true,
            draining: false,
            execution_modes: &self.execution_modes,
            labels: &self.labels,
            admits: self.admits.as_ref(),
            capacity: 1,
            load: 0,
            last_placed: 0,
        }
        .matches(task)
    }
}

/// A worker's place in its group: least loaded by fraction of capacity first, then the one
/// given work least recently, then by id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    load: u32,
    capacity: u32,
    last_placed: u64,
    worker_id: String,
}

impl Ord for Slot {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let left = u64::from(self.load) * u64::from(other.capacity);
        let right = u64::from(other.load) * u64::from(self.capacity);
        left.cmp(&right)
            .then(self.last_placed.cmp(&other.last_placed))
            .then_with(|| self.worker_id.cmp(&other.worker_id))
    }
}

impl PartialOrd for Slot {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl FreeWorkers {
    /// The workers of `candidates` that can take work now, their offers worked out here.
    #[cfg(test)]
    fn new<'a>(candidates: impl IntoIterator<Item = Candidate<'a>>) -> Self {
        let candidates: Vec<(Candidate<'a>, Vec<u8>)> = candidates
            .into_iter()
            .map(|c| {
                let offer = offer_key(c.execution_modes, c.labels, c.admits);
                (c, offer)
            })
            .collect();
        Self::with_offers(
            candidates
                .iter()
                .map(|(candidate, offer)| (candidate.clone(), offer.as_slice())),
        )
    }

    /// The workers of `candidates` that can take work now, each with its [`offer_key`], which
    /// the scheduler works out once per registration.
    pub fn with_offers<'a>(
        candidates: impl IntoIterator<Item = (Candidate<'a>, &'a [u8])>,
    ) -> Self {
        let mut groups: Vec<Group> = Vec::new();
        let mut by_offer: HashMap<&[u8], usize> = HashMap::new();
        let mut members = HashMap::new();
        for (candidate, offer) in candidates {
            if !(candidate.healthy && !candidate.draining && candidate.load < candidate.capacity) {
                continue;
            }
            let group = *by_offer.entry(offer).or_insert_with(|| {
                groups.push(Group {
                    execution_modes: candidate.execution_modes.to_vec(),
                    labels: candidate.labels.clone(),
                    admits: candidate.admits.cloned(),
                    free: Default::default(),
                });
                groups.len() - 1
            });
            let slot = Slot {
                load: candidate.load,
                capacity: candidate.capacity,
                last_placed: candidate.last_placed,
                worker_id: candidate.worker_id.to_owned(),
            };
            groups[group].free.insert(slot.clone());
            members.insert(candidate.worker_id.to_owned(), (group, slot));
        }
        FreeWorkers { groups, members }
    }

    /// No worker has a free slot.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The worker `task` should go to, as [`choose_worker`] would choose it.
    pub fn choose(&self, task: &TaskRequirements) -> Option<&str> {
        self.groups
            .iter()
            .filter(|group| !group.free.is_empty() && group.matches(task))
            .filter_map(|group| group.free.first())
            .min()
            .map(|slot| slot.worker_id.as_str())
    }

    /// `worker_id` took a task, as placement `placed`: one slot fewer, and last in its turn.
    pub fn took(&mut self, worker_id: &str, placed: u64) {
        let Some((group, mut slot)) = self.members.remove(worker_id) else {
            return;
        };
        let free = &mut self.groups[group].free;
        free.remove(&slot);
        slot.load += 1;
        slot.last_placed = placed;
        if slot.load < slot.capacity {
            free.insert(slot.clone());
            self.members.insert(worker_id.to_owned(), (group, slot));
        }
    }
}

/// What a worker offers (its modes, labels, and what it admits), as bytes that are equal
/// exactly when two workers offer the same.
pub fn offer_key(
    execution_modes: &[ExecutionMode],
    labels: &HashMap<String, String>,
    admits: Option<&WorkerAdmits>,
) -> Vec<u8> {
    let mut key = Vec::new();
    for mode in execution_modes {
        key.extend_from_slice(&(*mode as i32).to_le_bytes());
    }
    key.push(0xff);
    let mut labels: Vec<_> = labels.iter().collect();
    labels.sort();
    for (name, value) in labels {
        // Lengths first: `a=bc` and `ab=c` differ.
        for text in [name, value] {
            key.extend_from_slice(&(text.len() as u64).to_le_bytes());
            key.extend_from_slice(text.as_bytes());
        }
    }
    key.push(0xff);
    if let Some(admits) = admits {
        key.push(1);
        key.extend_from_slice(format!("{admits:?}").as_bytes());
    }
    key
}

/// Why nothing can run `task`, for the task's status reason.
pub fn explain_unplaceable<'a>(
    task: &TaskRequirements,
    candidates: impl IntoIterator<Item = Candidate<'a>>,
) -> String {
    let candidates: Vec<_> = candidates.into_iter().collect();
    let matching: Vec<_> = candidates.iter().filter(|c| c.matches(task)).collect();
    let mode = if task.execution_mode == ExecutionMode::Unspecified {
        String::new()
    } else {
        format!("{} ", task.execution_mode.label())
    };
    let selector = if task.worker_selector.is_empty() {
        String::new()
    } else {
        let sorted: BTreeMap<_, _> = task.worker_selector.iter().collect();
        let labels: Vec<_> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(" with labels {}", labels.join(","))
    };
    let refusal = candidates
        .iter()
        .filter(|c| c.runs_mode_of(task) && c.has_labels_of(task))
        .find_map(|c| c.admits.and_then(|admits| admits.refusal(&task.needs)));
    if let (true, Some(refusal)) = (matching.is_empty(), refusal) {
        format!("waiting for a {mode}worker{selector} that admits the task: {refusal}")
    } else if matching.is_empty() {
        format!("waiting for a {mode}worker{selector}: none is registered")
    } else if !matching.iter().any(|c| c.healthy) {
        format!("waiting for a {mode}worker{selector}: none is healthy")
    } else if matching.iter().all(|c| c.draining) {
        format!("waiting for a {mode}worker{selector}: all are draining")
    } else {
        format!("waiting for a free slot on a {mode}worker{selector}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const PROCESS: &[ExecutionMode] = &[ExecutionMode::ProcessPool];
    const CONTAINER: &[ExecutionMode] = &[ExecutionMode::ContainerAgentic];
    const DUAL: &[ExecutionMode] = &[ExecutionMode::ProcessPool, ExecutionMode::ContainerAgentic];

    fn candidate<'a>(
        id: &'a str,
        modes: &'a [ExecutionMode],
        labels: &'a HashMap<String, String>,
        capacity: u32,
        load: u32,
    ) -> Candidate<'a> {
        Candidate {
            worker_id: id,
            healthy: true,
            draining: false,
            execution_modes: modes,
            labels,
            admits: None,
            capacity,
            load,
            last_placed: 0,
        }
    }

    fn any_task() -> TaskRequirements {
        TaskRequirements {
            execution_mode: ExecutionMode::Unspecified,
            worker_selector: HashMap::new(),
            needs: TaskNeeds::default(),
        }
    }

    #[test]
    fn least_loaded_by_fraction_wins() {
        let none = labels(&[]);
        let chosen = choose_worker(
            &any_task(),
            [
                candidate("big", PROCESS, &none, 10, 4),
                candidate("small", PROCESS, &none, 2, 1),
            ],
        );
        assert_eq!(chosen, Some("big"), "4/10 is less loaded than 1/2");
    }

    #[test]
    fn full_unhealthy_and_wrong_mode_workers_are_skipped() {
        let none = labels(&[]);
        let mut sick = candidate("sick", CONTAINER, &none, 4, 0);
        sick.healthy = false;
        let task = TaskRequirements {
            execution_mode: ExecutionMode::ContainerAgentic,
            worker_selector: HashMap::new(),
            needs: TaskNeeds::default(),
        };
        let chosen = choose_worker(
            &task,
            [
                sick,
                candidate("full", CONTAINER, &none, 2, 2),
                candidate("process", PROCESS, &none, 4, 0),
            ],
        );
        assert_eq!(chosen, None);
    }

    #[test]
    fn a_dual_mode_worker_takes_tasks_of_either_mode() {
        let none = labels(&[]);
        for mode in [ExecutionMode::ProcessPool, ExecutionMode::ContainerAgentic] {
            let task = TaskRequirements {
                execution_mode: mode,
                worker_selector: HashMap::new(),
                needs: TaskNeeds::default(),
            };
            let chosen = choose_worker(&task, [candidate("dual", DUAL, &none, 2, 0)]);
            assert_eq!(chosen, Some("dual"), "{mode:?}");
        }
    }

    #[test]
    fn selector_labels_must_all_match() {
        let gpu = labels(&[("gpu", "true"), ("zone", "eu")]);
        let plain = labels(&[("zone", "eu")]);
        let task = TaskRequirements {
            execution_mode: ExecutionMode::Unspecified,
            worker_selector: labels(&[("gpu", "true"), ("zone", "eu")]),
            needs: TaskNeeds::default(),
        };
        let chosen = choose_worker(
            &task,
            [
                candidate("plain", PROCESS, &plain, 4, 0),
                candidate("gpu", PROCESS, &gpu, 4, 3),
            ],
        );
        assert_eq!(chosen, Some("gpu"));
    }

    #[test]
    fn equal_workers_take_turns() {
        let none = labels(&[]);
        let mut first = candidate("a", PROCESS, &none, 4, 0);
        first.last_placed = 7;
        let second = candidate("b", PROCESS, &none, 4, 0);
        assert_eq!(choose_worker(&any_task(), [first, second]), Some("b"));
    }

    /// A small generator, so the test needs no crate: the same sequence on every run.
    struct Numbers(u64);

    impl Numbers {
        fn below(&mut self, bound: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % bound
        }
    }

    #[test]
    fn the_free_workers_index_chooses_as_the_scan_does() {
        let zones: Vec<HashMap<String, String>> = (0..3)
            .map(|zone| labels(&[("zone", &format!("z{zone}"))]))
            .collect();
        let none = labels(&[]);
        let modes = [PROCESS, CONTAINER, DUAL];
        let admits = WorkerAdmits {
            repo_schemes: vec!["https".into()],
            max_memory_bytes: 1 << 30,
            ..WorkerAdmits::default()
        };
        let mut numbers = Numbers(7);
        for round in 0..200 {
            let ids: Vec<String> = (0..1 + numbers.below(12))
                .map(|i| format!("w{i}"))
                .collect();
            let mut workers: Vec<Candidate> = ids
                .iter()
                .map(|id| {
                    let capacity = numbers.below(4) as u32;
                    let mut worker = candidate(
                        id,
                        modes[numbers.below(3) as usize],
                        if numbers.below(4) == 0 {
                            &none
                        } else {
                            &zones[numbers.below(3) as usize]
                        },
                        capacity,
                        numbers.below(u64::from(capacity) + 1) as u32,
                    );
                    worker.healthy = numbers.below(6) != 0;
                    worker.draining = numbers.below(8) == 0;
                    worker.last_placed = numbers.below(5);
                    worker.admits = (numbers.below(3) == 0).then_some(&admits);
                    worker
                })
                .collect();
            let mut free = FreeWorkers::new(workers.iter().cloned());
            for placed in 0..20 {
                let task = TaskRequirements {
                    execution_mode: [
                        ExecutionMode::Unspecified,
                        ExecutionMode::ProcessPool,
                        ExecutionMode::ContainerAgentic,
                    ][numbers.below(3) as usize],
                    worker_selector: if numbers.below(2) == 0 {
                        HashMap::new()
                    } else {
                        zones[numbers.below(3) as usize].clone()
                    },
                    needs: TaskNeeds {
                        repo_scheme: ["", "https", "ssh"][numbers.below(3) as usize].into(),
                        ..TaskNeeds::default()
                    },
                };
                let scanned = choose_worker(&task, workers.iter().cloned());
                assert_eq!(free.choose(&task), scanned, "round {round}, task {placed}");
                if let Some(chosen) = scanned.map(str::to_owned) {
                    let stamp = 100 + placed;
                    free.took(&chosen, stamp);
                    let worker = workers.iter_mut().find(|w| w.worker_id == chosen).unwrap();
                    worker.load += 1;
                    worker.last_placed = stamp;
                }
            }
        }
    }

    #[test]
    fn unplaceable_tasks_say_why() {
        let none = labels(&[]);
        let task = TaskRequirements {
            execution_mode: ExecutionMode::ContainerAgentic,
            worker_selector: HashMap::new(),
            needs: TaskNeeds::default(),
        };
        let reason = explain_unplaceable(&task, [candidate("p", PROCESS, &none, 1, 0)]);
        assert_eq!(
            reason,
            "waiting for a container_agentic worker: none is registered"
        );
        let reason = explain_unplaceable(&any_task(), [candidate("p", PROCESS, &none, 1, 1)]);
        assert_eq!(reason, "waiting for a free slot on a worker");
    }
}
