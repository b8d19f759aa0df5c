//! Client commands: they talk to the driver like any other gRPC client.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use claudecluster_grpc::ClientChannel as Channel;
use claudecluster_proto::v1::driver_service_client::DriverServiceClient;
use claudecluster_proto::v1::event::Kind;
use claudecluster_proto::v1::*;

use crate::render;

#[derive(Args, Clone)]
pub struct DriverArgs {
    /// The driver's address; several, separated by commas, for a leader and its standbys.
    #[arg(
        long,
        env = "CLAUDECLUSTER_DRIVER",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    driver: String,
    /// The API key, when the driver takes keys.
    #[arg(
        long,
        env = "CLAUDECLUSTER_API_KEY",
        global = true,
        hide_env_values = true
    )]
    api_key: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// TLS of a client: the CA that signed the server's certificate, and a certificate of the
/// client's own where the server asks for one (an admin's, for the scheduler and workers).
#[derive(Args, Clone, Default)]
pub struct TlsArgs {
    /// Connect over TLS, trusting this CA (PEM), e.g. `ca.pem` of `claudecluster certs init`.
    #[arg(long, env = "CLAUDECLUSTER_CA", global = true)]
    ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM), with --key.
    #[arg(long, env = "CLAUDECLUSTER_CERT", global = true)]
    cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "CLAUDECLUSTER_KEY", global = true)]
    key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    pub fn load(&self) -> Result<Option<claudecluster_grpc::tls::Tls>, String> {
        match (&self.ca, &self.cert, &self.key) {
            (None, None, None) => Ok(None),
            (None, _, _) => Err("--cert and --key need --ca".into()),
            (Some(_), Some(_), None) | (Some(_), None, Some(_)) => {
                Err("--cert and --key go together".into())
            }
            (Some(ca), cert, key) => {
                claudecluster_grpc::tls::Tls::from_files(ca, cert.as_deref(), key.as_deref())
                    .map(Some)
            }
        }
    }
}

#[derive(Args)]
pub struct RunArgs {
    /// What the agent should do.
    prompt: String,
    /// A git repository to clone into the task's workspace.
    #[arg(long)]
    repo: Option<String>,
    /// Stream the agent's progress until the task ends; exit non-zero unless it completed.
    #[arg(long, short)]
    follow: bool,
    /// Run only on workers of this execution mode: process_pool or container_agentic.
    #[arg(long)]
    mode: Option<String>,
    /// low, normal, high or critical.
    #[arg(long)]
    priority: Option<String>,
    /// Only on workers carrying this label (repeatable): key=value.
    #[arg(long = "selector", value_name = "KEY=VALUE")]
    selectors: Vec<String>,
    /// Wall-clock limit in seconds.
    #[arg(long)]
    timeout: Option<u32>,
    #[arg(long)]
    model: Option<String>,
    /// Tools the agent may use without asking, comma-separated (e.g. Write,Bash).
    #[arg(long, value_delimiter = ',')]
    allowed_tools: Vec<String>,
    #[arg(long)]
    permission_mode: Option<String>,
    #[arg(long)]
    max_turns: Option<u32>,
    /// Push the agent's changes to the repository as this branch (`{task_id}` and `{attempt}`
    /// are filled in).
    #[arg(long, value_name = "NAME")]
    branch: Option<String>,
    /// Also open a pull request of the branch.
    #[arg(long, requires = "branch")]
    pull_request: bool,
    /// The branch the pull request merges into (default: the one cloned).
    #[arg(long, value_name = "BRANCH", requires = "pull_request")]
    pull_request_base: Option<String>,
    #[command(flatten)]
    driver: DriverArgs,
}

#[derive(Subcommand)]
pub enum TasksCommand {
    /// Tasks in submission order.
    List {
        /// Only tasks in this status (repeatable): pending, running, completed, ...
        #[arg(long = "status")]
        statuses: Vec<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// One task in full.
    Get {
        task_id: String,
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// Cancel a task.
    Cancel {
        task_id: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// Stream a task's events (from the start, or after a sequence number).
    Events {
        task_id: String,
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// The files of a task's workspace (or a session's, with --session), and how each changed.
    Files(crate::files::FilesArgs),
    /// Download a task's workspace, or some of its paths, into a directory.
    Download(crate::files::DownloadArgs),
    /// The diff of what a task's agent changed.
    Diff(crate::files::DiffArgs),
    /// Delete an ended task: its record, its events and its workspace.
    Rm {
        task_id: String,
        #[command(flatten)]
        driver: DriverArgs,
    },
}

impl DriverArgs {
    /// The driver's address, as given.
    pub fn address(&self) -> &str {
        &self.driver
    }
}

pub fn connect(args: &DriverArgs) -> Result<DriverServiceClient<Channel>, String> {
    let bearer = claudecluster_grpc::Bearer::new(
        args.api_key.as_deref(),
        "--api-key / CLAUDECLUSTER_API_KEY",
    )?;
    let tls = args.tls.load()?;
    claudecluster_grpc::client_channel(&args.driver, bearer, tls.as_ref())
        .map(|channel| {
            DriverServiceClient::new(channel)
                .max_decoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
        })
        .map_err(|err| format!("bad driver address `{}`: {err}", args.driver))
}

/// What a client command ends with, said once: an error is printed and exits 1.
pub fn report(outcome: Result<ExitCode, String>) -> ExitCode {
    outcome.unwrap_or_else(|message| {
        eprintln!("claudecluster: {message}");
        ExitCode::FAILURE
    })
}

pub fn status_error(status: tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn key_values(pairs: &[String], flag: &str) -> Result<HashMap<String, String>, String> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("{flag} `{pair}` is not KEY=VALUE"))
        })
        .collect()
}

fn task_spec(args: &RunArgs) -> Result<TaskSpec, String> {
    let execution_mode = match &args.mode {
        Some(mode) => ExecutionMode::from_label(mode)
            .ok_or_else(|| format!("--mode `{mode}` is not process_pool or container_agentic"))?,
        None => ExecutionMode::Unspecified,
    };
    let priority = match &args.priority {
        Some(priority) => Priority::from_label(priority).ok_or_else(|| {
            format!("--priority `{priority}` is not low, normal, high or critical")
        })?,
        None => Priority::Unspecified,
    };
    Ok(TaskSpec {
        prompt: args.prompt.clone(),
        repo_url: args.repo.clone().unwrap_or_default(),
        execution_mode: execution_mode as i32,
        worker_selector: key_values(&args.selectors, "--selector")?,
        limits: Some(ResourceLimits {
            timeout_seconds: args.timeout.unwrap_or_default(),
            ..Default::default()
        }),
        priority: priority as i32,
        agent: Some(AgentOptions {
            model: args.model.clone().unwrap_or_default(),
            allowed_tools: args.allowed_tools.clone(),
            permission_mode: args.permission_mode.clone().unwrap_or_default(),
            max_turns: args.max_turns.unwrap_or_default(),
            ..Default::default()
        }),
        result: args.branch.as_ref().map(|branch| ResultSpec {
            branch: branch.clone(),
            pull_request: args.pull_request,
            pull_request_base: args.pull_request_base.clone().unwrap_or_default(),
            commit_message: String::new(),
        }),
        ..Default::default()
    })
}

pub async fn run(args: RunArgs) -> Result<ExitCode, String> {
    let spec = task_spec(&args)?;
    let mut client = connect(&args.driver)?;
    let task = match client
        .submit_task(SubmitTaskRequest { spec: Some(spec) })
        .await
    {
        Ok(response) => response.into_inner().task.unwrap_or_default(),
        Err(status) => return Err(status_error(status)),
    };
    if !args.follow {
        println!("{}", task.task_id);
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("task {}", task.task_id);
    follow(&mut client, &task.task_id, 0, true).await
}

/// How long a client keeps trying to reach a driver that went away (a restart, a failover)
/// before it gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// Whether a stream that failed with `status` is worth opening again: the driver restarted,
/// shut down or could not be reached.
fn worth_resuming(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
    )
}

/// Keeps trying while a driver is away: waits a little longer each time, and says so once.
struct Reconnection {
    since: Option<tokio::time::Instant>,
    pause: Duration,
}

impl Reconnection {
    fn new() -> Self {
        Reconnection {
            since: None,
            pause: Duration::from_millis(100),
        }
    }

    /// The stream made progress: the next break starts a fresh wait.
    fn progressed(&mut self) {
        self.since = None;
        self.pause = Duration::from_millis(100);
    }

    /// Waits before the next try; `Err` once the driver has been away too long.
    async fn pause(&mut self, status: &tonic::Status, cursor: u64) -> Result<(), String> {
        let since = *self.since.get_or_insert_with(|| {
            eprintln!(
                "claudecluster: stream interrupted ({}); resuming after event {cursor}",
                status.message()
            );
            tokio::time::Instant::now()
        });
        if since.elapsed() > RECONNECT_FOR {
            return Err(format!(
                "the driver has been unreachable for {} s: {}",
                RECONNECT_FOR.as_secs(),
                status.message()
            ));
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(2));
        Ok(())
    }
}

/// Hands the events of the stream `open(after)` opens to `take` until it returns a value,
/// opening the stream again after the last event seen when it breaks (a driver that
/// restarts, shuts down or fails over). A stream that ends is opened again too when
/// `resume_when_ended`; otherwise the end is `None`.
async fn follow_resuming<R, F, Fut, T>(
    open: F,
    mut cursor: u64,
    resume_when_ended: bool,
    mut take: impl FnMut(Event) -> Option<T>,
) -> Result<Option<T>, String>
where
    R: claudecluster_proto::CarriesEvent,
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<R>>, tonic::Status>>,
{
    let mut reconnection = Reconnection::new();
    loop {
        let mut stream = match open(cursor).await {
            Ok(response) => response.into_inner(),
            Err(status) if worth_resuming(&status) => {
                reconnection.pause(&status, cursor).await?;
                continue;
            }
            Err(status) => return Err(status_error(status)),
        };
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    let Some(event) = response.into_event() else {
                        continue;
                    };
                    reconnection.progressed();
                    cursor = event.sequence;
                    if let Some(done) = take(event) {
                        return Ok(Some(done));
                    }
                }
                // A stream that ends before what it follows did was cut (a driver that
                // stopped): it is opened again like one that broke.
                Ok(None) if resume_when_ended => {
                    let cut = tonic::Status::unavailable("the stream ended before the task");
                    reconnection.pause(&cut, cursor).await?;
                    break;
                }
                Ok(None) => return Ok(None),
                Err(status) if worth_resuming(&status) => {
                    reconnection.pause(&status, cursor).await?;
                    break;
                }
                Err(status) => return Err(status_error(status)),
            }
        }
    }
}

/// Prints a task's events until it ends, resuming when the stream breaks. Ctrl-C cancels the
/// task (when `cancel_on_interrupt`) and keeps following.
async fn follow(
    client: &mut DriverServiceClient<Channel>,
    task_id: &str,
    after: u64,
    cancel_on_interrupt: bool,
) -> Result<ExitCode, String> {
    let interrupt = cancel_on_interrupt.then(|| {
        let mut canceller = client.clone();
        let task_id = task_id.to_owned();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("cancelling task {task_id}…");
                let request = CancelTaskRequest {
                    task_id,
                    reason: "interrupted from the terminal".into(),
                };
                let _ = canceller.cancel_task(request).await;
            }
        })
    });
    let open = |after| {
        let mut client = client.clone();
        let request = StreamTaskEventsRequest {
            task_id: task_id.to_owned(),
            after_sequence: after,
        };
        async move { client.stream_task_events(request).await }
    };
    let ended = follow_resuming(open, after, true, |event| {
        render::event(&event);
        match &event.kind {
            Some(Kind::StatusChange(change)) if change.status().is_terminal() => {
                Some(if change.status() == TaskStatus::Completed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            _ => None,
        }
    })
    .await;
    if let Some(interrupt) = interrupt {
        interrupt.abort();
    }
    Ok(ended?.unwrap_or(ExitCode::FAILURE))
}

/// Prints a session's events after `after` until the session ends (or, with `turn`, until that
/// message is answered), resuming after the last event seen when the stream breaks. Returns
/// whether the turn succeeded.
async fn follow_session(
    client: &mut DriverServiceClient<Channel>,
    session_id: &str,
    after: u64,
    turn: Option<u32>,
) -> Result<bool, String> {
    let mut succeeded = false;
    let open = |after| {
        let mut client = client.clone();
        let request = StreamSessionEventsRequest {
            session_id: session_id.to_owned(),
            after_sequence: after,
        };
        async move { client.stream_session_events(request).await }
    };
    let ended = follow_resuming(open, after, false, |event| {
        let mine = turn.is_none_or(|turn| event.turn == turn);
        if mine {
            render::event(&event);
        }
        match &event.kind {
            Some(Kind::Result(result)) if mine => {
                succeeded = !result.is_error;
                None
            }
            Some(Kind::SessionState(change)) if change.state().is_final() => {
                Some(succeeded && turn.is_none())
            }
            Some(Kind::SessionState(change))
                if turn.is_some() && mine && change.state() != SessionState::Busy =>
            {
                Some(succeeded)
            }
            _ => None,
        }
    })
    .await?;
    Ok(ended.unwrap_or(succeeded))
}

pub async fn tasks(command: TasksCommand) -> Result<ExitCode, String> {
    match command {
        TasksCommand::List {
            statuses,
            limit,
            driver,
        } => {
            let mut parsed = Vec::new();
            for status in &statuses {
                match TaskStatus::from_label(status) {
                    Some(status) => parsed.push(status as i32),
                    None => return Err(format!("--status `{status}` is not a task status")),
                }
            }
            let mut client = connect(&driver)?;
            let request = ListTasksRequest {
                statuses: parsed,
                page_size: limit,
                page_token: String::new(),
                label_selector: Default::default(),
            };
            let response = client.list_tasks(request).await.map_err(status_error)?;
            render::task_table(&response.into_inner().tasks);
            Ok(ExitCode::SUCCESS)
        }
        TasksCommand::Get { task_id, driver } => {
            let mut client = connect(&driver)?;
            let response = client
                .get_task(GetTaskRequest { task_id })
                .await
                .map_err(status_error)?;
            render::task_detail(&response.into_inner().task.unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        TasksCommand::Cancel {
            task_id,
            reason,
            driver,
        } => {
            let mut client = connect(&driver)?;
            let request = CancelTaskRequest {
                task_id,
                reason: reason.unwrap_or_default(),
            };
            let response = client.cancel_task(request).await.map_err(status_error)?;
            render::task_detail(&response.into_inner().task.unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        TasksCommand::Events {
            task_id,
            after,
            driver,
        } => {
            let mut client = connect(&driver)?;
            follow(&mut client, &task_id, after, false).await
        }
        TasksCommand::Files(args) => crate::files::list(args).await,
        TasksCommand::Download(args) => crate::files::download(args).await,
        TasksCommand::Diff(args) => crate::files::diff(args).await,
        TasksCommand::Rm { task_id, driver } => {
            let mut client = connect(&driver)?;
            let answer = client
                .delete_task(DeleteTaskRequest {
                    task_id: task_id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let workspace = if answer.workspace_removed {
                "and its workspace"
            } else {
                "(its workspace was gone already, or its worker away: retention removes it)"
            };
            println!("deleted task {task_id} {workspace}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Subcommand)]
pub enum SessionCommand {
    /// Open a session; prints its id.
    New {
        /// A git repository to clone into the session's workspace.
        #[arg(long)]
        repo: Option<String>,
        /// Stop the container after this many seconds without a message.
        #[arg(long)]
        idle_timeout: Option<u32>,
        /// Tools the agent may use without asking, comma-separated.
        #[arg(long, value_delimiter = ',')]
        allowed_tools: Vec<String>,
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// Send a message and print the reply as it streams.
    Send {
        session_id: String,
        text: String,
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// Follow everything a session does (from the start, or after a sequence number).
    Attach {
        session_id: String,
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// Sessions in creation order.
    List {
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// One session in full.
    Get {
        session_id: String,
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// Close a session: its container and volumes are removed.
    Close {
        session_id: String,
        #[command(flatten)]
        driver: DriverArgs,
    },
}

pub async fn session(command: SessionCommand) -> Result<ExitCode, String> {
    match command {
        SessionCommand::New {
            repo,
            idle_timeout,
            allowed_tools,
            model,
            driver,
        } => {
            let mut client = connect(&driver)?;
            let spec = SessionSpec {
                repo_url: repo.unwrap_or_default(),
                idle_timeout_seconds: idle_timeout.unwrap_or_default(),
                agent: Some(AgentOptions {
                    allowed_tools,
                    model: model.unwrap_or_default(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            match client
                .create_session(CreateSessionRequest { spec: Some(spec) })
                .await
            {
                Ok(response) => {
                    println!(
                        "{}",
                        response.into_inner().session.unwrap_or_default().session_id
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(status) => Err(status_error(status)),
            }
        }
        SessionCommand::Send {
            session_id,
            text,
            driver,
        } => {
            let mut client = connect(&driver)?;
            let request = SendSessionMessageRequest {
                session_id: session_id.clone(),
                text,
            };
            let mut stream = match client.send_session_message(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => return Err(status_error(status)),
            };
            let mut succeeded = false;
            // The turn and the last event seen, to resume the reply if the stream breaks.
            let mut position: Option<(u32, u64)> = None;
            loop {
                match stream.message().await {
                    Ok(Some(response)) => {
                        let Some(event) = response.event else {
                            continue;
                        };
                        render::event(&event);
                        if event.turn > 0 {
                            position = Some((event.turn, event.sequence));
                        }
                        match &event.kind {
                            Some(Kind::Result(result)) => succeeded = !result.is_error,
                            Some(Kind::SessionState(change)) if change.state().is_final() => {
                                succeeded = false
                            }
                            _ => {}
                        }
                    }
                    Ok(None) => break,
                    Err(status) if worth_resuming(&status) => match position {
                        Some((turn, after)) => {
                            eprintln!(
                                "claudecluster: reply interrupted ({}); resuming after event {after}",
                                status.message()
                            );
                            succeeded =
                                follow_session(&mut client, &session_id, after, Some(turn)).await?;
                            break;
                        }
                        None => {
                            return Err(format!(
                                "the message was accepted but its reply was interrupted ({}); follow it with `claudecluster session attach {session_id}`",
                                status.message()
                            ));
                        }
                    },
                    Err(status) => return Err(status_error(status)),
                }
            }
            if succeeded {
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::FAILURE)
            }
        }
        SessionCommand::Attach {
            session_id,
            after,
            driver,
        } => {
            let mut client = connect(&driver)?;
            follow_session(&mut client, &session_id, after, None).await?;
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::List { driver } => {
            let mut client = connect(&driver)?;
            let response = client
                .list_sessions(ListSessionsRequest::default())
                .await
                .map_err(status_error)?;
            render::session_table(&response.into_inner().sessions);
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Get { session_id, driver } => {
            let mut client = connect(&driver)?;
            let response = client
                .get_session(GetSessionRequest { session_id })
                .await
                .map_err(status_error)?;
            render::session_detail(&response.into_inner().session.unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Close { session_id, driver } => {
            let mut client = connect(&driver)?;
            match client
                .close_session(CloseSessionRequest { session_id })
                .await
            {
                Ok(response) => {
                    render::session_detail(&response.into_inner().session.unwrap_or_default());
                    Ok(ExitCode::SUCCESS)
                }
                Err(status) => Err(status_error(status)),
            }
        }
    }
}

#[derive(Args, Clone)]
pub struct SchedulerArgs {
    /// The scheduler's address.
    #[arg(
        long,
        env = "CLAUDECLUSTER_SCHEDULER",
        default_value = "127.0.0.1:50052"
    )]
    scheduler: String,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Subcommand)]
pub enum WorkersCommand {
    /// Every worker the scheduler knows.
    List {
        #[command(flatten)]
        scheduler: SchedulerArgs,
    },
    /// Stop placing work on a worker; what runs there finishes.
    Drain {
        worker_id: String,
        #[command(flatten)]
        scheduler: SchedulerArgs,
    },
    /// Switch a worker's default execution mode without restarting it.
    Switch {
        /// The worker's address, as host:port.
        worker_address: String,
        /// process_pool or container_agentic.
        mode: String,
        #[command(flatten)]
        tls: TlsArgs,
    },
}

pub async fn workers(command: WorkersCommand) -> Result<ExitCode, String> {
    use claudecluster_proto::v1::scheduler_service_client::SchedulerServiceClient;
    use claudecluster_proto::v1::worker_service_client::WorkerServiceClient;
    // The scheduler and the workers take calls from the cluster's own services only: the
    // operator's CLI presents the secret of this host (or CLAUDECLUSTER_CLUSTER_SECRET).
    // Over TLS, it presents an admin's certificate (`admin.pem` of `claudecluster certs init`).
    let secret = claudecluster_grpc::ClusterSecret::resolve(
        std::env::var(claudecluster_grpc::cluster::SECRET_VARIABLE).ok(),
        None,
        &claudecluster_config::default_data_dir(),
    )?;
    let identity = |tls: &TlsArgs| {
        Ok::<_, String>(claudecluster_grpc::ClusterIdentity {
            secret: secret.clone(),
            tls: tls.load()?,
        })
    };
    let scheduler = |args: &SchedulerArgs| {
        claudecluster_grpc::cluster::cluster_channel(&args.scheduler, &identity(&args.tls)?)
            .map(|channel| {
                SchedulerServiceClient::new(channel)
                    .max_decoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
            })
            .map_err(|err| format!("bad scheduler address `{}`: {err}", args.scheduler))
    };
    match command {
        WorkersCommand::List { scheduler: args } => {
            let mut client = scheduler(&args)?;
            let response = client
                .list_workers(ListWorkersRequest {})
                .await
                .map_err(status_error)?;
            let status = GetClusterStatusResponse {
                workers: response.into_inner().workers,
                ..Default::default()
            };
            render::cluster_status(&status);
            Ok(ExitCode::SUCCESS)
        }
        WorkersCommand::Drain {
            worker_id,
            scheduler: args,
        } => {
            let mut client = scheduler(&args)?;
            let response = client
                .drain_worker(DrainWorkerRequest { worker_id })
                .await
                .map_err(status_error)?;
            let worker = response.into_inner().worker.unwrap_or_default();
            println!(
                "{}: {}",
                worker.worker_id,
                if worker.drained {
                    "drained"
                } else {
                    "draining"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        WorkersCommand::Switch {
            worker_address,
            mode,
            tls,
        } => {
            let Some(mode) =
                ExecutionMode::from_label(&mode).filter(|m| *m != ExecutionMode::Unspecified)
            else {
                return Err(format!("`{mode}` is not process_pool or container_agentic"));
            };
            let mut client = match claudecluster_grpc::cluster::cluster_channel(
                &worker_address,
                &identity(&tls)?,
            ) {
                Ok(channel) => WorkerServiceClient::new(channel)
                    .max_decoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(claudecluster_proto::MAX_MESSAGE_BYTES),
                Err(err) => {
                    return Err(format!("bad worker address `{worker_address}`: {err}"));
                }
            };
            match client
                .switch_execution_mode(SwitchExecutionModeRequest {
                    execution_mode: mode as i32,
                })
                .await
            {
                Ok(response) => {
                    let answer = response.into_inner();
                    let modes: Vec<&str> =
                        answer.execution_modes().map(ExecutionMode::label).collect();
                    println!(
                        "now {} (drained in {} ms, switched in {} ms)",
                        modes.join(", "),
                        answer.drain_millis,
                        answer.switch_millis
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(status) => Err(status_error(status)),
            }
        }
    }
}

pub async fn status(args: DriverArgs) -> Result<ExitCode, String> {
    let mut client = connect(&args)?;
    let response = client
        .get_cluster_status(GetClusterStatusRequest {})
        .await
        .map_err(status_error)?;
    render::cluster_status(&response.into_inner());
    Ok(ExitCode::SUCCESS)
}
