//! Agent events as claudecluster.v1 events.

use claudecluster_agent_protocol::{AgentEvent, ResultEvent};
use claudecluster_proto::v1::{self, event::Kind, output_line::Stream};

use crate::execution::{OutputLine, OutputStream};

pub fn agent_event(event: AgentEvent) -> Kind {
    match event {
        AgentEvent::Init(init) => Kind::Init(v1::AgentInit {
            agent_session_id: init.session_id,
            model: init.model,
            cwd: init.cwd,
            tools: init.tools,
            permission_mode: init.permission_mode,
            claude_code_version: init.claude_code_version,
        }),
        AgentEvent::Text {
            text,
            thinking,
            api_error,
        } => Kind::Text(v1::AgentText {
            text,
            thinking,
            api_error,
        }),
        AgentEvent::ToolUse { id, name, input } => Kind::ToolUse(v1::AgentToolUse {
            tool_use_id: id,
            name,
            input_json: input.to_string(),
        }),
        AgentEvent::ToolResult {
            tool_use_id,
            content,
            is_error,
        } => Kind::ToolResult(v1::AgentToolResult {
            tool_use_id,
            content,
            is_error,
        }),
        AgentEvent::ApiRetry {
            attempt,
            max_retries,
            retry_delay_ms,
            error_status,
            error,
        } => Kind::ApiRetry(v1::AgentApiRetry {
            attempt,
            max_retries,
            retry_delay_ms,
            error_status,
            error,
        }),
        AgentEvent::PermissionDenied {
            tool_name,
            tool_use_id,
            message,
        } => Kind::PermissionDenied(v1::AgentPermissionDenied {
            tool_name,
            tool_use_id,
            message,
        }),
        AgentEvent::Result(result) => Kind::Result(agent_result(&result)),
        AgentEvent::Other {
            event_type,
            subtype,
            json,
        } => Kind::Other(v1::AgentOtherEvent {
            r#type: event_type,
            subtype: subtype.unwrap_or_default(),
            json,
        }),
    }
}

pub fn agent_result(result: &ResultEvent) -> v1::AgentResult {
    v1::AgentResult {
        subtype: result.subtype.clone(),
        is_error: result.is_error,
        text: result.result.clone().unwrap_or_default(),
        num_turns: result.num_turns,
        total_cost_usd: result.total_cost_usd,
        usage: Some(v1::TokenUsage {
            input_tokens: result.usage.input_tokens,
            output_tokens: result.usage.output_tokens,
            cache_creation_input_tokens: result.usage.cache_creation_input_tokens,
            cache_read_input_tokens: result.usage.cache_read_input_tokens,
        }),
        duration_ms: result.duration_ms,
        duration_api_ms: result.duration_api_ms,
        agent_session_id: result.session_id.clone(),
        api_error_status: result.api_error_status.unwrap_or_default(),
        errors: result.errors.clone().unwrap_or_default(),
        permission_denials: result.permission_denials.len() as u32,
        terminal_reason: result.terminal_reason.clone().unwrap_or_default(),
    }
}

pub fn output_line(line: OutputLine) -> Kind {
    output_line_cut(line, 0)
}

/// A line of which `cut_bytes` were cut.
pub fn output_line_cut(line: OutputLine, cut_bytes: u64) -> Kind {
    Kind::Output(v1::OutputLine {
        stream: match line.stream {
            OutputStream::Stdout => Stream::Stdout,
            OutputStream::Stderr => Stream::Stderr,
        } as i32,
        line: line.text,
        cut_bytes,
    })
}

pub fn status_change(status: v1::TaskStatus, reason: impl Into<String>, worker_id: &str) -> Kind {
    Kind::StatusChange(v1::StatusChange {
        status: status as i32,
        reason: reason.into(),
        worker_id: worker_id.to_owned(),
        ..v1::StatusChange::default()
    })
}

pub fn running(reason: String, worker_id: &str, workspace: &std::path::Path, runner: &str) -> Kind {
    Kind::StatusChange(v1::StatusChange {
        status: v1::TaskStatus::Running as i32,
        reason,
        worker_id: worker_id.to_owned(),
        workspace: workspace.display().to_string(),
        runner: runner.to_owned(),
        ..v1::StatusChange::default()
    })
}
