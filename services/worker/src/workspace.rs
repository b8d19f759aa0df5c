//! Task workspaces: one directory per task attempt, with the task's repository cloned in.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// How long a clone may take when nothing else is said (`worker.cloneTimeout`).
pub const DEFAULT_CLONE_TIMEOUT: Duration = Duration::from_secs(300);

/// Where task workspaces live.
#[derive(Debug, Clone)]
pub struct Workspaces {
    root: PathBuf,
    clone_timeout: Duration,
}

impl Workspaces {
    pub fn new(root: PathBuf) -> Self {
        Workspaces {
            root,
            clone_timeout: DEFAULT_CLONE_TIMEOUT,
        }
    }

    /// Clones give up after `timeout`.
    pub fn with_clone_timeout(mut self, timeout: Duration) -> Self {
        self.clone_timeout = timeout;
        self
    }

    /// Clones `repo_url` into `dir`, within the clone timeout.
    pub async fn clone_into(&self, repo_url: &str, dir: &Path) -> Result<(), String> {
        clone(repo_url, dir, self.clone_timeout).await
    }

    /// The default root: `claudecluster/workspaces` under the user's data directory.
    pub fn default_root() -> PathBuf {
        let data = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share"))
            })
            .unwrap_or_else(std::env::temp_dir);
        data.join("claudecluster/workspaces")
    }

    /// The root `config` asks for: `worker.workspaceRoot`, or the default.
    pub fn root_for(config: &claudecluster_config::WorkerConfig) -> PathBuf {
        config
            .workspace_root
            .clone()
            .unwrap_or_else(Self::default_root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Makes the workspace of `task_id`'s `attempt` and clones `repo_url` into it when given.
    /// Dropping the future stops a clone in progress.
    pub async fn prepare(
        &self,
        task_id: &str,
        attempt: u32,
        repo_url: &str,
    ) -> Result<PathBuf, String> {
        let name = if attempt <= 1 {
            task_id.to_owned()
        } else {
            format!("{task_id}.{attempt}")
        };
        let dir = self.root.join(name);
        if dir.exists() {
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(|err| format!("cannot clear workspace {}: {err}", dir.display()))?;
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|err| format!("cannot create workspace {}: {err}", dir.display()))?;
        if !repo_url.is_empty() {
            self.clone_into(repo_url, &dir).await?;
        }
        Ok(dir)
    }
}

/// Clones `repo_url` into `dir`, which must be empty, giving up after `timeout`. git asks no
/// questions (no terminal prompt) and may not run commands for a URL (`ext::`). Errors show
/// the URL without its credentials.
#[tracing::instrument(name = "workspace.clone", skip_all, fields(otel.name = "clone the repository"))]
async fn clone(repo_url: &str, dir: &Path, timeout: Duration) -> Result<(), String> {
    let shown = claudecluster_proto::without_credentials(repo_url);
    let cloning = Command::new("git")
        .args(["-c", "protocol.ext.allow=never", "clone", "--quiet", "--"])
        .arg(repo_url)
        .arg(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(timeout, cloning).await {
        Ok(output) => output.map_err(|err| format!("cannot run git to clone {shown}: {err}"))?,
        // Dropping the future kills git.
        Err(_) => {
            return Err(format!(
                "cannot clone {shown}: timed out after {} s (`worker.cloneTimeout`)",
                timeout.as_secs()
            ));
        }
    };
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    // git's first `fatal:` line says what went wrong; the lines after it are advice.
    let mut lines = stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty());
    let detail = lines
        .clone()
        .find_map(|line| line.strip_prefix("fatal: "))
        .or_else(|| lines.next_back())
        .unwrap_or("git gave no reason");
    // git may repeat the URL, credentials and all; and a line is shown, not a dump.
    let detail: String = claudecluster_proto::hide_credentials_of(repo_url, detail)
        .chars()
        .take(1024)
        .collect();
    Err(format!("cannot clone {shown}: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_repository_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let workspaces = Workspaces::new(root.path().to_path_buf());
        let err = workspaces
            .prepare("t1", 1, "file:///nonexistent/repo.git")
            .await
            .unwrap_err();
        assert!(
            err.starts_with("cannot clone file:///nonexistent/repo.git: "),
            "{err}"
        );
        assert!(
            err.contains("does not appear to be a git repository"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out_and_no_credential_is_shown() {
        // A loopback server that accepts connections and says nothing.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = silent.local_addr().unwrap();
        let holding = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((connection, _)) = silent.accept().await {
                held.push(connection);
            }
        });
        let root = tempfile::tempdir().unwrap();
        let workspaces =
            Workspaces::new(root.path().to_path_buf()).with_clone_timeout(Duration::from_secs(1));
        let url = format!("http://user:s3cret-token@{address}/repo.git");
        let started = std::time::Instant::now();
        let err = workspaces.prepare("t1", 1, &url).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            err,
            format!(
                "cannot clone http://***@{address}/repo.git: timed out after 1 s (`worker.cloneTimeout`)"
            )
        );
        holding.abort();
    }

    #[tokio::test]
    async fn attempts_get_their_own_clean_directory() {
        let root = tempfile::tempdir().unwrap();
        let workspaces = Workspaces::new(root.path().to_path_buf());
        let first = workspaces.prepare("t1", 1, "").await.unwrap();
        std::fs::write(first.join("leftover"), "x").unwrap();
        let second = workspaces.prepare("t1", 2, "").await.unwrap();
        assert_ne!(first, second);
        assert!(second.read_dir().unwrap().next().is_none());
    }
}
