//! How the client prints tasks and events for people.

use claudecluster_proto::Timestamp;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;

/// Prints one event as a line of progress.
pub fn event(event: &Event) {
    let Some(kind) = &event.kind else { return };
    match kind {
        Kind::StatusChange(change) => {
            let mut line = format!("[{}]", change.status().label());
            if !change.reason.is_empty() {
                line.push(' ');
                line.push_str(&change.reason);
            }
            eprintln!("{line}");
        }
        Kind::Init(init) => eprintln!(
            "agent {} ({}) in {}",
            init.claude_code_version, init.model, init.cwd
        ),
        Kind::Text(text) if text.thinking => eprintln!("(thinking) {}", text.text),
        Kind::Text(text) => println!("{}", text.text),
        Kind::ToolUse(tool) => eprintln!("→ {} {}", tool.name, shorten(&tool.input_json, 160)),
        Kind::ToolResult(result) => {
            let mark = if result.is_error { "✗" } else { "←" };
            eprintln!(
                "{mark} {}",
                shorten(result.content.lines().next().unwrap_or(""), 160)
            );
        }
        Kind::ApiRetry(retry) => eprintln!(
            "! api retry {}/{} after status {} ({}), in {} ms",
            retry.attempt, retry.max_retries, retry.error_status, retry.error, retry.retry_delay_ms
        ),
        Kind::PermissionDenied(denied) => eprintln!(
            "! permission denied for {}: {}",
            denied.tool_name, denied.message
        ),
        Kind::Result(result) => {
            let usage = result.usage.unwrap_or_default();
            eprintln!(
                "= {} in {} turn(s), ${:.4}, {} input / {} output tokens, {} ms",
                if result.is_error { "error" } else { "done" },
                result.num_turns,
                result.total_cost_usd,
                usage.input_tokens,
                usage.output_tokens,
                result.duration_ms
            );
        }
        Kind::Output(line) => eprintln!("  | {}", line.line),
        Kind::SessionState(change) => {
            let mut line = format!("[{}]", change.state().label());
            if !change.reason.is_empty() {
                line.push(' ');
                line.push_str(&change.reason);
            }
            eprintln!("{line}");
        }
        Kind::Other(_) => {}
    }
}

fn shorten(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(limit).collect();
    short.push('…');
    short
}

pub fn task_table(tasks: &[Task]) {
    println!(
        "{:<36}  {:<9}  {:<20}  {:<20}  PROMPT",
        "TASK", "STATUS", "WORKER", "CREATED"
    );
    for task in tasks {
        let prompt = task.spec.as_ref().map(|s| s.prompt.as_str()).unwrap_or("");
        println!(
            "{:<36}  {:<9}  {:<20}  {:<20}  {}",
            task.task_id,
            task.status().label(),
            task.worker_id,
            time(task.create_time.as_ref()),
            shorten(&prompt.replace('\n', " "), 60)
        );
    }
}

pub fn task_detail(task: &Task) {
    let spec = task.spec.clone().unwrap_or_default();
    println!("task:      {}", task.task_id);
    println!("status:    {}", task.status().label());
    if !task.status_reason.is_empty() {
        println!("reason:    {}", task.status_reason);
    }
    println!(
        "prompt:    {}",
        shorten(&spec.prompt.replace('\n', " "), 200)
    );
    if !spec.repo_url.is_empty() {
        println!("repo:      {}", spec.repo_url);
    }
    if !task.worker_id.is_empty() {
        println!("worker:    {} (attempt {})", task.worker_id, task.attempt);
    }
    if !task.workspace.is_empty() {
        println!("workspace: {}", task.workspace);
    }
    println!("created:   {}", time(task.create_time.as_ref()));
    if task.start_time.is_some() {
        println!("started:   {}", time(task.start_time.as_ref()));
    }
    if task.end_time.is_some() {
        println!("ended:     {}", time(task.end_time.as_ref()));
    }
    if let Some(changes) = &task.changes {
        println!("changes:   {}", change_summary(changes));
    }
    if let Some(branch) = &task.branch {
        if branch.pushed {
            println!("branch:    {} at {}", branch.name, branch.commit);
        }
        if !branch.pull_request_url.is_empty() {
            println!("pull:      {}", branch.pull_request_url);
        }
        if !branch.error.is_empty() {
            println!("branch:    {} not published: {}", branch.name, branch.error);
        }
    }
    if let Some(result) = &task.result {
        let usage = result.usage.unwrap_or_default();
        println!(
            "result:    {} turn(s), ${:.4}, {} input / {} output tokens",
            result.num_turns, result.total_cost_usd, usage.input_tokens, usage.output_tokens
        );
        println!("{}", result.text);
    }
}

/// `3 files changed (1 added, 1 deleted, 1 binary), +10 -2`, as git says it.
pub fn change_summary(changes: &ChangeSummary) -> String {
    let mut kinds = Vec::new();
    if changes.files_added > 0 {
        kinds.push(format!("{} added", changes.files_added));
    }
    if changes.files_deleted > 0 {
        kinds.push(format!("{} deleted", changes.files_deleted));
    }
    if changes.binary_files > 0 {
        kinds.push(format!("{} binary", changes.binary_files));
    }
    let kinds = if kinds.is_empty() {
        String::new()
    } else {
        format!(" ({})", kinds.join(", "))
    };
    let base = if changes.base_commit.is_empty() {
        String::new()
    } else {
        format!(
            " since {}",
            &changes.base_commit[..changes.base_commit.len().min(12)]
        )
    };
    format!(
        "{} files changed{kinds}, +{} -{}{base}",
        changes.files_changed, changes.insertions, changes.deletions
    )
}

pub fn cluster_status(status: &GetClusterStatusResponse) {
    println!(
        "{:<20}  {:<18}  {:<7}  {:<8}  {:<22}  {:<20}  LABELS",
        "WORKER", "MODE", "HEALTHY", "LOAD", "ADDRESS", "DISK USED / FREE"
    );
    for worker in &status.workers {
        let mut labels: Vec<_> = worker
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        let healthy = if worker.drained {
            "drained".to_owned()
        } else if worker.draining {
            "draining".to_owned()
        } else if worker.healthy {
            "yes".to_owned()
        } else {
            format!("no ({})", worker.health_reason)
        };
        let disk = format!(
            "{} / {}",
            claudecluster_proto::human_bytes(worker.workspace_bytes),
            claudecluster_proto::human_bytes(worker.disk_free_bytes)
        );
        println!(
            "{:<20}  {:<18}  {:<7}  {:<8}  {:<22}  {:<20}  {}",
            worker.worker_id,
            worker
                .execution_modes()
                .map(ExecutionMode::label)
                .collect::<Vec<_>>()
                .join(","),
            healthy,
            format!("{}/{}", worker.load, worker.capacity),
            worker.address,
            disk,
            labels.join(",")
        );
    }
    let mut counts: Vec<_> = status.tasks_by_status.iter().collect();
    counts.sort();
    let counts: Vec<_> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let mut by_priority: Vec<_> = status.queued_by_priority.iter().collect();
    by_priority.sort();
    let by_priority: Vec<_> = by_priority
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let by_priority = if by_priority.is_empty() {
        String::new()
    } else {
        format!(" ({})", by_priority.join(", "))
    };
    println!(
        "queued: {}{by_priority}; tasks: {}",
        status.queued_tasks,
        counts.join(", ")
    );
}

pub fn session_table(sessions: &[Session]) {
    println!(
        "{:<36}  {:<8}  {:<20}  {:>5}  {:>9}  LAST ACTIVITY",
        "SESSION", "STATE", "WORKER", "TURNS", "COST"
    );
    for session in sessions {
        println!(
            "{:<36}  {:<8}  {:<20}  {:>5}  {:>9}  {}",
            session.session_id,
            session.state().label(),
            session.worker_id,
            session.turns,
            format!("${:.4}", session.total_cost_usd),
            time(session.last_activity_time.as_ref()),
        );
    }
}

pub fn session_detail(session: &Session) {
    println!("session:   {}", session.session_id);
    println!("state:     {}", session.state().label());
    if !session.state_reason.is_empty() {
        println!("reason:    {}", session.state_reason);
    }
    if !session.worker_id.is_empty() {
        println!("worker:    {}", session.worker_id);
    }
    if !session.workspace.is_empty() {
        println!("workspace: {}", session.workspace);
    }
    let usage = session.usage.unwrap_or_default();
    println!(
        "turns:     {} (${:.4}, {} input / {} output tokens)",
        session.turns, session.total_cost_usd, usage.input_tokens, usage.output_tokens
    );
    if session.queued_messages > 0 {
        println!("waiting:   {} message(s)", session.queued_messages);
    }
}

/// A timestamp as `YYYY-MM-DD HH:MM:SS` UTC.
fn time(timestamp: Option<&Timestamp>) -> String {
    let Some(timestamp) = timestamp else {
        return String::new();
    };
    let seconds = timestamp.seconds;
    let of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = claudecluster_telemetry::civil_from_days(seconds.div_euclid(86_400));
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        of_day / 3600,
        (of_day / 60) % 60,
        of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_utc_dates() {
        let at = |seconds| time(Some(&Timestamp { seconds, nanos: 0 }));
        assert_eq!(at(0), "1970-01-01 00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(at(1_795_000_000), "2026-11-18 11:06:40");
    }
}
