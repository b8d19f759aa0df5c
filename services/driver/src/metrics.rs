//! The driver's Prometheus families, in the process's registry. The driver sees every agent
//! event of the cluster, so the agents' own counts (turns, tool calls, tokens, cost) are kept
//! here.

use std::sync::{OnceLock, Weak};

use claudecluster_proto::v1::ExecutionMode;
use claudecluster_telemetry::metrics::{before_scrape, latency_histogram, register};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::db::UsageRow;
use crate::store::TaskStore;

pub(crate) type Labels = Vec<(&'static str, String)>;

pub(crate) struct DriverMetrics {
    tasks: Family<Labels, Gauge>,
    pub tasks_submitted: Family<Labels, Counter>,
    pub tasks_ended: Family<Labels, Counter>,
    /// From a task's submission to its agent's first event.
    pub first_event_latency: Histogram,
    pub agent_turns: Family<Labels, Counter>,
    pub tool_calls: Family<Labels, Counter>,
    tokens: Family<Labels, Counter>,
    cost: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub stream_subscribers: Family<Labels, Gauge>,
    pub store_latency: Family<Labels, Histogram, fn() -> Histogram>,
}

pub(crate) fn mode_label(mode: i32) -> String {
    match ExecutionMode::try_from(mode).unwrap_or_default() {
        ExecutionMode::ContainerAgentic => "container_agentic",
        ExecutionMode::ProcessPool => "process_pool",
        _ => "default",
    }
    .to_owned()
}

pub(crate) fn metrics() -> &'static DriverMetrics {
    static METRICS: OnceLock<DriverMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let metrics = DriverMetrics {
            tasks: Family::default(),
            tasks_submitted: Family::default(),
            tasks_ended: Family::default(),
            first_event_latency: latency_histogram(),
            agent_turns: Family::default(),
            tool_calls: Family::default(),
            tokens: Family::default(),
            cost: Family::default(),
            stream_subscribers: Family::default(),
            store_latency: Family::new_with_constructor(latency_histogram),
        };
        register(
            "claudecluster_driver_tasks",
            "Tasks not yet ended, by state and requested execution mode",
            metrics.tasks.clone(),
        );
        register(
            "claudecluster_driver_tasks_submitted",
            "Tasks submitted, by requested execution mode",
            metrics.tasks_submitted.clone(),
        );
        register(
            "claudecluster_driver_tasks_ended",
            "Tasks ended, by final state and requested execution mode",
            metrics.tasks_ended.clone(),
        );
        register(
            "claudecluster_driver_first_event_latency_seconds",
            "Time from a task's submission to its agent's first event",
            metrics.first_event_latency.clone(),
        );
        register(
            "claudecluster_driver_agent_turns",
            "Agent turns reported in results, by kind (task or session)",
            metrics.agent_turns.clone(),
        );
        register(
            "claudecluster_driver_tool_calls",
            "Agent tool calls, by tool",
            metrics.tool_calls.clone(),
        );
        register(
            "claudecluster_driver_tokens",
            "Tokens agents reported, by model and kind (input, output, cache_write, cache_read)",
            metrics.tokens.clone(),
        );
        register(
            "claudecluster_driver_cost_usd",
            "Cost agents reported in USD, by model",
            metrics.cost.clone(),
        );
        register(
            "claudecluster_driver_stream_subscribers",
            "Open event streams, by kind (task or session)",
            metrics.stream_subscribers.clone(),
        );
        register(
            "claudecluster_driver_store_latency_seconds",
            "Time the store takes, by operation",
            metrics.store_latency.clone(),
        );
        metrics
    })
}

impl DriverMetrics {
    pub fn observe_usage(&self, row: &UsageRow) {
        let model = if row.model.is_empty() {
            "unknown".to_owned()
        } else {
            row.model.clone()
        };
        self.cost
            .get_or_create(&vec![("model", model.clone())])
            .inc_by(row.cost_usd);
        for (kind, count) in [
            ("input", row.tokens.input_tokens),
            ("output", row.tokens.output_tokens),
            ("cache_write", row.tokens.cache_creation_input_tokens),
            ("cache_read", row.tokens.cache_read_input_tokens),
        ] {
            self.tokens
                .get_or_create(&vec![("model", model.clone()), ("kind", kind.to_owned())])
                .inc_by(count);
        }
    }
}

/// Sets the task gauge from the live tasks before each scrape, while the store lives.
pub(crate) fn observe(store: Weak<TaskStore>) {
    let metrics = metrics();
    before_scrape(move || {
        let Some(store) = store.upgrade() else { return };
        metrics.tasks.clear();
        for ((state, mode), count) in store.live_counts() {
            metrics
                .tasks
                .get_or_create(&vec![("state", state), ("mode", mode)])
                .set(count as i64);
        }
    });
}

/// Counts an open stream until dropped.
pub(crate) struct Subscriber(&'static str);

impl Subscriber {
    pub fn new(kind: &'static str) -> Subscriber {
        metrics()
            .stream_subscribers
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc();
        Subscriber(kind)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        metrics()
            .stream_subscribers
            .get_or_create(&vec![("kind", self.0.to_owned())])
            .dec();
    }
}
