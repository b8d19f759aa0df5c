//! The process pool: each agent a local `claude` process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use claudecluster_proto::v1::ExecutionMode;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};

use super::output::{OutputStream, forward_lines, input_writer};
use super::{
    AgentControl, AgentExit, AgentHandle, AgentInput, AgentLaunch, ExecutionProvider, LaunchError,
};
use super::{signal, spawner};

/// Variables of the worker's own environment a local agent needs to run at all. `HOME` is the
/// agent's own (see [`agent_home`]).
const HOST_ENV: &[&str] = &["PATH", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR", "TZ"];

/// Where an agent whose workspace is `<root>/<name>` keeps its home (and its Claude Code
/// configuration, `.claude` in it): `<root>/.homes/<name>`, outside its workspace and removed
/// when it ends. An agent with the worker's own home would share settings, hooks, transcripts
/// and shell start-up files with the worker and every other agent.
fn agent_home(workspace: &Path) -> PathBuf {
    let root = workspace.parent().unwrap_or(workspace);
    let name = workspace.file_name().unwrap_or_default();
    root.join(".homes").join(name)
}

/// The variable every process of an agent carries (its tools inherit it, even those that start
/// a session of their own): `<root marker>/<workspace name>`. It finds what an agent left
/// running when it ended, or when its worker was killed.
const AGENT_MARK: &str = "CLAUDECLUSTER_AGENT";

/// The mark of the agents of workspace root `root`.
fn root_mark(root: &Path) -> String {
    // FNV-1a: the same on every build, so a worker of another version finds the marks too.
    let hash = root
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("{hash:016x}")
}

/// The mark of the agent working in `workspace` (`<root>/<name>`).
fn agent_mark(workspace: &Path) -> String {
    let root = workspace.parent().unwrap_or(workspace);
    let name = workspace.file_name().unwrap_or_default().to_string_lossy();
    format!("{}/{name}", root_mark(root))
}

/// Kills every process whose agent mark `matches`; returns how many.
fn kill_marked(matches: impl Fn(&str) -> bool) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let prefix = format!("{AGENT_MARK}=");
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Unreadable (another user's, or gone): not ours.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let marked = environ
            .split(|byte| *byte == 0)
            .filter_map(|pair| std::str::from_utf8(pair).ok())
            .filter_map(|pair| pair.strip_prefix(&prefix))
            .any(&matches);
        if marked && signal::send(pid, signal::SIGKILL, false).is_ok() {
            killed += 1;
        }
    }
    killed
}

/// Stops every process an agent of an earlier worker on `root` left running (the worker was
/// killed: its agents died with it, but not the tools they had started).
pub fn stop_leftover_agents(root: &Path) {
    let mark = format!("{}/", root_mark(root));
    let killed = kill_marked(|value| value.starts_with(&mark));
    if killed > 0 {
        tracing::info!(
            processes = killed,
            "stopped what an earlier worker's agents left running"
        );
    }
}

pub struct ProcessPoolProvider {
    claude_path: String,
    /// With `processPool.runAs`: the uids agents run as, and those taken.
    users: Option<Arc<AgentUsers>>,
}

/// A range of uids, one per running agent, so that agents can read neither the worker's
/// files nor each other's (nor each other's environment in `/proc`).
pub struct AgentUsers {
    first: u32,
    count: u32,
    taken: Mutex<std::collections::BTreeSet<u32>>,
}

impl AgentUsers {
    pub fn new(first: u32, count: u32) -> AgentUsers {
        AgentUsers {
            first,
            count,
            taken: Mutex::default(),
        }
    }

    fn take(&self) -> Option<u32> {
        let mut taken = self.taken.lock().expect("uid lock poisoned");
        let uid =
            (self.first..self.first.saturating_add(self.count)).find(|uid| !taken.contains(uid))?;
        taken.insert(uid);
        Some(uid)
    }

    fn give_back(&self, uid: u32) {
        self.taken.lock().expect("uid lock poisoned").remove(&uid);
    }
}

/// Makes `path` and everything under it `uid`'s (and group `uid`'s), not following links.
fn chown_tree(path: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid)?;
        }
    }
    Ok(())
}

impl ProcessPoolProvider {
    pub fn new(claude_path: impl Into<String>) -> Self {
        ProcessPoolProvider {
            claude_path: claude_path.into(),
            users: None,
        }
    }

    /// Agents run as uids of `users`, one each.
    pub fn running_as(mut self, users: AgentUsers) -> Self {
        self.users = Some(Arc::new(users));
        self
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
        let home = agent_home(&launch.workspace);
        tokio::fs::create_dir_all(&home)
            .await
            .map_err(|err| LaunchError(format!("cannot create {}: {err}", home.display())))?;
        let uid = match &self.users {
            None => None,
            Some(users) => {
                let uid = users.take().ok_or_else(|| {
                    LaunchError(
                        "every uid of worker.processPool.runAs is taken by a running agent".into(),
                    )
                })?;
                let (workspace, agent_home) = (launch.workspace.clone(), home.clone());
                let owned = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::PermissionsExt;
                    chown_tree(&workspace, uid)?;
                    chown_tree(&agent_home, uid)?;
                    std::fs::set_permissions(&agent_home, std::fs::Permissions::from_mode(0o700))?;
                    std::fs::set_permissions(&workspace, std::fs::Permissions::from_mode(0o700))
                })
                .await
                .expect("chown does not panic");
                if let Err(err) = owned {
                    users.give_back(uid);
                    return Err(LaunchError(format!(
                        "cannot give the agent's workspace and home to uid {uid} (worker.processPool.runAs): {err}"
                    )));
                }
                Some(uid)
            }
        };
        let mark = agent_mark(&launch.workspace);
        let mut command = Command::new(&self.claude_path);
        command
            .args(&launch.args)
            .env_clear()
            .envs(
                HOST_ENV
                    .iter()
                    .filter_map(|name| Some((*name, std::env::var_os(name)?))),
            )
            .env("HOME", &home)
            .env(AGENT_MARK, &mark)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            // Last, so that no setting shares one agent's settings, hooks and transcripts
            // with the next.
            .env("CLAUDE_CONFIG_DIR", home.join(".claude"))
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
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        let users = self.users.clone();
        let mut child = match spawner::spawn(command).await {
            Ok(child) => child,
            Err(err) => {
                if let (Some(users), Some(uid)) = (&users, uid) {
                    users.give_back(uid);
                }
                return Err(self.launch_error(err));
            }
        };
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
            // Tools the agent left running would hold its output open; end them with it, in
            // its process group and wherever else they went.
            let _ = signal::send(pid, signal::SIGKILL, true);
            let _ = tokio::task::spawn_blocking(move || kill_marked(|value| value == mark)).await;
            let _ = tokio::fs::remove_dir_all(&home).await;
            if let (Some(users), Some(uid)) = (users, uid) {
                users.give_back(uid);
            }
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
            grant: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::execution::Limits;

    #[tokio::test]
    async fn a_process_started_on_the_spawner_thread_is_piped_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let provider = ProcessPoolProvider::new("/bin/sh");
        let launch = AgentLaunch {
            task_id: "t1".into(),
            attempt: 1,
            args: vec!["-c".into(), "echo out; echo err >&2; exit 3".into()],
            env: Vec::new(),
            workspace: dir.path().to_path_buf(),
            input: AgentInput::None,
            limits: Limits::default(),
            mounts: Vec::new(),
            repo_url: None,
        };
        let mut agent = provider.launch(launch).await.unwrap();
        let mut lines = Vec::new();
        while let Some(line) = agent.output.recv().await {
            lines.push((line.stream, line.text));
        }
        lines.sort_by_key(|(stream, _)| *stream == OutputStream::Stderr);
        assert_eq!(
            lines,
            [
                (OutputStream::Stdout, "out".to_owned()),
                (OutputStream::Stderr, "err".to_owned())
            ]
        );
        assert_eq!(agent.exit.await.unwrap().code, Some(3));
    }
}
