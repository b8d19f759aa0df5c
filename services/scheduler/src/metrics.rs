//! The scheduler's Prometheus families, in the process's registry.

use std::sync::{Mutex, OnceLock, Weak};

use claudecluster_proto::v1::ExecutionMode;
use claudecluster_telemetry::metrics::{before_scrape, latency_histogram, register};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::state::State;

type Labels = Vec<(&'static str, String)>;

pub(crate) struct SchedulerMetrics {
    /// From a task's enqueue to its placement on a worker.
    pub placement_latency: Histogram,
    pub placements: Counter,
    queue_depth: Family<Labels, Gauge>,
    workers: Family<Labels, Gauge>,
    slots: Family<Labels, Gauge>,
}

pub(crate) fn metrics() -> &'static SchedulerMetrics {
    static METRICS: OnceLock<SchedulerMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let metrics = SchedulerMetrics {
            placement_latency: latency_histogram(),
            placements: Counter::default(),
            queue_depth: Family::default(),
            workers: Family::default(),
            slots: Family::default(),
        };
        register(
            "claudecluster_scheduler_placement_latency_seconds",
            "Time from a task's enqueue to its placement on a worker",
            metrics.placement_latency.clone(),
        );
        register(
            "claudecluster_scheduler_placements",
            "Tasks and sessions placed on workers",
            metrics.placements.clone(),
        );
        register(
            "claudecluster_scheduler_queue_depth",
            "Tasks and sessions waiting in the queue, by priority",
            metrics.queue_depth.clone(),
        );
        register(
            "claudecluster_scheduler_workers",
            "Registered workers, by default execution mode and health",
            metrics.workers.clone(),
        );
        register(
            "claudecluster_scheduler_worker_slots",
            "Slots of registered workers, by worker and state (used or free)",
            metrics.slots.clone(),
        );
        metrics
    })
}

/// Sets the gauges from `state` before each scrape, while the scheduler lives.
pub(crate) fn observe(state: Weak<Mutex<State>>) {
    let metrics = metrics();
    before_scrape(move || {
        let Some(state) = state.upgrade() else { return };
        let state = state.lock().expect("scheduler state lock poisoned");
        metrics.queue_depth.clear();
        for priority in ["low", "normal", "high", "critical"] {
            metrics
                .queue_depth
                .get_or_create(&vec![("priority", priority.to_owned())])
                .set(0);
        }
        for (priority, depth) in state.queued_by_priority() {
            metrics
                .queue_depth
                .get_or_create(&vec![("priority", priority)])
                .set(depth as i64);
        }
        metrics.workers.clear();
        metrics.slots.clear();
        for worker in state.workers() {
            let mode = ExecutionMode::try_from(worker.execution_mode)
                .unwrap_or_default()
                .as_str_name()
                .trim_start_matches("EXECUTION_MODE_")
                .to_ascii_lowercase();
            let health = if worker.healthy {
                "healthy"
            } else {
                "unhealthy"
            };
            metrics
                .workers
                .get_or_create(&vec![("mode", mode), ("health", health.to_owned())])
                .inc();
            let used = worker.load.min(worker.capacity);
            for (slot_state, count) in [("used", used), ("free", worker.capacity - used)] {
                metrics
                    .slots
                    .get_or_create(&vec![
                        ("worker", worker.worker_id.clone()),
                        ("state", slot_state.to_owned()),
                    ])
                    .set(i64::from(count));
            }
        }
    });
}
