//! What the tools return, as JSON a model reads easily: camelCase, lowercase states.

use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;
use rmcp::ErrorData;
use rmcp::model::CallToolResult;
use serde_json::{Value, json};

pub fn task_json(task: &Task) -> Value {
    let container = task
        .runner
        .strip_prefix("container ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("");
    let mut value = json!({
        "taskId": task.task_id,
        "status": task.status().label(),
        "reason": task.status_reason,
        "workerId": task.worker_id,
        "container": container,
        "workspace": task.workspace,
        "attempt": task.attempt,
    });
    if let Some(result) = &task.result {
        let usage = result.usage.unwrap_or_default();
        value["result"] = json!({
            "text": result.text,
            "isError": result.is_error,
            "costUsd": result.total_cost_usd,
            "turns": result.num_turns,
            "inputTokens": usage.input_tokens,
            "outputTokens": usage.output_tokens,
        });
    }
    value
}

pub fn session_json(session: &Session) -> Value {
    let usage = session.usage.unwrap_or_default();
    json!({
        "sessionId": session.session_id,
        "state": session.state().label(),
        "reason": session.state_reason,
        "workerId": session.worker_id,
        "workspace": session.workspace,
        "turns": session.turns,
        "costUsd": session.total_cost_usd,
        "inputTokens": usage.input_tokens,
        "outputTokens": usage.output_tokens,
    })
}

pub fn cluster_json(status: &GetClusterStatusResponse) -> Value {
    let workers: Vec<Value> = status
        .workers
        .iter()
        .map(|worker| {
            let modes: Vec<&str> = worker.execution_modes().map(ExecutionMode::label).collect();
            json!({
                "workerId": worker.worker_id,
                "modes": modes,
                "capacity": worker.capacity,
                "load": worker.load,
                "healthy": worker.healthy,
                "healthReason": worker.health_reason,
                "labels": worker.labels,
                "idleWarmAgents": worker.idle_warm_agents,
            })
        })
        .collect();
    json!({
        "workers": workers,
        "tasksByStatus": status.tasks_by_status,
        "queuedTasks": status.queued_tasks,
    })
}

/// A session message's reply, from its events: the text when it was answered, or the turn to
/// wait for when it was not yet.
pub fn reply_json(
    session_id: &str,
    events: &[Event],
    complete: bool,
) -> Result<CallToolResult, ErrorData> {
    let turn = events
        .iter()
        .map(|e| e.turn)
        .find(|t| *t > 0)
        .unwrap_or_default();
    let result = events.iter().find_map(|e| match &e.kind {
        Some(Kind::Result(result)) => Some(result.clone()),
        _ => None,
    });
    let state = events.iter().rev().find_map(|e| match &e.kind {
        Some(Kind::SessionState(change)) => Some((change.state(), change.reason.clone())),
        _ => None,
    });
    let mut value = json!({ "sessionId": session_id, "turn": turn });
    if let Some((state, reason)) = &state {
        value["state"] = json!(state.label());
        value["reason"] = json!(reason);
    }
    if !complete {
        value["state"] = json!("busy");
        value["note"] = json!("the agent is still answering; call wait_for_reply with this turn");
        return Ok(CallToolResult::structured(value));
    }
    match result {
        Some(result) => {
            value["reply"] = json!(result.text);
            value["costUsd"] = json!(result.total_cost_usd);
            if result.is_error {
                Ok(CallToolResult::structured_error(value))
            } else {
                Ok(CallToolResult::structured(value))
            }
        }
        None => Ok(CallToolResult::structured_error(value)),
    }
}
