//! Spans of an agent's run, made from its stream-json events as they arrive: the run itself,
//! one span per tool call (from the call to its result) and one per API retry (from the
//! retry's announcement to the agent's next event, which is the wait before the retry).

use std::collections::HashMap;
use std::sync::Mutex;

use claudecluster_proto::v1::event::Kind;
use claudecluster_telemetry::propagation::record_error;
use tracing::Span;

pub(crate) struct AgentSpans {
    run: Span,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    /// By tool-use id.
    tools: HashMap<String, Span>,
    retry: Option<Span>,
}

impl AgentSpans {
    /// Spans of one run (or one session turn), as children of the current span.
    pub fn start(name: &'static str) -> Self {
        AgentSpans {
            run: tracing::info_span!(
                "agent.run",
                otel.name = name,
                agent.model = tracing::field::Empty,
                agent.session_id = tracing::field::Empty,
                agent.turns = tracing::field::Empty,
                agent.cost_usd = tracing::field::Empty,
            ),
            open: Mutex::default(),
        }
    }

    pub fn observe(&self, kind: &Kind) {
        let mut open = self.open.lock().expect("agent span lock poisoned");
        // A retry's span covers the wait until the agent's next event.
        open.retry = None;
        match kind {
            Kind::Init(init) => {
                self.run.record("agent.model", init.model.as_str());
                self.run
                    .record("agent.session_id", init.agent_session_id.as_str());
            }
            Kind::ToolUse(tool) => {
                let span = tracing::info_span!(
                    parent: &self.run,
                    "agent.tool",
                    otel.name = %format_args!("tool {}", tool.name),
                    tool.name = %tool.name,
                    tool.use_id = %tool.tool_use_id,
                    tool.error = tracing::field::Empty,
                );
                open.tools.insert(tool.tool_use_id.clone(), span);
            }
            Kind::ToolResult(result) => {
                if let Some(span) = open.tools.remove(&result.tool_use_id) {
                    span.record("tool.error", result.is_error);
                    if result.is_error {
                        record_error(&span, "the tool reported an error");
                    }
                }
            }
            Kind::PermissionDenied(denied) => {
                if let Some(span) = open.tools.remove(&denied.tool_use_id) {
                    span.record("tool.error", true);
                    record_error(&span, &denied.message);
                }
            }
            Kind::ApiRetry(retry) => {
                open.retry = Some(tracing::info_span!(
                    parent: &self.run,
                    "agent.api_retry",
                    otel.name = "API retry",
                    retry.attempt = retry.attempt,
                    retry.max_retries = retry.max_retries,
                    retry.delay_ms = retry.retry_delay_ms,
                    http.response.status_code = retry.error_status,
                    error.message = %retry.error,
                ));
            }
            Kind::Result(result) => {
                open.tools.clear();
                self.run.record("agent.turns", result.num_turns);
                self.run.record("agent.cost_usd", result.total_cost_usd);
                if result.is_error {
                    record_error(&self.run, &result.subtype);
                }
            }
            _ => {}
        }
    }
}
