//! `claudecluster mcp`: the cluster as MCP tools, so that a primary Claude Code can spawn
//! containerized agents, give them work and collect their results.
//!
//! The server is a client of the driver and nothing more; it never talks to Docker. Tools
//! return at once or within a bounded wait (Claude Code gives up on a tool call after 60 s),
//! so long-running work is polled with `wait_for_task` and `wait_for_reply`. A task or session
//! that failed is a tool result with `isError`, and so is a call whose arguments are wrong, with
//! an error that names the argument; only a call the server cannot route is a protocol error.
//!
//! Every result fits in [`MAX_RESULT_BYTES`] (see [`bounds`]), and no result shows a credential:
//! repository URLs are shown without theirs, and so are the URLs that reasons and errors quote.

pub mod bounds;
mod params;
mod summary;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use claudecluster_grpc::ClientChannel as Channel;
use claudecluster_proto::v1::driver_service_client::DriverServiceClient;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use bounds::{
    MAX_DIFF_BYTES, MAX_ERROR_BYTES, MAX_FILES_CHANGED_BYTES, MAX_LISTED_TEXT_BYTES,
    MAX_RESULT_BYTES,
};
pub use params::*;
use summary::{session_json, task_json, whole_task};

/// The label that records which primary Claude Code session spawned a task.
pub const PARENT_SESSION_LABEL: &str = "claudecluster.parent_session";
/// The longest a tool call waits.
const MAX_WAIT: Duration = Duration::from_secs(MAX_WAIT_SECONDS as u64);
/// How long spawning waits for the container to be running, to report it.
const SPAWN_WAIT: Duration = Duration::from_secs(15);

type ToolResult = Result<CallToolResult, ErrorData>;

/// A result, made to fit; `whole` says where all of it is if it had to be shortened.
fn ok(value: Value, whole: &str) -> ToolResult {
    Ok(CallToolResult::structured(bounds::fit(value, whole)))
}

/// A result with `isError`, made to fit as [`ok`] does.
fn failed(value: Value, whole: &str) -> ToolResult {
    Ok(CallToolResult::structured_error(bounds::fit(value, whole)))
}

/// A tool error the model reads: a sentence, bounded and without credentials.
fn error_text(message: &str) -> ToolResult {
    Ok(CallToolResult::error(vec![ContentBlock::text(
        bounds::error_message(message),
    )]))
}

/// Parameters the caller got wrong: a tool error that names the parameter, for the model to
/// correct its call.
fn invalid_parameter(invalid: InvalidParameter) -> ToolResult {
    error_text(&invalid.to_string())
}

fn wait_for(seconds: Option<u32>) -> Duration {
    Duration::from_secs(wait_seconds(seconds).into())
}

#[derive(Clone)]
pub struct ClusterTools {
    driver: DriverServiceClient<Channel>,
    driver_address: String,
    /// The primary's session, from `CLAUDE_CODE_SESSION_ID`, recorded on what it spawns.
    parent_session: Option<String>,
    tool_router: ToolRouter<Self>,
}

impl ClusterTools {
    /// Tools calling the driver at `driver_address`, presenting `bearer` (the MCP server's API
    /// key): what the tools spawn belongs to that key.
    pub fn new(
        driver_address: &str,
        parent_session: Option<String>,
        bearer: claudecluster_grpc::Bearer,
        tls: Option<&claudecluster_grpc::tls::Tls>,
    ) -> Result<Self, String> {
        let channel = claudecluster_grpc::client_channel(driver_address, bearer, tls)
            .map_err(|err| format!("bad driver address `{driver_address}`: {err}"))?;
        Ok(ClusterTools {
            driver: DriverServiceClient::new(channel)
                .max_decoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES),
            driver_address: driver_address.to_owned(),
            parent_session: parent_session.filter(|id| !id.is_empty()),
            tool_router: Self::tool_router(),
        })
    }

    /// A driver error as a result the caller can read.
    fn driver_error(&self, status: tonic::Status) -> ToolResult {
        error_text(&self.driver_message(&status))
    }

    /// A driver error about a spec the caller's parameters made: a refused field is named as the
    /// parameter that set it, and wherever the message quotes `repo_url`, its credentials are
    /// hidden. The driver already hides them; this holds even if a message quotes the URL some
    /// other way, or repeats its password alone.
    fn spec_error(&self, status: tonic::Status, repo_url: Option<&str>) -> ToolResult {
        let mut message = naming_the_parameter(&self.driver_message(&status)).into_owned();
        if let Some(url) = repo_url.filter(|url| !url.is_empty()) {
            message = claudecluster_proto::hide_credentials_of(url, &message);
        }
        error_text(&message)
    }

    fn driver_message(&self, status: &tonic::Status) -> String {
        if status.code() == tonic::Code::Unavailable {
            format!(
                "the ClaudeCluster driver at {} is unreachable: {}",
                self.driver_address,
                status.message()
            )
        } else {
            status.message().to_owned()
        }
    }

    async fn task(&self, task_id: &str) -> Result<Task, tonic::Status> {
        let request = GetTaskRequest {
            task_id: task_id.to_owned(),
        };
        let response = patiently(|| {
            let mut driver = self.driver.clone();
            let request = request.clone();
            async move { driver.get_task(request).await }
        })
        .await?;
        Ok(response.into_inner().task.unwrap_or_default())
    }

    /// Hands the task's events to `take` until it says stop (true), the stream ends, or `limit`
    /// passes. A driver that restarts meanwhile is waited for, and the stream resumes where it
    /// broke.
    async fn follow_task(
        &self,
        task_id: &str,
        limit: Duration,
        mut take: impl FnMut(&Event) -> bool,
    ) -> Result<(), tonic::Status> {
        let open = |after| {
            let mut driver = self.driver.clone();
            let request = StreamTaskEventsRequest {
                task_id: task_id.to_owned(),
                after_sequence: after,
            };
            async move { driver.stream_task_events(request).await }
        };
        follow_resuming(open, 0, limit, |event| take(&event)).await?;
        Ok(())
    }

    /// Collects the events of a session's `turn` after `after` until the turn ends or `limit`
    /// passes, resuming when the driver restarts; and whether the turn ended.
    async fn follow_turn(
        &self,
        session_id: &str,
        turn: u32,
        after: u64,
        limit: Duration,
        events: &mut Vec<Event>,
    ) -> Result<bool, tonic::Status> {
        let open = |after| {
            let mut driver = self.driver.clone();
            let request = StreamSessionEventsRequest {
                session_id: session_id.to_owned(),
                after_sequence: after,
            };
            async move { driver.stream_session_events(request).await }
        };
        follow_resuming(open, after, limit, |event| {
            let ends = ends_turn(&event, turn);
            if event.turn == turn || ends {
                events.push(event);
            }
            ends
        })
        .await
    }
}

/// Hands the events of the stream `open(after)` opens to `take` until it says stop (true),
/// the stream ends (true), or `limit` passes (false). A driver that restarts meanwhile is
/// waited for, and the stream is opened again after the last event seen.
async fn follow_resuming<R, F, Fut>(
    open: F,
    mut after: u64,
    limit: Duration,
    mut take: impl FnMut(Event) -> bool,
) -> Result<bool, tonic::Status>
where
    R: claudecluster_proto::CarriesEvent,
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<R>>, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let opened = tokio::time::timeout_at(deadline, patiently(|| open(after))).await;
        let mut stream = match opened {
            Err(_) => return Ok(false),
            Ok(Err(status)) => return Err(status),
            Ok(Ok(response)) => response.into_inner(),
        };
        let followed = tokio::time::timeout_at(deadline, async {
            loop {
                match stream.message().await {
                    Ok(Some(response)) => {
                        let Some(event) = response.into_event() else {
                            continue;
                        };
                        after = event.sequence;
                        if take(event) {
                            return Some(true);
                        }
                    }
                    Ok(None) => return Some(true),
                    Err(status) if resumable(&status) => return None,
                    Err(_) => return Some(false),
                }
            }
        })
        .await;
        match followed {
            Err(_) => return Ok(false),
            Ok(Some(ended)) => return Ok(ended),
            Ok(None) => continue,
        }
    }
}

/// How long a tool call waits for a driver that is restarting before it says the driver is
/// unreachable.
const DRIVER_PATIENCE: Duration = Duration::from_secs(20);

/// Whether a call that failed with `status` may succeed when tried again: the driver restarted
/// or is shutting down.
fn resumable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Calls `call` until it answers with something other than a driver that went away, for at
/// most [`DRIVER_PATIENCE`]. Only for calls that are safe to repeat.
async fn patiently<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + DRIVER_PATIENCE;
    let mut pause = Duration::from_millis(100);
    loop {
        match call().await {
            Err(status) if resumable(&status) && tokio::time::Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            answer => return answer,
        }
    }
}

/// Whether `event` ends `turn` of a session (or the session).
fn ends_turn(event: &Event, turn: u32) -> bool {
    match &event.kind {
        Some(Kind::SessionState(change)) => {
            change.state().is_final()
                || (event.turn == turn && change.state() != SessionState::Busy)
        }
        _ => false,
    }
}

fn status_is(event: &Event, wanted: impl Fn(TaskStatus) -> bool) -> bool {
    matches!(&event.kind, Some(Kind::StatusChange(change)) if wanted(change.status()))
}

/// Files the agent wrote or edited, from its tool calls, in the order it first touched them.
#[derive(Default)]
struct FilesChanged {
    files: Vec<String>,
    seen: HashSet<String>,
}

impl FilesChanged {
    fn note(&mut self, event: &Event) {
        let Some(Kind::ToolUse(tool)) = &event.kind else {
            return;
        };
        if !matches!(
            tool.name.as_str(),
            "Write" | "Edit" | "MultiEdit" | "NotebookEdit"
        ) {
            return;
        }
        let input: Value = serde_json::from_str(&tool.input_json).unwrap_or_default();
        for key in ["file_path", "notebook_path"] {
            if let Some(path) = input[key].as_str()
                && self.seen.insert(path.to_owned())
            {
                self.files.push(path.to_owned());
            }
        }
    }
}

#[tool_router]
impl ClusterTools {
    #[tool(
        description = "Start a Claude Code agent in a container of its own on the cluster, working on `task`. Returns at once (within seconds) with the task id, the worker and the container; the agent keeps working. Use wait_for_task to wait for it and get_task_result for its answer."
    )]
    async fn spawn_claude_container(
        &self,
        Parameters(params): Parameters<SpawnParams>,
    ) -> ToolResult {
        let mut labels = HashMap::new();
        if let Some(parent) = &self.parent_session {
            labels.insert(PARENT_SESSION_LABEL.to_owned(), parent.clone());
        }
        let repo_url = params.repo_url.clone();
        let mut spec = match params.into_spec(labels) {
            Ok(spec) => spec,
            Err(invalid) => return invalid_parameter(invalid),
        };
        // A key of its own makes the submit safe to repeat while the driver restarts.
        spec.idempotency_key = format!("mcp-{}", uuid::Uuid::new_v4());
        let request = SubmitTaskRequest { spec: Some(spec) };
        let submitted = match patiently(|| {
            let mut driver = self.driver.clone();
            let request = request.clone();
            async move { driver.submit_task(request).await }
        })
        .await
        {
            Ok(response) => response.into_inner().task.unwrap_or_default(),
            Err(status) => return self.spec_error(status, repo_url.as_deref()),
        };
        // Report the container once it runs; a task still waiting for room is reported as is.
        let started =
            |event: &Event| status_is(event, |s| s == TaskStatus::Running || s.is_terminal());
        if let Err(status) = self
            .follow_task(&submitted.task_id, SPAWN_WAIT, started)
            .await
        {
            return self.driver_error(status);
        }
        match self.task(&submitted.task_id).await {
            Ok(task) => ok(task_json(&task), &whole_task(&task.task_id)),
            Err(status) => self.driver_error(status),
        }
    }

    #[tool(
        description = "Wait up to timeoutSeconds (default 30, at most 50) for a task to end, then return its state. Call again if it is still running."
    )]
    async fn wait_for_task(&self, Parameters(params): Parameters<WaitParams>) -> ToolResult {
        if let Err(invalid) = params.check() {
            return invalid_parameter(invalid);
        }
        let ended = |event: &Event| status_is(event, TaskStatus::is_terminal);
        if let Err(status) = self
            .follow_task(&params.task_id, wait_for(params.timeout_seconds), ended)
            .await
        {
            return self.driver_error(status);
        }
        match self.task(&params.task_id).await {
            Ok(task) => ok(task_json(&task), &whole_task(&task.task_id)),
            Err(status) => self.driver_error(status),
        }
    }

    #[tool(description = "The current state of a task: status, reason, worker, container.")]
    async fn get_task_status(&self, Parameters(params): Parameters<TaskParams>) -> ToolResult {
        if let Err(invalid) = params.check() {
            return invalid_parameter(invalid);
        }
        match self.task(&params.task_id).await {
            Ok(task) => ok(task_json(&task), &whole_task(&task.task_id)),
            Err(status) => self.driver_error(status),
        }
    }

    #[tool(
        description = "The outcome of a finished task: the agent's final text, cost, tokens and the files it wrote. An error result while the task is still running, or when it failed."
    )]
    async fn get_task_result(&self, Parameters(params): Parameters<TaskParams>) -> ToolResult {
        if let Err(invalid) = params.check() {
            return invalid_parameter(invalid);
        }
        let task = match self.task(&params.task_id).await {
            Ok(task) => task,
            Err(status) => return self.driver_error(status),
        };
        let whole = whole_task(&task.task_id);
        if !task.status().is_terminal() {
            let mut value = task_json(&task);
            value["error"] = json!(format!(
                "task {} is still {}; call wait_for_task",
                task.task_id,
                task.status().label()
            ));
            return failed(value, &whole);
        }
        let mut files = FilesChanged::default();
        let noted = self.follow_task(&params.task_id, MAX_WAIT, |event| {
            files.note(event);
            false
        });
        if let Err(status) = noted.await {
            return self.driver_error(status);
        }
        let mut value = task_json(&task);
        summary::add_files_changed(&mut value, files.files);
        let request = GetTaskDiffRequest {
            task_id: task.task_id.clone(),
            ..GetTaskDiffRequest::default()
        };
        let diff = patiently(|| {
            let mut driver = self.driver.clone();
            let request = request.clone();
            async move { driver.get_task_diff(request).await }
        })
        .await;
        match diff {
            Ok(answer) => summary::add_diff(&mut value, &answer.into_inner()),
            // The task's result stands without its diff: its workspace may be gone.
            Err(status) => value["diffError"] = json!(bounds::error_message(status.message())),
        }
        if task.status() == TaskStatus::Completed {
            ok(value, &whole)
        } else {
            failed(value, &whole)
        }
    }

    #[tool(description = "Cancel a task that has not finished.")]
    async fn cancel_task(&self, Parameters(params): Parameters<CancelParams>) -> ToolResult {
        if let Err(invalid) = params.check() {
            return invalid_parameter(invalid);
        }
        let request = CancelTaskRequest {
            task_id: params.task_id,
            reason: params
                .reason
                .unwrap_or_else(|| "cancelled through MCP".to_owned()),
        };
        match self.driver.clone().cancel_task(request).await {
            Ok(response) => {
                let task = response.into_inner().task.unwrap_or_default();
                ok(task_json(&task), &whole_task(&task.task_id))
            }
            Err(status) => self.driver_error(status),
        }
    }

    #[tool(
        description = "Tasks on the cluster, newest last, a page at a time: optionally only those in one status (pending, running, completed, failed, cancelled), or only those this primary spawned (mine: true). Long texts are cut in lists; a page that would be too large ends early. When nextPageToken is set, call again with pageToken for the tasks after these."
    )]
    async fn list_tasks(&self, Parameters(params): Parameters<ListParams>) -> ToolResult {
        if let Err(invalid) = params.check() {
            return invalid_parameter(invalid);
        }
        let mut statuses = Vec::new();
        if let Some(status) = &params.status {
            match TaskStatus::from_label(status) {
                Some(status) => statuses.push(status as i32),
                None => {
                    return invalid_parameter(InvalidParameter {
                        parameter: "status",
                        problem: format!(
                            "`{status}` is not pending, assigned, running, completed, failed or cancelled"
                        ),
                    });
                }
            }
        }
        let mut label_selector = HashMap::new();
        let parent = match (&params.parent_session_id, params.mine.unwrap_or(false)) {
            (Some(parent), _) => Some(parent.clone()),
            (None, true) => match &self.parent_session {
                Some(parent) => Some(parent.clone()),
                None => {
                    return Ok(CallToolResult::error(vec![ContentBlock::text(
                        "this MCP server does not know its client's Claude Code session (Claude Code passes CLAUDE_CODE_SESSION_ID to stdio servers); give parentSessionId instead",
                    )]));
                }
            },
            (None, false) => None,
        };
        if let Some(parent) = parent {
            label_selector.insert(PARENT_SESSION_LABEL.to_owned(), parent);
        }
        let request = ListTasksRequest {
            statuses,
            page_size: params.page_size(),
            page_token: params.page_token.clone().unwrap_or_default(),
            label_selector,
        };
        let page = match self.driver.clone().list_tasks(request.clone()).await {
            Ok(response) => response.into_inner(),
            Err(status) => return self.driver_error(status),
        };
        let (mut value, shown) = summary::tasks_json(&page.tasks, &page.next_page_token);
        if shown < page.tasks.len() {
            // The page ends early, so the driver's token would skip the tasks left out. The same
            // request for as many tasks as were shown gives the token for the tasks after them.
            let shorter = ListTasksRequest {
                page_size: u32::try_from(shown).unwrap_or(u32::MAX),
                ..request
            };
            match self.driver.clone().list_tasks(shorter).await {
                Ok(response) => {
                    value["nextPageToken"] = json!(response.into_inner().next_page_token);
                }
                Err(_) => {
                    if let Some(fields) = value.as_object_mut() {
                        fields.remove("nextPageToken");
                    }
                    value["note"] = json!("ask for fewer tasks with limit to see the rest");
                }
            }
        }
        ok(value, summary::WHOLE_TASK_LIST)
    }

    #[tool(
        description = "Open a session: a long-lived agent in a container that keeps its workspace and conversation between messages. Needs a container worker."
    )]
    async fn create_session(
        &self,
        Parameters(params): Parameters<CreateSessionParams>,
    ) -> ToolResult {
        if let Err(invalid) = params.check() {
            return invalid_parameter(invalid);
        }
        let repo_url = params.repo_url.clone();
        let request = CreateSessionRequest {
            spec: Some(params.into_spec()),
        };
        match self.driver.clone().create_session(request).await {
            Ok(response) => {
                let session = response.into_inner().session.unwrap_or_default();
                ok(
                    session_json(&session),
                    &summary::whole_session(&session.session_id),
                )
            }
            Err(status) => self.spec_error(status, repo_url.as_deref()),
        }
    }

    #[tool(
        description = "Send a message to a session and wait up to timeoutSeconds (default 30, at most 50) for the reply. If the reply takes longer, returns the message's turn: call wait_for_reply with it."
    )]
    async fn send_message(&self, Parameters(params): Parameters<SendParams>) -> ToolResult {
        if let Err(invalid) = params.check() {
            return invalid_parameter(invalid);
        }
        let request = SendSessionMessageRequest {
            session_id: params.session_id.clone(),
            text: params.text,
        };
        let stream = match self.driver.clone().send_session_message(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return self.driver_error(status),
        };
        self.reply(&params.session_id, stream, wait_for(params.timeout_seconds))
            .await
    }

    #[tool(
        description = "Wait up to timeoutSeconds (default 30, at most 50) for the reply to a session's message (its turn, as send_message returned it)."
    )]
    async fn wait_for_reply(&self, Parameters(params): Parameters<ReplyParams>) -> ToolResult {
        if let Err(invalid) = params.check() {
            return invalid_parameter(invalid);
        }
        let mut events = Vec::new();
        match self
            .follow_turn(
                &params.session_id,
                params.turn,
                0,
                wait_for(params.timeout_seconds),
                &mut events,
            )
            .await
        {
            Ok(complete) => summary::reply_json(&params.session_id, &events, complete),
            Err(status) => self.driver_error(status),
        }
    }

    #[tool(description = "Close a session: its container and volumes are removed.")]
    async fn close_session(&self, Parameters(params): Parameters<SessionParams>) -> ToolResult {
        if let Err(invalid) = params.check() {
            return invalid_parameter(invalid);
        }
        let request = CloseSessionRequest {
            session_id: params.session_id,
        };
        match self.driver.clone().close_session(request).await {
            Ok(response) => {
                let session = response.into_inner().session.unwrap_or_default();
                ok(
                    session_json(&session),
                    &summary::whole_session(&session.session_id),
                )
            }
            Err(status) => self.driver_error(status),
        }
    }

    #[tool(
        description = "The cluster: workers with their execution modes, capacity, load and health; tasks by status; the queue."
    )]
    async fn cluster_status(&self) -> ToolResult {
        match self
            .driver
            .clone()
            .get_cluster_status(GetClusterStatusRequest {})
            .await
        {
            Ok(response) => ok(
                summary::cluster_json(&response.into_inner()),
                summary::WHOLE_CLUSTER,
            ),
            Err(status) => self.driver_error(status),
        }
    }
}

impl ClusterTools {
    /// The reply to a message, from the stream `SendSessionMessage` opened; when the stream
    /// breaks (the driver restarted), the rest of the turn from the session's events.
    async fn reply(
        &self,
        session_id: &str,
        stream: tonic::Streaming<SendSessionMessageResponse>,
        limit: Duration,
    ) -> ToolResult {
        let deadline = tokio::time::Instant::now() + limit;
        let mut stream = stream;
        let mut events: Vec<Event> = Vec::new();
        let streamed = tokio::time::timeout_at(deadline, async {
            loop {
                match stream.message().await {
                    Ok(Some(response)) => events.extend(response.event),
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(status),
                }
            }
        })
        .await;
        let complete = match streamed {
            Err(_) => false,
            Ok(Ok(())) => true,
            Ok(Err(status)) if resumable(&status) => {
                let Some((turn, after)) = events
                    .iter()
                    .rev()
                    .find(|event| event.turn > 0)
                    .map(|event| (event.turn, events.last().map_or(0, |last| last.sequence)))
                else {
                    return self.driver_error(status);
                };
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match self
                    .follow_turn(session_id, turn, after, left, &mut events)
                    .await
                {
                    Ok(ended) => ended,
                    Err(status) => return self.driver_error(status),
                }
            }
            Ok(Err(status)) => return self.driver_error(status),
        };
        summary::reply_json(session_id, &events, complete)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for ClusterTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("claudecluster", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "ClaudeCluster runs Claude Code agents in containers. spawn_claude_container starts one on a task and returns at once; wait_for_task waits (bounded) for it to end; get_task_result returns its answer and the files it wrote. Sessions (create_session, send_message, close_session) keep one agent and its files across messages.",
            )
    }
}

/// Serves the tools on stdin and stdout until the client closes them.
pub async fn serve_stdio(tools: ClusterTools) -> Result<(), String> {
    let running = tools
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|err| format!("cannot start the MCP session: {err}"))?;
    running
        .waiting()
        .await
        .map_err(|err| format!("the MCP session failed: {err}"))?;
    Ok(())
}

/// A running streamable HTTP MCP server.
pub struct Handle {
    pub local_addr: SocketAddr,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Handle {
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.stop.cancel();
        self.server.await.expect("the MCP server task panicked")
    }
}

/// Serves the tools over streamable HTTP at `/mcp` on `listener`.
/// The certificate and key (PEM) the HTTP endpoint serves TLS with.
pub struct HttpTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// Serves the tools over streamable HTTP at `/mcp`, over TLS with `tls`. With `api_key`, a
/// request must present it (`authorization: Bearer <key>`), or is answered 401.
pub fn serve_http(
    tools: ClusterTools,
    listener: TcpListener,
    api_key: Option<String>,
    tls: Option<HttpTls>,
) -> std::io::Result<Handle> {
    let local_addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let mut config = StreamableHttpServerConfig::default();
    config.cancellation_token = stop.child_token();
    let service = StreamableHttpService::new(
        move || Ok(tools.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let expected = api_key.map(|key| Arc::new(format!("Bearer {key}")));
    let app = axum::Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let expected = expected.clone();
                async move {
                    if let Some(expected) = expected {
                        let presented = request
                            .headers()
                            .get(axum::http::header::AUTHORIZATION)
                            .map(|value| value.as_bytes())
                            .unwrap_or_default();
                        if !same_bytes(presented, expected.as_bytes()) {
                            return axum::http::Response::builder()
                                .status(axum::http::StatusCode::UNAUTHORIZED)
                                .header(axum::http::header::WWW_AUTHENTICATE, "Bearer")
                                .body(axum::body::Body::from(
                                    "this MCP server takes requests with its API key: send `authorization: Bearer <key>`",
                                ))
                                .expect("a static response");
                        }
                    }
                    next.run(request).await
                }
            },
        ));
    let shutdown = stop.clone();
    let server = match tls {
        None => tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }),
        Some(tls) => {
            let acceptor = tls_acceptor(&tls)?;
            tokio::spawn(serve_tls(listener, app, acceptor, shutdown))
        }
    };
    tracing::info!(address = %local_addr, path = "/mcp", "mcp server listening");
    Ok(Handle {
        local_addr,
        stop,
        server,
    })
}

fn tls_acceptor(tls: &HttpTls) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let invalid = |what: &str, err: &dyn std::fmt::Display| {
        std::io::Error::other(format!("the MCP server's TLS {what} is unusable: {err}"))
    };
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid("certificate", &err))?;
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|err| invalid("key", &err))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| invalid("setup", &err))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|err| invalid("certificate", &err))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` over TLS until `stop`: each connection is handshaken, then served HTTP/1.1
/// (what streamable HTTP uses); a failed handshake closes that connection only.
async fn serve_tls(
    listener: TcpListener,
    app: axum::Router,
    acceptor: tokio_rustls::TlsAcceptor,
    stop: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let (acceptor, app, stop) = (acceptor.clone(), app.clone(), stop.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

/// Compares in constant time, so that the answer's timing tells nothing of the key.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |differ, (x, y)| differ | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tools_schemas_still_describe_their_parameters() {
        let tools = ClusterTools::tool_router().list_all();
        let spawn = tools
            .iter()
            .find(|tool| tool.name == "spawn_claude_container")
            .unwrap();
        let schema = serde_json::to_value(&*spawn.input_schema).unwrap();
        assert_eq!(schema["required"], json!(["task"]));
        for parameter in ["task", "repoUrl", "sessionTimeout", "memory", "cpus"] {
            assert!(schema["properties"].get(parameter).is_some(), "{schema}");
        }
        let list = tools.iter().find(|tool| tool.name == "list_tasks").unwrap();
        let schema = serde_json::to_value(&*list.input_schema).unwrap();
        assert!(schema["properties"].get("pageToken").is_some(), "{schema}");
    }

    #[test]
    fn files_changed_are_noted_once_each_in_order() {
        let write = |path: &str| Event {
            kind: Some(Kind::ToolUse(AgentToolUse {
                name: "Write".into(),
                input_json: json!({ "file_path": path }).to_string(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let mut files = FilesChanged::default();
        for event in [write("b.rs"), write("a.rs"), write("b.rs")] {
            files.note(&event);
        }
        files.note(&Event {
            kind: Some(Kind::ToolUse(AgentToolUse {
                name: "Edit".into(),
                input_json: "not json".into(),
                ..Default::default()
            })),
            ..Default::default()
        });
        assert_eq!(files.files, ["b.rs", "a.rs"]);
    }
}
