//! Logs, traces and metrics for every ClaudeCluster process.
//!
//! - Logs go to stderr, filtered by `CLAUDECLUSTER_LOG` (or `RUST_LOG`), `info` by default, as
//!   text or as JSON lines that carry the trace and span ids (`telemetry.logFormat`).
//! - Traces are exported over OTLP/gRPC when `telemetry.otlpEndpoint` or the standard
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` names a collector; `OTEL_SERVICE_NAME` and
//!   `OTEL_RESOURCE_ATTRIBUTES` are honoured. W3C trace context travels in gRPC metadata on
//!   every hop ([`propagation`]).
//! - Metrics are kept in one Prometheus registry per process and served on `/metrics` at
//!   `telemetry.metricsListen` ([`metrics`]).

mod logs;
pub use logs::{civil_from_days, rfc3339};
pub mod metrics;
pub mod propagation;

use std::sync::atomic::{AtomicBool, Ordering};

use claudecluster_config::{LogFormat, TelemetryConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The standard variable naming the OTLP collector when the configuration does not.
pub const OTLP_ENDPOINT_VARIABLE: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Whether spans are handed to OpenTelemetry in this process; when not, request spans stay at
/// debug level and no trace context is read or sent, so that tracing off costs nothing.
static TRACING: AtomicBool = AtomicBool::new(false);

pub(crate) fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// What [`init_with`] set up; [`Telemetry::shutdown`] sends the spans still buffered.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops exporting. Called once the services have stopped.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            eprintln!("claudecluster: exporting the last spans failed: {err}");
        }
    }
}

/// Text logs on stderr, for the command-line client and anything without configuration.
pub fn init() {
    let _ = init_with("claudecluster", &TelemetryConfig::default());
}

/// Sets up logs and, when a collector is named, trace export, for a process that reports as
/// `service` (`OTEL_SERVICE_NAME` overrides it). Must run inside the Tokio runtime: the OTLP
/// exporter's connection lives on it.
pub fn init_with(service: &str, config: &TelemetryConfig) -> Result<Telemetry, String> {
    let endpoint = config
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var(OTLP_ENDPOINT_VARIABLE).ok())
        .filter(|endpoint| !endpoint.trim().is_empty());
    let provider = endpoint
        .map(|endpoint| tracer_provider(service, &endpoint))
        .transpose()?;
    // Spans of the cluster's own work are exported whatever the log level: the log filter
    // applies to the log lines only.
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("claudecluster"))
            .with_location(false)
            .with_threads(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("claudecluster", tracing::Level::INFO),
            )
    });
    let (text, json) = match config.log_format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colours for a terminal only: not in files, journald or `docker logs`.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_target(false),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .event_format(logs::JsonLines),
            ),
        ),
    };
    // A second call (tests that start several services in one process) keeps the first.
    let installed = tracing_subscriber::registry()
        .with(otel)
        .with(text.with_filter(EnvFilter::new(log_filter())))
        .with(json.with_filter(EnvFilter::new(log_filter())))
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        TRACING.store(true, Ordering::Relaxed);
    }
    Ok(Telemetry {
        provider: provider.filter(|_| installed),
    })
}

fn log_filter() -> String {
    std::env::var("CLAUDECLUSTER_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info,h2=warn,tower=warn,hyper=warn,opentelemetry=warn".to_owned())
}

fn tracer_provider(service: &str, endpoint: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|err| format!("cannot export traces to {endpoint}: {err}"))?;
    // The resource builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the
    // service's own name applies only when the environment names none.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}
