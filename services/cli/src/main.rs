//! `claudecluster`: runs the services (`up`, `driver`, `scheduler`, `worker`) and drives a
//! cluster from a terminal (`run`, `tasks`, `status`).

mod client;
mod files;
mod keys;
mod render;
mod serve;
mod top;
mod usage;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "claudecluster",
    version,
    about = "Run many Claude Code agents at once and drive them over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run driver, scheduler and one worker in this process.
    Up(ServeArgs),
    /// Run the driver (the public API).
    Driver(ServeArgs),
    /// Run the scheduler.
    Scheduler(ServeArgs),
    /// Run a worker.
    Worker(ServeArgs),
    /// Serve the cluster as MCP tools, over stdio (for a Claude Code `--mcp-config`) or HTTP.
    Mcp(McpArgs),
    /// Submit a task.
    Run(client::RunArgs),
    /// List, inspect and cancel tasks.
    #[command(subcommand)]
    Tasks(client::TasksCommand),
    /// Show workers and queues.
    Status(client::DriverArgs),
    /// A live view of workers, queues, running tasks and sessions, until `q`.
    Top(top::TopArgs),
    /// Open long-lived agents and talk to them.
    #[command(subcommand)]
    Session(client::SessionCommand),
    /// List, drain and switch workers (through the scheduler and the worker itself).
    #[command(subcommand)]
    Workers(client::WorkersCommand),
    /// The driver's API keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Who did what: the driver's audit log.
    Audit(client::DriverArgs),
    /// What the work cost: cost and tokens by task tree, session, key, worker and model, and
    /// the budgets.
    Usage(usage::UsageArgs),
    /// Certificates for TLS between the services and to the driver.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(clap::Subcommand)]
enum CertsCommand {
    /// Make a cluster CA and a certificate for the driver, the scheduler, workers and an admin.
    Init {
        /// Where the files go.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// A name or address the services are reached at besides localhost (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

fn certs(command: CertsCommand) -> ExitCode {
    let CertsCommand::Init { dir, hosts } = command;
    match claudecluster_grpc::tls::make_certificates(&dir, &hosts) {
        Ok(written) => {
            for path in &written {
                eprintln!("wrote {}", path.display());
            }
            let path = |name: &str| dir.join(name).display().to_string();
            println!("# In the file of `claudecluster up` (each service's section takes its own):");
            for service in ["driver", "scheduler", "worker"] {
                println!(
                    "{service}:\n  tls:\n    ca: {}\n    cert: {}\n    key: {}",
                    path("ca.pem"),
                    path(&format!("{service}.pem")),
                    path(&format!("{service}.key"))
                );
            }
            println!(
                "# Clients: --ca {} (and --cert {} --key {} for `claudecluster workers`)",
                path("ca.pem"),
                path("admin.pem"),
                path("admin.key")
            );
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("claudecluster: {message}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    /// A YAML configuration file. For `up` it holds `driver:`, `scheduler:` and `worker:`
    /// sections; for a single service, that service's keys.
    #[arg(long, short, env = "CLAUDECLUSTER_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct McpArgs {
    /// A YAML file with the MCP server's keys (`listen`, `driverAddress`).
    #[arg(long, short, env = "CLAUDECLUSTER_CONFIG")]
    config: Option<PathBuf>,
    /// Serve streamable HTTP at `/mcp` instead of stdio.
    #[arg(long)]
    http: bool,
    /// The HTTP address (default `mcp.listen`, 127.0.0.1:50054).
    #[arg(long)]
    listen: Option<String>,
    /// The driver (default `mcp.driverAddress`, 127.0.0.1:50051); several, separated by commas,
    /// for a leader and its standbys.
    #[arg(long, env = "CLAUDECLUSTER_DRIVER")]
    driver: Option<String>,
    /// The API key the tools present to the driver (what they spawn belongs to it), and that
    /// HTTP clients must present to the MCP server.
    #[arg(long, env = "CLAUDECLUSTER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Connect to the driver over TLS, trusting this CA (PEM).
    #[arg(long, env = "CLAUDECLUSTER_CA")]
    ca: Option<PathBuf>,
}

/// A command piped into `head` should end quietly when the pipe closes, as other tools do,
/// rather than fail writing to it: Rust ignores SIGPIPE unless told otherwise.
#[allow(unsafe_code)]
fn end_quietly_on_closed_pipes() {
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Only the client commands: a service must outlive a closed log pipe long enough to stop
    // its agents and remove its containers.
    if matches!(
        cli.command,
        Command::Run(_)
            | Command::Tasks(_)
            | Command::Status(_)
            | Command::Top(_)
            | Command::Session(_)
            | Command::Workers(_)
            | Command::Keys(_)
            | Command::Audit(_)
            | Command::Usage(_)
    ) {
        end_quietly_on_closed_pipes();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime");
    runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => serve::run(serve::Services::All, args.config).await,
            Command::Driver(args) => serve::run(serve::Services::Driver, args.config).await,
            Command::Scheduler(args) => serve::run(serve::Services::Scheduler, args.config).await,
            Command::Worker(args) => serve::run(serve::Services::Worker, args.config).await,
            Command::Mcp(args) => {
                serve::mcp(
                    args.config,
                    args.http,
                    args.listen,
                    args.driver,
                    args.api_key,
                    args.ca,
                )
                .await
            }
            Command::Run(args) => client::report(client::run(args).await),
            Command::Tasks(command) => client::report(client::tasks(command).await),
            Command::Status(args) => client::report(client::status(args).await),
            Command::Top(args) => client::report(top::top(args).await),
            Command::Session(command) => client::report(client::session(command).await),
            Command::Workers(command) => client::report(client::workers(command).await),
            Command::Keys(command) => client::report(keys::keys(command).await),
            Command::Audit(args) => client::report(keys::audit(args).await),
            Command::Usage(args) => client::report(usage::usage(args).await),
            Command::Certs(command) => certs(command),
        }
    })
}
