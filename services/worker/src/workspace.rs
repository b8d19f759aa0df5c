//! Task workspaces: one directory per task attempt, with the task's repository cloned in.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Where task workspaces live.
#[derive(Debug, Clone)]
pub struct Workspaces {
    root: PathBuf,
}

impl Workspaces {
    pub fn new(root: PathBuf) -> Self {
        Workspaces { root }
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
            clone(repo_url, &dir).await?;
        }
        Ok(dir)
    }
}

/// Clones `repo_url` into `dir`, which must be empty.
pub async fn clone(repo_url: &str, dir: &Path) -> Result<(), String> {
    let output = Command::new("git")
        .args(["clone", "--quiet", "--"])
        .arg(repo_url)
        .arg(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|err| format!("cannot run git to clone {repo_url}: {err}"))?;
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
    Err(format!("cannot clone {repo_url}: {detail}"))
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
