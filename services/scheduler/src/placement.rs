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
