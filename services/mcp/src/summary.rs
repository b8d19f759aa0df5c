//! What the tools return, as JSON a model reads easily: camelCase, lowercase states. Every
//! repository URL is shown without its credentials, and every reason with none in it.

use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;
use claudecluster_proto::without_credentials;
use rmcp::ErrorData;
use rmcp::model::CallToolResult;
use serde_json::{Value, json};

use crate::bounds::{
    self, MAX_FILES_CHANGED_BYTES, MAX_LISTED_TEXT_BYTES, MAX_RESULT_BYTES, json_len,
    without_credentials_in,
};

/// Where the whole of a task is, for a result that had to be shortened.
pub fn whole_task(task_id: &str) -> String {
    format!(
        "`claudecluster tasks get {task_id}` (the driver's GetTask) shows the whole task, `claudecluster tasks events {task_id}` (StreamTaskEvents) every event"
    )
}

/// Where the whole of a session's reply is.
pub fn whole_session(session_id: &str) -> String {
    format!(
        "`claudecluster session attach {session_id}` (the driver's StreamSessionEvents) shows every event whole, replies included"
    )
}

/// Where the rest of a list of tasks is.
pub const WHOLE_TASK_LIST: &str = "list_tasks with pageToken set to nextPageToken lists the tasks after these; get_task_status or get_task_result shows one task whole";

/// Where the whole cluster is.
pub const WHOLE_CLUSTER: &str =
    "`claudecluster status` (the driver's GetClusterStatus) shows every worker whole";

pub fn task_json(task: &Task) -> Value {
    let container = task
        .runner
        .strip_prefix("container ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("");
    let mut value = json!({
        "taskId": task.task_id,
        "status": task.status().label(),
        "reason": without_credentials_in(&task.status_reason),
        "workerId": task.worker_id,
        "container": container,
        "workspace": task.workspace,
        "attempt": task.attempt,
    });
    if let Some(spec) = &task.spec
        && !spec.repo_url.is_empty()
    {
        value["repoUrl"] = json!(without_credentials(&spec.repo_url));
    }
    if task.shortened {
        // The driver cut the task's long fields to fit its page.
        value["shortened"] = json!(true);
    }
    if let Some(changes) = &task.changes {
        value["changes"] = changes_json(changes);
    }
    if let Some(branch) = &task.branch {
        value["branch"] = json!({
            "name": branch.name,
            "commit": branch.commit,
            "pushed": branch.pushed,
            "pullRequestUrl": branch.pull_request_url,
            "error": without_credentials_in(&branch.error),
        });
    }
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

/// A task as an entry of a list: its long texts cut to [`MAX_LISTED_TEXT_BYTES`].
pub fn listed_task_json(task: &Task) -> Value {
    let mut value = task_json(task);
    if bounds::shorten_every_text(&mut value, MAX_LISTED_TEXT_BYTES) {
        value["shortened"] = json!(true);
    }
    value
}

/// A page of tasks as a list that fits in a tool result, and how many of `tasks` it shows. A
/// list that ends early says how many it left out and is marked shortened; the caller then
/// sets `nextPageToken` to the token for the tasks after the last one shown.
pub fn tasks_json(tasks: &[Task], next_page_token: &str) -> (Value, usize) {
    let entries: Vec<Value> = tasks.iter().map(listed_task_json).collect();
    let any_shortened = entries.iter().any(|entry| entry["shortened"] == true);
    // Room for everything around the list, as large as it can get; the token that replaces the
    // driver's when the list ends early is given room to spare.
    let around = json!({
        "tasks": [],
        "nextPageToken": format!("{next_page_token}{}", "0".repeat(24)),
        "omitted": tasks.len(),
        "shortened": true,
        "whole": WHOLE_TASK_LIST,
    });
    let (shown, omitted) =
        bounds::take_fitting(entries, MAX_RESULT_BYTES.saturating_sub(json_len(&around)));
    let count = shown.len();
    let mut value = json!({ "tasks": shown });
    if !next_page_token.is_empty() {
        value["nextPageToken"] = json!(next_page_token);
    }
    if omitted > 0 {
        value["omitted"] = json!(omitted);
    }
    if omitted > 0 || any_shortened {
        value["shortened"] = json!(true);
    }
    (value, count)
}

/// Adds the files a task changed to its result: as many as fit in [`MAX_FILES_CHANGED_BYTES`],
/// and how many more there were.
pub fn add_files_changed(value: &mut Value, files: Vec<String>) {
    let mut any_shortened = false;
    let entries: Vec<Value> = files
        .into_iter()
        .map(|file| {
            let mut entry = json!(file);
            any_shortened |= bounds::shorten_every_text(&mut entry, MAX_LISTED_TEXT_BYTES);
            entry
        })
        .collect();
    let (shown, omitted) = bounds::take_fitting(entries, MAX_FILES_CHANGED_BYTES);
    value["filesChanged"] = json!(shown);
    if omitted > 0 {
        value["filesOmitted"] = json!(omitted);
    }
    if omitted > 0 || any_shortened {
        value["shortened"] = json!(true);
    }
}

fn changes_json(changes: &ChangeSummary) -> Value {
    json!({
        "baseCommit": changes.base_commit,
        "filesChanged": changes.files_changed,
        "filesAdded": changes.files_added,
        "filesDeleted": changes.files_deleted,
        "insertions": changes.insertions,
        "deletions": changes.deletions,
        "binaryFiles": changes.binary_files,
    })
}

/// Adds a task's diff to its result, cut to [`MAX_DIFF_BYTES`](bounds::MAX_DIFF_BYTES), with
/// its summary as of now.
pub fn add_diff(value: &mut Value, answer: &GetTaskDiffResponse) {
    let diff = bounds::shorten(&answer.diff, bounds::MAX_DIFF_BYTES);
    let cut = answer.truncated || matches!(diff, std::borrow::Cow::Owned(_));
    value["diff"] = json!(diff);
    if cut {
        value["diffShortened"] = json!(true);
        value["wholeDiff"] = json!(format!(
            "`claudecluster tasks diff {}` (GetTaskDiff) shows the diff; `claudecluster tasks download` fetches the files",
            value["taskId"].as_str().unwrap_or_default()
        ));
    }
    if let Some(summary) = &answer.summary {
        value["changes"] = changes_json(summary);
    }
}

pub fn session_json(session: &Session) -> Value {
    let usage = session.usage.unwrap_or_default();
    let mut value = json!({
        "sessionId": session.session_id,
        "state": session.state().label(),
        "reason": without_credentials_in(&session.state_reason),
        "workerId": session.worker_id,
        "workspace": session.workspace,
        "turns": session.turns,
        "costUsd": session.total_cost_usd,
        "inputTokens": usage.input_tokens,
        "outputTokens": usage.output_tokens,
    });
    if let Some(spec) = &session.spec
        && !spec.repo_url.is_empty()
    {
        value["repoUrl"] = json!(without_credentials(&spec.repo_url));
    }
    value
}

pub fn cluster_json(status: &GetClusterStatusResponse) -> Value {
    let mut any_shortened = false;
    let workers: Vec<Value> = status
        .workers
        .iter()
        .map(|worker| {
            let modes: Vec<&str> = worker.execution_modes().map(ExecutionMode::label).collect();
            let mut entry = json!({
                "workerId": worker.worker_id,
                "modes": modes,
                "capacity": worker.capacity,
                "load": worker.load,
                "healthy": worker.healthy,
                "healthReason": without_credentials_in(&worker.health_reason),
                "labels": worker.labels,
                "idleWarmAgents": worker.idle_warm_agents,
            });
            if bounds::shorten_every_text(&mut entry, MAX_LISTED_TEXT_BYTES) {
                entry["shortened"] = json!(true);
                any_shortened = true;
            }
            entry
        })
        .collect();
    // Room for everything around the list, as large as it can get.
    let around = json!({
        "workers": [],
        "tasksByStatus": status.tasks_by_status,
        "queuedTasks": status.queued_tasks,
        "workersOmitted": status.workers.len(),
        "shortened": true,
        "whole": WHOLE_CLUSTER,
    });
    let (shown, omitted) =
        bounds::take_fitting(workers, MAX_RESULT_BYTES.saturating_sub(json_len(&around)));
    let mut value = json!({
        "workers": shown,
        "tasksByStatus": status.tasks_by_status,
        "queuedTasks": status.queued_tasks,
    });
    if omitted > 0 {
        value["workersOmitted"] = json!(omitted);
    }
    if omitted > 0 || any_shortened {
        value["shortened"] = json!(true);
    }
    value
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
        value["reason"] = json!(without_credentials_in(reason));
    }
    let whole = whole_session(session_id);
    if !complete {
        value["state"] = json!("busy");
        value["note"] = json!("the agent is still answering; call wait_for_reply with this turn");
        return Ok(CallToolResult::structured(bounds::fit(value, &whole)));
    }
    match result {
        Some(result) => {
            value["reply"] = json!(result.text);
            value["costUsd"] = json!(result.total_cost_usd);
            let value = bounds::fit(value, &whole);
            if result.is_error {
                Ok(CallToolResult::structured_error(value))
            } else {
                Ok(CallToolResult::structured(value))
            }
        }
        None => Ok(CallToolResult::structured_error(bounds::fit(value, &whole))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished_task(id: &str, text: String) -> Task {
        Task {
            task_id: id.to_owned(),
            status: TaskStatus::Completed as i32,
            spec: Some(TaskSpec {
                prompt: "p".into(),
                repo_url: "https://user:ghp_s3cret@git.example/org/app.git".into(),
                ..Default::default()
            }),
            status_reason: "clone of 'https://user:ghp_s3cret@git.example/org/app.git/' retried"
                .into(),
            result: Some(AgentResult {
                text,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn repository_urls_and_reasons_are_shown_without_credentials() {
        let task = task_json(&finished_task("t-1", "done".into()));
        assert_eq!(task["repoUrl"], "https://***@git.example/org/app.git");
        assert!(!task.to_string().contains("s3cret"), "{task}");

        let session = session_json(&Session {
            session_id: "s-1".into(),
            spec: Some(SessionSpec {
                repo_url: "https://x-access-token:tok@git.example/r.git".into(),
                ..Default::default()
            }),
            state_reason: "clone failed: https://x-access-token:tok@git.example/r.git".into(),
            ..Default::default()
        });
        assert_eq!(session["repoUrl"], "https://***@git.example/r.git");
        assert!(!session.to_string().contains("tok@"), "{session}");

        let status = GetClusterStatusResponse {
            workers: vec![WorkerInfo {
                worker_id: "w-1".into(),
                health_reason: "cannot reach https://me:pw@registry.example/v2".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let cluster = cluster_json(&status);
        assert_eq!(
            cluster["workers"][0]["healthReason"],
            "cannot reach https://***@registry.example/v2"
        );
    }

    #[test]
    fn a_task_without_a_repository_shows_none() {
        let task = task_json(&Task {
            task_id: "t-1".into(),
            ..Default::default()
        });
        assert!(task.get("repoUrl").is_none());
        assert!(task.get("shortened").is_none());
    }

    #[test]
    fn a_page_of_tasks_cuts_long_texts_and_ends_early_when_too_large() {
        let tasks: Vec<Task> = (0..200)
            .map(|i| finished_task(&format!("t-{i}"), "r".repeat(10_000)))
            .collect();
        let (value, shown) = tasks_json(&tasks, "200");
        assert!(shown < 200 && shown > 10, "{shown}");
        assert_eq!(value["tasks"].as_array().unwrap().len(), shown);
        assert_eq!(value["omitted"], 200 - shown);
        assert_eq!(value["shortened"], true);
        assert_eq!(value["tasks"][0]["shortened"], true);
        let text = value["tasks"][0]["result"]["text"].as_str().unwrap();
        assert!(text.len() <= MAX_LISTED_TEXT_BYTES, "{}", text.len());
        assert!(text.ends_with("…[shortened from 10000 bytes]"), "{text}");
        // What the tool returns, once the caller's next page token is in it, still fits whole.
        let mut value = value;
        value["nextPageToken"] = json!("12345678");
        let fitted = bounds::fit(value.clone(), WHOLE_TASK_LIST);
        assert!(json_len(&fitted) <= MAX_RESULT_BYTES);
        assert_eq!(fitted["tasks"], value["tasks"], "nothing more was cut");
        assert_eq!(fitted["whole"], WHOLE_TASK_LIST);

        let (small, all) = tasks_json(&tasks[..3], "");
        assert_eq!(all, 3);
        assert!(small.get("omitted").is_none());
        assert!(small.get("nextPageToken").is_none());
        assert_eq!(small["shortened"], true, "its texts were cut");
    }

    #[test]
    fn the_files_a_task_changed_end_early_with_a_count() {
        let mut value = json!({ "taskId": "t-1" });
        add_files_changed(&mut value, vec!["/workspace/a.rs".into()]);
        assert_eq!(value["filesChanged"], json!(["/workspace/a.rs"]));
        assert!(value.get("shortened").is_none());

        let files: Vec<String> = (0..5000)
            .map(|i| format!("/workspace/src/module_{i}/file.rs"))
            .collect();
        let mut value = json!({ "taskId": "t-1" });
        add_files_changed(&mut value, files);
        let shown = value["filesChanged"].as_array().unwrap().len();
        assert!(shown > 100, "{shown}");
        assert_eq!(value["filesOmitted"], 5000 - shown);
        assert_eq!(value["shortened"], true);
        assert!(json_len(&value["filesChanged"]) <= MAX_FILES_CHANGED_BYTES);
    }

    #[test]
    fn a_cluster_with_too_many_workers_lists_those_that_fit() {
        let status = GetClusterStatusResponse {
            workers: (0..2000)
                .map(|i| WorkerInfo {
                    worker_id: format!("worker-{i}"),
                    health_reason: "h".repeat(2000),
                    ..Default::default()
                })
                .collect(),
            queued_tasks: 7,
            ..Default::default()
        };
        let value = cluster_json(&status);
        let shown = value["workers"].as_array().unwrap().len();
        assert!(shown > 0 && shown < 2000);
        assert_eq!(value["workersOmitted"], 2000 - shown);
        assert_eq!(value["queuedTasks"], 7);
        let fitted = bounds::fit(value, WHOLE_CLUSTER);
        assert!(json_len(&fitted) <= MAX_RESULT_BYTES);
        assert_eq!(fitted["whole"], WHOLE_CLUSTER);
    }

    #[test]
    fn a_long_reply_is_shortened_and_says_so() {
        let events = vec![
            Event {
                turn: 2,
                kind: Some(Kind::Result(AgentResult {
                    text: "漢".repeat(100_000),
                    total_cost_usd: 0.25,
                    ..Default::default()
                })),
                ..Default::default()
            },
            Event {
                turn: 2,
                kind: Some(Kind::SessionState(SessionStateChange {
                    state: SessionState::Ready as i32,
                    ..Default::default()
                })),
                ..Default::default()
            },
        ];
        let result = reply_json("s-1", &events, true).unwrap();
        assert_eq!(result.is_error, Some(false));
        let value = result.structured_content.unwrap();
        assert!(json_len(&value) <= MAX_RESULT_BYTES);
        assert_eq!(value["shortened"], true);
        assert_eq!(value["turn"], 2);
        assert_eq!(value["costUsd"], 0.25);
        assert!(
            value["whole"]
                .as_str()
                .unwrap()
                .contains("session attach s-1")
        );
        let reply = value["reply"].as_str().unwrap();
        assert!(reply.starts_with("漢漢"));
        assert!(reply.ends_with(" …[shortened from 300000 bytes]"));
    }
}
