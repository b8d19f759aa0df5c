//! What the agent changed, through git, without trusting the workspace's own repository.
//!
//! The agent owns its workspace, `.git` included: its config can name commands (`core.fsmonitor`,
//! hooks, filters) that any git run there would execute on the worker. So the worker never runs
//! git in the workspace's repository after the agent started. When the workspace is made, it
//! copies the repository (a local clone, whose objects are hard links) into a tracking
//! directory of its own; every later diff and commit runs with that copy as `GIT_DIR`, the
//! worker's own index, no user or system config, and the workspace only as the work tree.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use claudecluster_proto::v1::ChangeSummary;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// The id of git's empty tree: what a workspace without a repository started from.
const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

/// A workspace and the worker's own record of where it started.
#[derive(Debug, Clone)]
pub struct Tracking {
    /// The worker's directory: `git` (the repository copy) and `index`.
    dir: PathBuf,
    workspace: PathBuf,
}

/// What changed in a workspace: the base it is compared with (a commit, or the empty tree),
/// each changed path, and their summary.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub base: String,
    pub paths: BTreeMap<String, Change>,
    pub summary: ChangeSummary,
}

/// How a path differs from the base, as `git diff --raw` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Modified,
    Deleted,
}

impl Tracking {
    pub fn new(dir: PathBuf, workspace: PathBuf) -> Self {
        Tracking { dir, workspace }
    }

    pub fn workspace(&self) -> &Path {
        &self.workspace
    }

    fn git_dir(&self) -> PathBuf {
        self.dir.join("git")
    }

    /// Records where `workspace` starts: its repository as it is now (before any agent ran in
    /// it), or nothing when it has none.
    pub async fn record(&self) -> Result<(), String> {
        let git_dir = self.git_dir();
        if self.workspace.join(".git").is_dir() {
            // `--local` shares the objects by hard links: instant, and no second copy.
            run_plain(
                Command::new("git")
                    // The workspace may belong to the agent's user already (a container's).
                    .args([
                        "-c",
                        "safe.directory=*",
                        "-c",
                        "protocol.file.allow=always",
                        "clone",
                        "--bare",
                        "--local",
                        "--quiet",
                        "--",
                    ])
                    .arg(&self.workspace)
                    .arg(&git_dir),
                "copy the workspace's repository",
            )
            .await?;
            // The checkout's own index holds the stat data of every file: with it, the first
            // diff hashes only what changed. (Whole-second mtime and size only: the workspace
            // is handed to another user, which changes every file's ctime and owner.)
            let index = self.workspace.join(".git/index");
            if index.is_file() {
                tokio::fs::copy(&index, self.dir.join("index"))
                    .await
                    .map_err(|err| format!("cannot copy the workspace's index: {err}"))?;
            }
        }
        // Without a repository there is nothing to copy: the tracking repository is made
        // empty when first used, which keeps it off the path of a warm agent's hand-out.
        Ok(())
    }

    /// Makes the (empty) tracking repository of a workspace that started without one; true
    /// when it made it.
    async fn ensure_repository(&self) -> Result<bool, String> {
        let git_dir = self.git_dir();
        if git_dir.is_dir() {
            return Ok(false);
        }
        // No template: hooks and samples are of no use to a repository nobody commits in by
        // hand, and copying them is most of what `init` costs.
        run_plain(
            Command::new("git")
                .args(["init", "--bare", "--quiet", "--template=", "--"])
                .arg(&git_dir),
            "make the workspace's tracking repository",
        )
        .await
        .map(|_| true)
    }

    /// A git command on the tracking repository with the workspace as its work tree.
    fn git(&self) -> Command {
        let mut command = Command::new("git");
        command
            .args([
                "-c",
                "core.checkStat=minimal",
                "-c",
                "core.trustctime=false",
                "-c",
                "core.quotePath=false",
                "-c",
                "core.fsmonitor=false",
                "-c",
                "safe.directory=*",
                "-c",
                "diff.renames=false",
            ])
            .env("GIT_DIR", self.git_dir())
            .env("GIT_WORK_TREE", &self.workspace)
            .env("GIT_INDEX_FILE", self.dir.join("index"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            // A client's path is a path: `:(glob)` and the like mean nothing.
            .env("GIT_LITERAL_PATHSPECS", "1")
            .env_remove("GIT_CONFIG_PARAMETERS")
            // Paths given to git are relative to the workspace.
            .current_dir(&self.workspace)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// The commit the workspace started from; `None` without one.
    pub async fn base_commit(&self) -> Result<Option<String>, String> {
        let output = self
            .git()
            .args(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"])
            .output()
            .await
            .map_err(|err| format!("cannot run git: {err}"))?;
        let commit = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        Ok((output.status.success() && !commit.is_empty()).then_some(commit))
    }

    /// The branch the workspace's repository was cloned at, if it had one.
    pub async fn base_branch(&self) -> Option<String> {
        let output = self
            .git()
            .args(["symbolic-ref", "--quiet", "--short", "HEAD"])
            .output()
            .await
            .ok()?;
        let branch = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        (output.status.success() && !branch.is_empty()).then_some(branch)
    }

    /// Brings the worker's index to the workspace as it is now, and returns the base to diff
    /// against.
    async fn refresh(&self) -> Result<String, String> {
        let made = self.ensure_repository().await?;
        run(self.git().args(["add", "--all"]), "index the workspace").await?;
        if made {
            return Ok(EMPTY_TREE.to_owned());
        }
        Ok(self
            .base_commit()
            .await?
            .unwrap_or_else(|| EMPTY_TREE.to_owned()))
    }

    /// The workspace as it is now against its start: every changed path (a deleted one too),
    /// by path, and their summary. Brings the worker's index up to date.
    pub async fn changes(&self) -> Result<Changes, String> {
        let base = self.refresh().await?;
        self.changes_against(base).await
    }

    /// [`Tracking::changes`], and the paths the index then holds: the two read at once.
    pub async fn changes_and_indexed(&self) -> Result<(Changes, HashSet<String>), String> {
        let base = self.refresh().await?;
        tokio::try_join!(self.changes_against(base), self.indexed())
    }

    /// The paths the worker's index holds: what the workspace's `.gitignore` does not ignore.
    async fn indexed(&self) -> Result<HashSet<String>, String> {
        let output = run(
            self.git().args(["ls-files", "-z"]),
            "list the indexed files",
        )
        .await?;
        Ok(output
            .split(|byte| *byte == 0)
            .filter(|path| !path.is_empty())
            .map(|path| String::from_utf8_lossy(path).into_owned())
            .collect())
    }

    /// Which of `paths` the workspace's `.gitignore` files ignore.
    pub async fn ignored(&self, paths: &[&str]) -> Result<HashSet<String>, String> {
        if paths.is_empty() {
            return Ok(HashSet::new());
        }
        use tokio::io::AsyncWriteExt;
        // `check-ignore` takes no literal pathspecs: `./` in front keeps a name starting with
        // `:` from reading as pathspec magic, and comes back in front of each answer.
        let mut child = self
            .git()
            .env_remove("GIT_LITERAL_PATHSPECS")
            .args(["check-ignore", "-z", "--stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| format!("cannot run git: {err}"))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let input: Vec<u8> = paths
            .iter()
            .flat_map(|path| "./".bytes().chain(path.bytes()).chain(std::iter::once(0)))
            .collect();
        // Written while git answers, so that neither waits for the other.
        let writing = async move {
            let written = stdin.write_all(&input).await;
            drop(stdin);
            written
        };
        let (written, output) = tokio::join!(writing, child.wait_with_output());
        let output = output.map_err(|err| format!("cannot run git: {err}"))?;
        written.map_err(|err| format!("cannot ask git what is ignored: {err}"))?;
        // 0: some are ignored; 1: none is.
        match output.status.code() {
            Some(0) | Some(1) => Ok(output
                .stdout
                .split(|byte| *byte == 0)
                .filter(|path| !path.is_empty())
                .map(|path| {
                    String::from_utf8_lossy(path.strip_prefix(b"./").unwrap_or(path)).into_owned()
                })
                .collect()),
            _ => Err(format!(
                "cannot ask git what is ignored: {}",
                first_line(&output.stderr)
            )),
        }
    }

    /// Files, insertions and deletions changed since the base. One `git diff` gives both
    /// what changed (`--raw`) and by how many lines (`--numstat`): a task's end waits for it.
    pub async fn summary(&self) -> Result<ChangeSummary, String> {
        // A workspace that started empty and still is has no changes: no git needs to run (a
        // one-turn answer that wrote nothing ends without starting a process).
        if !self.git_dir().is_dir() && self.workspace_is_empty().await? {
            return Ok(ChangeSummary::default());
        }
        let base = self.refresh().await?;
        self.summary_against(base).await
    }

    async fn workspace_is_empty(&self) -> Result<bool, String> {
        let mut entries = tokio::fs::read_dir(&self.workspace)
            .await
            .map_err(|err| format!("cannot read the workspace: {err}"))?;
        Ok(entries
            .next_entry()
            .await
            .map_err(|err| format!("cannot read the workspace: {err}"))?
            .is_none())
    }

    async fn summary_against(&self, base: String) -> Result<ChangeSummary, String> {
        Ok(self.changes_against(base).await?.summary)
    }

    /// The worker's index against `base`: each changed path and the summary, from one
    /// `git diff`.
    async fn changes_against(&self, base: String) -> Result<Changes, String> {
        let output = run(
            self.git()
                .args([
                    "diff",
                    "--cached",
                    "--raw",
                    "--numstat",
                    "-z",
                    "--no-renames",
                ])
                .arg(&base),
            "list the changes",
        )
        .await?;
        let mut paths = BTreeMap::new();
        let mut summary = ChangeSummary {
            base_commit: if base == EMPTY_TREE {
                String::new()
            } else {
                base.clone()
            },
            ..ChangeSummary::default()
        };
        // `--raw -z`: ":mode mode id id STATUS\0path\0" for each path; then `--numstat -z`:
        // "added\tdeleted\tpath\0", with `-` for a binary file. A path follows its header, so
        // a path starting with `:` is never read as one.
        let mut fields = output.split(|byte| *byte == 0).filter(|f| !f.is_empty());
        while let Some(field) = fields.next() {
            if field.first() == Some(&b':') {
                let change = match field.last() {
                    Some(b'A') => {
                        summary.files_added += 1;
                        Change::Added
                    }
                    Some(b'D') => {
                        summary.files_deleted += 1;
                        Change::Deleted
                    }
                    _ => Change::Modified,
                };
                if let Some(path) = fields.next() {
                    paths.insert(String::from_utf8_lossy(path).into_owned(), change);
                }
                continue;
            }
            let text = String::from_utf8_lossy(field);
            let mut columns = text.splitn(3, '\t');
            let (added, deleted) = (columns.next(), columns.next());
            summary.files_changed += 1;
            match (
                added.and_then(|n| n.parse::<u64>().ok()),
                deleted.and_then(|n| n.parse::<u64>().ok()),
            ) {
                (Some(added), Some(deleted)) => {
                    summary.insertions += added;
                    summary.deletions += deleted;
                }
                _ => summary.binary_files += 1,
            }
        }
        Ok(Changes {
            base,
            paths,
            summary,
        })
    }

    /// The unified diff of the changes under `paths` (all when empty), cut at `max_bytes`.
    /// Returns the diff and whether it was cut.
    /// Call after [`Tracking::changes`], which brings the index up to date.
    pub async fn diff(
        &self,
        changes: &Changes,
        paths: &[String],
        max_bytes: usize,
    ) -> Result<(String, bool), String> {
        let base = &changes.base;
        let mut command = self.git();
        command
            .args([
                "diff",
                "--cached",
                "--no-renames",
                "--no-color",
                "--no-ext-diff",
                "--no-textconv",
            ])
            .arg(base)
            .arg("--")
            .args(paths)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|err| format!("cannot run git: {err}"))?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut diff = Vec::with_capacity(max_bytes.min(1 << 20));
        // One byte past the bound tells a diff that fits exactly from one that does not.
        (&mut stdout)
            .take(max_bytes as u64 + 1)
            .read_to_end(&mut diff)
            .await
            .map_err(|err| format!("cannot read the diff: {err}"))?;
        let truncated = diff.len() > max_bytes;
        if truncated {
            // Cut at a line's end, where one is near, so the last line shown is whole.
            diff.truncate(max_bytes);
            if let Some(end) = diff.iter().rposition(|byte| *byte == b'\n') {
                diff.truncate(end + 1);
            }
            let _ = child.start_kill();
        }
        drop(stdout);
        let output = child
            .wait_with_output()
            .await
            .map_err(|err| format!("cannot run git: {err}"))?;
        if !truncated && !output.status.success() {
            return Err(format!(
                "cannot diff the workspace: {}",
                first_line(&output.stderr)
            ));
        }
        Ok((String::from_utf8_lossy(&diff).into_owned(), truncated))
    }

    /// Commits the workspace as it is now on top of the base, as `author`, and returns the
    /// commit; `None` when nothing changed.
    pub async fn commit(
        &self,
        message: &str,
        author: (&str, &str),
    ) -> Result<Option<String>, String> {
        if self.changes().await?.paths.is_empty() {
            return Ok(None);
        }
        let tree = run(self.git().arg("write-tree"), "write the tree").await?;
        let tree = String::from_utf8_lossy(&tree).trim().to_owned();
        let mut command = self.git();
        command.args(["commit-tree", &tree, "-F", "-"]);
        if let Some(base) = self.base_commit().await? {
            command.args(["-p", &base]);
        }
        let (name, email) = author;
        command
            .env("GIT_AUTHOR_NAME", name)
            .env("GIT_AUTHOR_EMAIL", email)
            .env("GIT_COMMITTER_NAME", name)
            .env("GIT_COMMITTER_EMAIL", email);
        let commit = run_with_input(command, message.as_bytes(), "make the commit").await?;
        Ok(Some(String::from_utf8_lossy(&commit).trim().to_owned()))
    }

    /// Pushes `commit` to `url` as branch `branch`, presenting `header` (an HTTP
    /// `Authorization` header) when given. Never forced: a branch that exists is not
    /// overwritten.
    pub async fn push(
        &self,
        url: &str,
        commit: &str,
        branch: &str,
        header: Option<&str>,
        timeout: Duration,
    ) -> Result<(), String> {
        let mut command = self.git();
        command
            .args([
                "-c",
                "protocol.ext.allow=never",
                "push",
                "--porcelain",
                "--quiet",
                "--",
            ])
            .arg(url)
            .arg(format!("{commit}:refs/heads/{branch}"))
            .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Through the environment, not the command line, where any local user could read it.
        if let Some(header) = header {
            command
                .env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", header);
        }
        let output = tokio::time::timeout(timeout, command.output())
            .await
            .map_err(|_| format!("timed out after {} s", timeout.as_secs()))?
            .map_err(|err| format!("cannot run git: {err}"))?;
        if output.status.success() {
            return Ok(());
        }
        // `--porcelain` puts the refusal's reason on stdout (`! src:dst [rejected] (why)`);
        // connection and credential failures come on stderr.
        let stdout = String::from_utf8_lossy(&output.stdout);
        let refused = stdout
            .lines()
            .find(|line| line.starts_with('!'))
            .map(|line| line.split('\t').skip(2).collect::<Vec<_>>().join(" "));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let remote = stderr
            .lines()
            .filter_map(|line| line.strip_prefix("remote: "))
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let reason = match (refused, remote.is_empty()) {
            (Some(refused), true) => refused,
            (Some(refused), false) => format!("{refused}: {remote}"),
            (None, _) => first_line(&output.stderr),
        };
        Err(reason)
    }
}

/// The first line git printed that says something, `fatal:` or `error:` stripped.
fn first_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let mut lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
    let line = lines
        .clone()
        .find(|line| line.starts_with("fatal: ") || line.starts_with("error: "))
        .or_else(|| lines.next())
        .unwrap_or("git gave no reason");
    line.trim_start_matches("fatal: ")
        .trim_start_matches("error: ")
        .chars()
        .take(1024)
        .collect()
}

/// Runs a git command outside any repository (clone, init), with no user or system config.
async fn run_plain(command: &mut Command, what: &str) -> Result<Vec<u8>, String> {
    command
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    run(command, what).await
}

/// Runs a local git command to its end. Only pushes, which wait on a network, have a time
/// limit: local commands end with the disk work they do.
async fn run(command: &mut Command, what: &str) -> Result<Vec<u8>, String> {
    let output = command
        .output()
        .await
        .map_err(|err| format!("cannot {what}: cannot run git: {err}"))?;
    if !output.status.success() {
        return Err(format!("cannot {what}: {}", first_line(&output.stderr)));
    }
    Ok(output.stdout)
}

async fn run_with_input(mut command: Command, input: &[u8], what: &str) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncWriteExt;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|err| format!("cannot {what}: cannot run git: {err}"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin
        .write_all(input)
        .await
        .map_err(|err| format!("cannot {what}: {err}"))?;
    drop(stdin);
    let output = child
        .wait_with_output()
        .await
        .map_err(|err| format!("cannot {what}: {err}"))?;
    if !output.status.success() {
        return Err(format!("cannot {what}: {}", first_line(&output.stderr)));
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn git_in(dir: &Path, args: &[&str]) {
        let status = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .status()
            .await
            .unwrap();
        assert!(status.success(), "git {args:?}");
    }

    /// A workspace holding a clone of a repository with `files`.
    async fn cloned_workspace(root: &Path, files: &[(&str, &str)]) -> PathBuf {
        let origin = root.join("origin");
        std::fs::create_dir_all(&origin).unwrap();
        git_in(&origin, &["init", "-q"]).await;
        for (path, content) in files {
            let path = origin.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        git_in(&origin, &["add", "-A"]).await;
        git_in(&origin, &["commit", "-q", "-m", "start"]).await;
        let workspace = root.join("workspace");
        git_in(root, &["clone", "-q", "origin", "workspace"]).await;
        workspace
    }

    fn tracking(root: &Path, workspace: PathBuf) -> Tracking {
        let dir = root.join("tracking");
        std::fs::create_dir_all(&dir).unwrap();
        Tracking::new(dir, workspace)
    }

    #[tokio::test]
    async fn changes_against_the_cloned_commit_count_new_deleted_and_binary_files() {
        let root = tempfile::tempdir().unwrap();
        let workspace =
            cloned_workspace(root.path(), &[("keep.txt", "a\nb\n"), ("gone.txt", "x\n")]).await;
        let tracking = tracking(root.path(), workspace.clone());
        tracking.record().await.unwrap();
        std::fs::write(workspace.join("keep.txt"), "a\nB\nc\n").unwrap();
        std::fs::remove_file(workspace.join("gone.txt")).unwrap();
        std::fs::write(workspace.join("new.bin"), [0u8, 159, 146, 150]).unwrap();
        std::fs::write(workspace.join(".gitignore"), "*.log\n").unwrap();
        std::fs::write(workspace.join("noise.log"), "ignored\n").unwrap();

        let summary = tracking.summary().await.unwrap();
        assert_eq!(summary.base_commit.len(), 40);
        assert_eq!(
            (
                summary.files_changed,
                summary.files_added,
                summary.files_deleted
            ),
            (4, 2, 1),
            "{summary:?}"
        );
        assert_eq!(
            (summary.insertions, summary.deletions),
            (3, 2),
            "{summary:?}"
        );
        assert_eq!(summary.binary_files, 1);

        let changes = tracking.changes().await.unwrap();
        assert_eq!(changes.paths["keep.txt"], Change::Modified);
        assert_eq!(changes.paths["gone.txt"], Change::Deleted);
        assert_eq!(changes.paths["new.bin"], Change::Added);
        assert!(!changes.paths.contains_key("noise.log"));

        let (diff, truncated) = tracking.diff(&changes, &[], 1 << 20).await.unwrap();
        assert!(!truncated);
        assert!(diff.contains("+B\n+c\n"), "{diff}");
        assert!(diff.contains("deleted file mode 100644"), "{diff}");
        assert!(
            diff.contains("Binary files /dev/null and b/new.bin differ"),
            "{diff}"
        );

        let (cut, truncated) = tracking.diff(&changes, &[], 40).await.unwrap();
        assert!(truncated);
        assert!(cut.len() <= 40 && cut.ends_with('\n'), "{cut:?}");
    }

    #[tokio::test]
    async fn the_workspaces_own_git_config_is_never_run() {
        let root = tempfile::tempdir().unwrap();
        let workspace = cloned_workspace(root.path(), &[("a.txt", "a\n")]).await;
        let tracking = tracking(root.path(), workspace.clone());
        tracking.record().await.unwrap();
        // What an agent could write to run a command on the worker through any git there.
        let marker = root.path().join("ran");
        let hook = format!("touch {}", marker.display());
        git_in(&workspace, &["config", "core.fsmonitor", &hook]).await;
        git_in(&workspace, &["config", "core.pager", &hook]).await;
        std::fs::write(workspace.join("a.txt"), "b\n").unwrap();
        let changes = tracking.changes().await.unwrap();
        tracking.diff(&changes, &[], 1 << 20).await.unwrap();
        tracking.commit("m", ("n", "e@x")).await.unwrap();
        assert!(!marker.exists(), "the workspace's git config ran");
    }

    #[tokio::test]
    async fn an_empty_workspace_without_a_repository_is_summarised_without_git() {
        let root = tempfile::tempdir().unwrap();
        let workspace = root.path().join("workspace");
        std::fs::create_dir_all(&workspace).unwrap();
        let tracking = tracking(root.path(), workspace.clone());
        tracking.record().await.unwrap();
        assert_eq!(tracking.summary().await.unwrap(), ChangeSummary::default());
        assert!(!tracking.git_dir().exists(), "no git ran");
        // Once something is there, git counts it.
        std::fs::write(workspace.join("one.txt"), "1\n2\n").unwrap();
        let summary = tracking.summary().await.unwrap();
        assert_eq!(
            (summary.files_added, summary.insertions),
            (1, 2),
            "{summary:?}"
        );
    }

    #[tokio::test]
    async fn without_a_repository_everything_is_new_and_commits_have_no_parent() {
        let root = tempfile::tempdir().unwrap();
        let workspace = root.path().join("workspace");
        std::fs::create_dir_all(workspace.join("dir")).unwrap();
        let tracking = tracking(root.path(), workspace.clone());
        tracking.record().await.unwrap();
        assert_eq!(tracking.commit("m", ("n", "e@x")).await.unwrap(), None);
        std::fs::write(workspace.join("dir/one.txt"), "1\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", workspace.join("link")).unwrap();
        let summary = tracking.summary().await.unwrap();
        assert_eq!(summary.base_commit, "");
        assert_eq!((summary.files_changed, summary.files_added), (2, 2));
        let changes = tracking.changes().await.unwrap();
        let (diff, _) = tracking.diff(&changes, &[], 1 << 20).await.unwrap();
        // The link is recorded as a link: its target's content is not read.
        assert!(diff.contains("new file mode 120000"), "{diff}");
        assert!(!diff.contains("root:"), "{diff}");
        let commit = tracking.commit("m", ("n", "e@x")).await.unwrap();
        assert_eq!(commit.map(|c| c.len()), Some(40));
    }
}
