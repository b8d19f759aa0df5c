//! The parser against real output of Claude Code 2.1.328, kept in `tests/fixtures/` so that a
//! clone anywhere runs them.

use std::path::PathBuf;

use claudecluster_agent_protocol::{AgentEvent, ResultEvent, parse_line};

fn transcript(name: &str) -> Vec<AgentEvent> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/claude-code-2.1.328");
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
    text.lines()
        .flat_map(|line| parse_line(line).unwrap_or_else(|err| panic!("{name}: {err}")))
        .collect()
}

fn result_of(events: &[AgentEvent]) -> &ResultEvent {
    let results: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            AgentEvent::Result(result) => Some(result),
            _ => None,
        })
        .collect();
    assert_eq!(results.len(), 1, "one result per one-turn transcript");
    results[0]
}

#[test]
fn plain_reply() {
    let events = transcript("plain.jsonl");
    let AgentEvent::Init(init) = &events[0] else {
        panic!("first event is {:?}", events[0]);
    };
    assert_eq!(init.cwd, "/workspace");
    assert_eq!(init.permission_mode, "default");
    assert!(init.tools.iter().any(|tool| tool == "Write"));
    assert!(!init.session_id.is_empty());
    assert!(events.iter().any(|e| matches!(e,
        AgentEvent::Text { text, thinking: false, api_error: false } if text == "MOCK_REPLY turn=1: hello mock")));
    let result = result_of(&events);
    assert_eq!(result.subtype, "success");
    assert!(!result.is_error);
    assert_eq!(result.num_turns, 1);
    assert_eq!(
        result.result.as_deref(),
        Some("MOCK_REPLY turn=1: hello mock")
    );
    assert!(result.total_cost_usd > 0.0);
    assert_eq!(result.usage.input_tokens, 2562);
    assert_eq!(result.usage.output_tokens, 7);
    assert_eq!(result.failure_reason(), None);
}

#[test]
fn tool_round_trip_writes_a_file() {
    let events = transcript("tool_write.jsonl");
    let tool_use = events
        .iter()
        .find_map(|e| match e {
            AgentEvent::ToolUse { id, name, input } => Some((id, name, input)),
            _ => None,
        })
        .expect("a tool_use event");
    assert_eq!(tool_use.1, "Write");
    assert_eq!(tool_use.2["file_path"], "/workspace/out.txt");
    let tool_result = events
        .iter()
        .find_map(|e| match e {
            AgentEvent::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => Some((tool_use_id, content, is_error)),
            _ => None,
        })
        .expect("a tool_result event");
    assert_eq!(tool_result.0, tool_use.0, "the result answers the call");
    assert!(tool_result.1.starts_with("File created successfully"));
    assert!(!tool_result.2);
    let result = result_of(&events);
    assert_eq!(result.num_turns, 2);
    assert_eq!(result.result.as_deref(), Some("MOCK_DONE wrote out.txt"));
}

#[test]
fn api_error_is_an_error_result_despite_subtype_success() {
    let events = transcript("error_529.jsonl");
    assert!(events.iter().any(|e| matches!(e,
        AgentEvent::ApiRetry { attempt: 1, error_status: 529, error, .. } if error == "overloaded")));
    assert!(events.iter().any(|e| matches!(
        e,
        AgentEvent::Text {
            api_error: true,
            ..
        }
    )));
    let result = result_of(&events);
    assert_eq!(result.subtype, "success");
    assert!(result.is_error);
    assert_eq!(result.api_error_status, Some(529));
    let reason = result.failure_reason().expect("an api error is a failure");
    assert!(reason.contains("status 529"), "{reason}");
    assert!(reason.contains("overloaded"), "{reason}");
}

#[test]
fn one_retry_then_success() {
    let events = transcript("failonce.jsonl");
    assert!(events.iter().any(|e| matches!(
        e,
        AgentEvent::ApiRetry {
            max_retries: 10,
            ..
        }
    )));
    assert_eq!(result_of(&events).failure_reason(), None);
}

#[test]
fn denied_tool_is_reported_and_the_run_still_succeeds() {
    let events = transcript("tool_denied.jsonl");
    assert!(events.iter().any(|e| matches!(e,
        AgentEvent::PermissionDenied { tool_name, message, .. }
            if tool_name == "Write" && message.contains("haven't granted"))));
    let result = result_of(&events);
    assert!(!result.is_error);
    assert_eq!(result.permission_denials.len(), 1);
}

#[test]
fn partial_messages_and_status_events_are_kept_as_other() {
    let events = transcript("slow_partial.jsonl");
    let stream_events = events
        .iter()
        .filter(
            |e| matches!(e, AgentEvent::Other { event_type, .. } if event_type == "stream_event"),
        )
        .count();
    assert!(stream_events >= 5, "got {stream_events} stream events");
    assert!(events.iter().any(|e| matches!(e,
        AgentEvent::Other { event_type, subtype: Some(s), .. } if event_type == "system" && s == "status")));
    assert_eq!(
        result_of(&events).result.as_deref(),
        Some("chunk 1 chunk 2 chunk 3 chunk 4 chunk 5 ")
    );
}

#[test]
fn one_process_many_turns_gives_one_init_and_result_per_turn() {
    let events = transcript("multiturn_stdin.jsonl");
    let inits = events
        .iter()
        .filter(|e| matches!(e, AgentEvent::Init(_)))
        .count();
    let results: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Result(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(inits, 3);
    assert_eq!(results.len(), 3);
    assert_eq!(
        results[2].result.as_deref(),
        Some("MOCK_RECALL n=2: turn one | turn two")
    );
    assert!(
        results[2].total_cost_usd > results[0].total_cost_usd,
        "cost is cumulative for the session"
    );
}

#[test]
fn resumed_session_keeps_its_history() {
    let events = transcript("resume_2.jsonl");
    assert_eq!(
        result_of(&events).result.as_deref(),
        Some("MOCK_RECALL n=1: first alpha")
    );
}
