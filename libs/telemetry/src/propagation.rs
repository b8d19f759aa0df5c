//! W3C trace context across gRPC hops: the server side continues the trace a caller sends in
//! its metadata (`traceparent`, `tracestate`), and the client side sends the current span's.
//! Tasks keep their place in a trace ([`TraceParent`]) across the queue between submit and run.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::tracing_enabled;

/// The span a served gRPC request runs in; its parent is the caller's span when the caller
/// sent one. Health checks and reflection get none: they are not work.
pub fn server_span<B>(request: &http::Request<B>) -> Span {
    let path = request.uri().path();
    if !tracing_enabled() {
        return tracing::debug_span!("grpc", path = %path);
    }
    if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
        return Span::none();
    }
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let service = service.rsplit('.').next().unwrap_or(service);
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span
}

/// Adds the current span's trace context to an outgoing call.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if !tracing_enabled() {
        return;
    }
    let context = Span::current().context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
    }
}

/// A span's place in its trace, kept so that work done later (a queued task's placement and
/// run) joins the trace of the request that asked for it.
#[derive(Clone, Debug, Default)]
pub struct TraceParent(Option<opentelemetry::Context>);

impl TraceParent {
    /// The place of the span the caller is in.
    pub fn current() -> Self {
        Self::of(&Span::current())
    }

    pub fn of(span: &Span) -> Self {
        if !tracing_enabled() || span.is_none() {
            return TraceParent(None);
        }
        let context = span.context();
        TraceParent(context.span().span_context().is_valid().then_some(context))
    }

    /// Makes `span` a child of this place (a span not yet entered).
    pub fn adopt(&self, span: &Span) {
        if let Some(context) = &self.0 {
            let _ = span.set_parent(context.clone());
        }
    }

    /// The `traceparent` header value of this place, if it has one.
    pub fn header(&self) -> Option<String> {
        let context = self.0.as_ref()?;
        let mut carrier = std::collections::HashMap::new();
        TraceContextPropagator::new().inject_context(context, &mut carrier);
        carrier.remove("traceparent")
    }
}

/// Marks a span as failed, with the reason, in the exported trace.
pub fn record_error(span: &Span, message: &str) {
    if tracing_enabled() {
        span.set_status(opentelemetry::trace::Status::error(message.to_owned()));
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}
