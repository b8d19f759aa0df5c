//! Placement on synthetic workers and tasks, for `cluster-bench`: no network, the scheduler's
//! own decisions only.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use claudecluster_config::SchedulerConfig;
use claudecluster_proto::v1::{ExecutionMode, Priority, RegisterWorker};
use tokio::sync::mpsc;

use crate::state::{State, requirements};

/// What a placement round did.
pub struct PlacementRound {
    pub placed: usize,
    pub elapsed: Duration,
}

/// Registers `workers` workers of `capacity` slots in four zones, queues `tasks` tasks of mixed
/// priorities (half of them selecting a zone), then connects the driver's placement stream and
/// times the round that places every task there is room for.
pub fn placement_round(workers: usize, capacity: u32, tasks: usize) -> PlacementRound {
    let mut state = State::new(SchedulerConfig::default().heartbeat_timeout.get());
    let mut links = Vec::with_capacity(workers);
    for index in 0..workers {
        let (replies, link) = mpsc::channel(1);
        links.push(link);
        let registration = RegisterWorker {
            worker_id: format!("worker-{index}"),
            address: format!("10.0.{}.{}:50053", index / 250, index % 250),
            execution_mode: ExecutionMode::ProcessPool as i32,
            capacity,
            labels: HashMap::from([("zone".to_owned(), format!("z{}", index % 4))]),
            version: String::new(),
            execution_modes: vec![ExecutionMode::ProcessPool as i32],
            running: Vec::new(),
            admits: None,
        };
        state.register(registration, replies, Instant::now());
    }
    let priorities = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ];
    for index in 0..tasks {
        let selector = if index % 2 == 0 {
            HashMap::from([("zone".to_owned(), format!("z{}", (index / 2) % 4))])
        } else {
            HashMap::new()
        };
        state.enqueue(
            format!("task-{index}"),
            1,
            priorities[index % 4],
            requirements(ExecutionMode::Unspecified, selector, Default::default()),
        );
    }
    let (placements, mut received) = mpsc::unbounded_channel();
    let started = Instant::now();
    state.set_placement_stream(placements);
    let elapsed = started.elapsed();
    let mut placed = 0;
    while received.try_recv().is_ok() {
        placed += 1;
    }
    drop(links);
    PlacementRound { placed, elapsed }
}

/// The time one more task takes to enqueue while every slot of 10 single-slot workers is
/// taken and `queued` tasks already wait: the cost a busy driver pays per submission.
pub fn enqueue_while_full(queued: usize) -> Duration {
    const MEASURED: usize = 1_000;
    let mut state = State::new(SchedulerConfig::default().heartbeat_timeout.get());
    let mut links = Vec::new();
    for index in 0..10 {
        let (replies, link) = mpsc::channel(1);
        links.push(link);
        state.register(
            RegisterWorker {
                worker_id: format!("worker-{index}"),
                address: format!("10.0.0.{index}:50053"),
                execution_mode: ExecutionMode::ProcessPool as i32,
                capacity: 1,
                execution_modes: vec![ExecutionMode::ProcessPool as i32],
                ..Default::default()
            },
            replies,
            Instant::now(),
        );
    }
    let (placements, _received) = mpsc::unbounded_channel();
    state.set_placement_stream(placements);
    let mut enqueue = |index: usize| {
        state.enqueue(
            format!("task-{index}"),
            1,
            Priority::Normal,
            requirements(
                ExecutionMode::Unspecified,
                HashMap::new(),
                Default::default(),
            ),
        );
    };
    for index in 0..queued + 10 {
        enqueue(index);
    }
    let started = Instant::now();
    for index in 0..MEASURED {
        enqueue(queued + 10 + index);
    }
    drop(links);
    started.elapsed() / MEASURED as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_places_what_fits() {
        assert_eq!(placement_round(8, 2, 10).placed, 10);
        assert_eq!(placement_round(4, 2, 100).placed, 8, "eight slots in all");
    }
}
