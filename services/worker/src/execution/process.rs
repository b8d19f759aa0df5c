//! The process pool: each agent a local `claude` process.

use std::process::Stdio;

use async_trait::async_trait;
use claudecluster_proto::v1::ExecutionMode;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};

use super::output::{OutputStream, forward_lines, input_writer};
use super::signal;
use super::{
    AgentControl, AgentExit, AgentHandle, AgentInput, AgentLaunch, ExecutionProvider, LaunchError,
};

/// Variables of the worker's own environment a local agent needs to run at all.
const HOST_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR", "TZ",
];

pub struct ProcessPoolProvider {
    claude_path: String,
}

impl ProcessPoolProvider {
    pub fn new(claude_path: impl Into<String>) -> Self {
        ProcessPoolProvider {
            claude_path: claude_path.into(),
        }
    }

    fn launch_error(&self, err: std::io::Error) -> LaunchError {
        let path = &self.claude_path;
        let setting = "worker.processPool.claudeCodePath";
        LaunchError(match err.kind() {
            std::io::ErrorKind::NotFound => {
                format!("the claude CLI was not found at `{path}` (set `{setting}`)")
            }
            std::io::ErrorKind::PermissionDenied => {
                format!("the claude CLI at `{path}` is not executable (`{setting}`)")
            }
            _ => format!("cannot start the claude CLI at `{path}`: {err}"),
        })
    }
}

#[async_trait]
impl ExecutionProvider for ProcessPoolProvider {
    fn mode(&self) -> ExecutionMode {
        ExecutionMode::ProcessPool
    }

    async fn launch(&self, launch: AgentLaunch) -> Result<AgentHandle, LaunchError> {
        let mut command = Command::new(&self.claude_path);
        command
            .args(&launch.args)
            .env_clear()
            .envs(
                HOST_ENV
                    .iter()
                    .filter_map(|name| Some((*name, std::env::var_os(name)?))),
            )
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&launch.workspace)
            // A silent open stdin makes the CLI wait 3 s for input; /dev/null does not.
            .stdin(match launch.input {
                AgentInput::None => Stdio::null(),
                AgentInput::StreamJson => Stdio::piped(),
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that tools the agent started die with it.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|err| self.launch_error(err))?;
        let pid = child.id().expect("a just-spawned child has a pid");
        tracing::debug!(task = %launch.task_id, pid, "agent process started");

        let (lines, output) = mpsc::channel(256);
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        tokio::spawn(forward_lines(stdout, OutputStream::Stdout, lines.clone()));
        tokio::spawn(forward_lines(stderr, OutputStream::Stderr, lines));

        let input = child.stdin.take().map(input_writer);

        let (exit_tx, exit) = oneshot::channel();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Tools the agent left running would hold its output open; end them with it.
            let _ = signal::send(pid, signal::SIGKILL, true);
            let exit = match status {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    AgentExit {
                        code: status.code(),
                        signal: status.signal(),
                        detail: None,
                    }
                }
                Err(err) => AgentExit {
                    detail: Some(format!("cannot wait for the agent: {err}")),
                    ..AgentExit::default()
                },
            };
            let _ = exit_tx.send(exit);
        });
        Ok(AgentHandle {
            output,
            exit,
            control: Box::new(LocalProcess { pid }),
            input,
            description: format!("process {pid}"),
        })
    }
}

struct LocalProcess {
    pid: u32,
}

#[async_trait]
impl AgentControl for LocalProcess {
    async fn interrupt(&self) -> std::io::Result<()> {
        signal::send(self.pid, signal::SIGINT, false)
    }

    async fn kill(&self) -> std::io::Result<()> {
        signal::send(self.pid, signal::SIGKILL, true)
    }
}
