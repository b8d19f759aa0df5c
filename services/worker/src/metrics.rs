//! The worker's Prometheus families, in the process's registry.

use std::sync::{OnceLock, Weak};

use claudecluster_proto::v1::ExecutionMode;
use claudecluster_telemetry::metrics::{before_scrape, latency_histogram, register};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::runtime::Runtime;

pub(crate) type Labels = Vec<(&'static str, String)>;

pub(crate) struct WorkerMetrics {
    /// Creating and starting an agent, by mode (a container, or a process).
    pub launch_latency: Family<Labels, Histogram, fn() -> Histogram>,
    /// Handing a task to a warm agent, by mode.
    pub warm_handout_latency: Family<Labels, Histogram, fn() -> Histogram>,
    pub warm_hits: Family<Labels, Counter>,
    pub warm_misses: Family<Labels, Counter>,
    /// Task runs started, by mode.
    pub runs: Family<Labels, Counter>,
    /// Containers and networks of ended agents that could not be removed at once (they are
    /// retried).
    pub removal_failures: Family<Labels, Counter>,
    warm_pool_size: Family<Labels, Gauge>,
    slots: Family<Labels, Gauge>,
}

pub(crate) fn mode_label(mode: ExecutionMode) -> Labels {
    let mode = match mode {
        ExecutionMode::ContainerAgentic => "container_agentic",
        _ => "process_pool",
    };
    vec![("mode", mode.to_owned())]
}

pub(crate) fn metrics() -> &'static WorkerMetrics {
    static METRICS: OnceLock<WorkerMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let metrics = WorkerMetrics {
            launch_latency: Family::new_with_constructor(latency_histogram),
            warm_handout_latency: Family::new_with_constructor(latency_histogram),
            warm_hits: Family::default(),
            warm_misses: Family::default(),
            runs: Family::default(),
            removal_failures: Family::default(),
            warm_pool_size: Family::default(),
            slots: Family::default(),
        };
        register(
            "claudecluster_worker_launch_latency_seconds",
            "Time to create and start an agent (a container: create and start; a process: spawn), by mode",
            metrics.launch_latency.clone(),
        );
        register(
            "claudecluster_worker_warm_handout_latency_seconds",
            "Time to hand a task to a warm agent, by mode",
            metrics.warm_handout_latency.clone(),
        );
        register(
            "claudecluster_worker_warm_pool_hits",
            "Tasks given a warm agent, by mode",
            metrics.warm_hits.clone(),
        );
        register(
            "claudecluster_worker_warm_pool_misses",
            "Tasks that found no fitting warm agent in a warm pool, by mode",
            metrics.warm_misses.clone(),
        );
        register(
            "claudecluster_worker_runs",
            "Task runs started, by mode",
            metrics.runs.clone(),
        );
        register(
            "claudecluster_worker_removal_failures",
            "Containers and networks of ended agents the worker could not remove at once, by kind; each is retried at the next health check",
            metrics.removal_failures.clone(),
        );
        register(
            "claudecluster_worker_warm_pool_size",
            "Idle warm agents, by mode",
            metrics.warm_pool_size.clone(),
        );
        register(
            "claudecluster_worker_slots",
            "The worker's slots, by state (used or free)",
            metrics.slots.clone(),
        );
        metrics
    })
}

/// Sets the gauges from `runtime` before each scrape, while the worker lives.
pub(crate) fn observe(runtime: Weak<Runtime>) {
    let metrics = metrics();
    before_scrape(move || {
        let Some(runtime) = runtime.upgrade() else {
            return;
        };
        metrics.warm_pool_size.clear();
        for (mode, idle) in runtime.idle_warm_agents_by_mode() {
            metrics
                .warm_pool_size
                .get_or_create(&mode_label(mode))
                .set(idle as i64);
        }
        let capacity = runtime.capacity();
        let free = (runtime.available_slots() as u32).min(capacity);
        for (state, count) in [("used", capacity - free), ("free", free)] {
            metrics
                .slots
                .get_or_create(&vec![("state", state.to_owned())])
                .set(i64::from(count));
        }
    });
}
