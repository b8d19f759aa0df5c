//! The work agents leave in their workspaces, given back: file lists, archives, diffs, result
//! branches, and the workspaces' removal once they have served.
//!
//! Each task attempt's workspace has a tracking directory of the worker's own,
//! `<root>/.tracked/task-<id>.<attempt>`, holding a link to the workspace, the copy of its
//! repository as it started (see [`git`]), and, once the task ended, an `ended` marker whose
//! time starts the retention. A session's is `<root>/sessions/<id>/tracked`, removed with the
//! session.

pub mod files;
pub mod git;
pub mod publish;
mod sys;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use claudecluster_config::WorkerConfig;
use claudecluster_proto::v1::{
    ChangeSummary, DownloadTaskFilesRequest, DownloadTaskFilesResponse, FileChange,
    GetTaskDiffRequest, GetTaskDiffResponse, ListTaskFilesRequest, ListTaskFilesResponse,
    WorkspaceFile, WorkspaceRef,
};
use tokio::sync::mpsc;

use crate::error::WorkerError;
use git::{Change, Tracking};

/// Where task workspaces' tracking directories live, under the workspace root. Task ids
/// cannot start with a dot, so no task's workspace has this name.
const TRACKED_DIR: &str = ".tracked";

/// Paths one request may name, and the longest one (Linux's `PATH_MAX`): together well
/// under what one git command line may hold.
const MAX_PATHS: usize = 256;
const MAX_PATH_BYTES: usize = 4096;

const DEFAULT_PAGE_SIZE: usize = 1000;
const MAX_PAGE_SIZE: usize = 10_000;
/// Chunks of an archive on the wire: well under the gRPC message bound.
const CHUNK_BYTES: usize = 256 << 10;

/// The workspaces of one worker, as results.
pub struct Results {
    root: PathBuf,
    worker_id: String,
    max_download_bytes: u64,
    max_diff_bytes: usize,
    /// One git operation at a time per workspace: they share its index.
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// The last count of the bytes the workspaces hold.
    workspace_bytes: std::sync::atomic::AtomicU64,
}

/// What a workspace's files hold, as [`Results::download`] streams them.
pub type ArchiveChunks = mpsc::Receiver<Result<DownloadTaskFilesResponse, WorkerError>>;

impl Results {
    pub fn new(root: PathBuf, worker_id: String, config: &WorkerConfig) -> Self {
        Results {
            root,
            worker_id,
            max_download_bytes: config.results.max_download_bytes.0,
            max_diff_bytes: usize::try_from(config.results.max_diff_bytes.0)
                .unwrap_or(usize::MAX)
                .min(claudecluster_proto::MAX_MESSAGE_BYTES - (64 << 10)),
            locks: Mutex::default(),
            workspace_bytes: Default::default(),
        }
    }

    fn task_dir(&self, task_id: &str, attempt: u32) -> PathBuf {
        self.root
            .join(TRACKED_DIR)
            .join(format!("task-{task_id}.{attempt}"))
    }

    fn session_dir(&self, session_id: &str) -> PathBuf {
        self.root.join("sessions").join(session_id).join("tracked")
    }

    /// Records where a task attempt's workspace starts, before its agent gets its prompt.
    pub async fn start_task(
        &self,
        task_id: &str,
        attempt: u32,
        workspace: &Path,
    ) -> Result<Tracking, String> {
        let dir = self.task_dir(task_id, attempt);
        // A tracking directory left by an earlier run of the same attempt is stale.
        let _ = tokio::fs::remove_dir_all(&dir).await;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        tokio::fs::symlink(workspace, dir.join("workspace"))
            .await
            .map_err(|err| format!("cannot record the workspace in {}: {err}", dir.display()))?;
        let tracking = Tracking::new(dir, workspace.to_path_buf());
        tracking.record().await?;
        Ok(tracking)
    }

    /// Records where a session's workspace starts, once it is made.
    pub async fn start_session(&self, session_id: &str, workspace: &Path) -> Result<(), String> {
        let dir = self.session_dir(session_id);
        if dir.is_dir() {
            // A session's workspace outlives its containers: it started once.
            return Ok(());
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        Tracking::new(dir, workspace.to_path_buf()).record().await
    }

    /// Marks a task attempt's run as ended: its retention starts now.
    pub fn task_ended(&self, task_id: &str, attempt: u32) {
        let marker = self.task_dir(task_id, attempt).join("ended");
        if let Err(err) = std::fs::write(&marker, b"")
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %marker.display(), error = %err, "cannot mark the workspace ended");
        }
    }

    /// The workspace `reference` names, with its tracking.
    fn find(&self, reference: &WorkspaceRef) -> Result<Tracking, WorkerError> {
        let missing = || WorkerError::WorkspaceNotHere {
            worker_id: self.worker_id.clone(),
            workspace: describe(reference),
        };
        let (dir, workspace) = if !reference.session_id.is_empty() {
            crate::runtime::check_id("workspace.session_id", &reference.session_id)?;
            let dir = self.session_dir(&reference.session_id);
            let workspace = dir.with_file_name("workspace");
            (dir, workspace)
        } else {
            crate::runtime::check_id("workspace.task_id", &reference.task_id)?;
            let dir = self.task_dir(&reference.task_id, reference.attempt.max(1));
            let workspace = std::fs::read_link(dir.join("workspace")).map_err(|_| missing())?;
            (dir, workspace)
        };
        if !dir.is_dir() || !workspace.is_dir() {
            return Err(missing());
        }
        Ok(Tracking::new(dir, workspace))
    }

    fn lock_for(&self, tracking: &Tracking) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("results lock poisoned")
            .entry(tracking.workspace().to_path_buf())
            .or_default()
            .clone()
    }

    /// Refuses the paths of a query that leave the workspace, or that are too many or too long
    /// to hand to git; returns them checked.
    fn checked_paths(tracking: &Tracking, paths: &[String]) -> Result<Vec<String>, WorkerError> {
        if paths.len() > MAX_PATHS {
            return Err(WorkerError::InvalidArgument {
                field: "paths",
                message: format!("has {} entries; at most {MAX_PATHS} are taken", paths.len()),
            });
        }
        if let Some(long) = paths.iter().find(|path| path.len() > MAX_PATH_BYTES) {
            return Err(WorkerError::InvalidArgument {
                field: "paths",
                message: format!(
                    "an entry of {} bytes is longer than any path ({MAX_PATH_BYTES})",
                    long.len()
                ),
            });
        }
        paths
            .iter()
            .map(|path| {
                let checked = files::checked_path(path)
                    .and_then(|checked| {
                        files::refuse_escape(tracking.workspace(), &checked).map(|()| checked)
                    })
                    .map_err(|message| WorkerError::InvalidArgument {
                        field: "paths",
                        message,
                    })?;
                Ok(checked)
            })
            .collect()
    }

    /// The files of a workspace with how each differs from where it started.
    pub async fn list(
        &self,
        reference: &WorkspaceRef,
        query: &ListTaskFilesRequest,
    ) -> Result<ListTaskFilesResponse, WorkerError> {
        let tracking = self.find(reference)?;
        let paths = Self::checked_paths(&tracking, &query.paths)?;
        let page_size = match query.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let after = decode_token(&query.page_token)?;
        let lock = self.lock_for(&tracking);
        let _held = lock.lock().await;
        // The walk and git's look run at once. A file made or removed meanwhile is listed as
        // both saw it, or not at all: what git did not take is asked about below, so it is
        // never taken for an ignored one.
        let (entries, (changes, indexed)) =
            tokio::try_join!(walk(&tracking, &paths, query.include_git), async {
                tracking
                    .changes_and_indexed()
                    .await
                    .map_err(WorkerError::Workspace)
            },)?;
        let (changes, summary) = (changes.paths, changes.summary);
        // What git did not take is ignored, or went away since the walk.
        let untaken: Vec<&str> = entries
            .iter()
            .map(|entry| entry.path.as_str())
            .filter(|path| !indexed.contains(*path) && !changes.contains_key(*path))
            .collect();
        let ignored = tracking
            .ignored(&untaken)
            .await
            .map_err(WorkerError::Workspace)?;
        let under =
            |path: &str| paths.is_empty() || paths.iter().any(|start| is_under(path, start));
        let mut listed: Vec<WorkspaceFile> = entries
            .into_iter()
            .filter_map(|entry| {
                let change = match changes.get(&entry.path) {
                    Some(Change::Added) => FileChange::Added,
                    Some(Change::Modified) => FileChange::Modified,
                    // Gone since the walk: listed below as deleted.
                    Some(Change::Deleted) => return None,
                    None if indexed.contains(&entry.path) => FileChange::Unchanged,
                    None if ignored.contains(&entry.path) => FileChange::Ignored,
                    // Went away since the walk.
                    None => return None,
                };
                Some(WorkspaceFile {
                    path: entry.path,
                    size: entry.size,
                    mode: entry.mode,
                    change: change as i32,
                    link_target: entry.link_target.unwrap_or_default(),
                })
            })
            .collect();
        listed.extend(
            changes
                .iter()
                .filter(|(path, change)| **change == Change::Deleted && under(path))
                .map(|(path, _)| WorkspaceFile {
                    path: path.clone(),
                    change: FileChange::Deleted as i32,
                    ..WorkspaceFile::default()
                }),
        );
        if let Some(missing) = first_missing(&paths, listed.iter().map(|f| f.path.as_str())) {
            return Err(WorkerError::NoSuchPath(missing.clone()));
        }
        listed.sort_by(|a, b| a.path.cmp(&b.path));
        listed.retain(|file| after.as_ref().is_none_or(|after| file.path > *after));
        let more = listed.len() > page_size;
        listed.truncate(page_size);
        let next_page_token = match (more, listed.last()) {
            (true, Some(last)) => encode_token(&last.path),
            _ => String::new(),
        };
        Ok(ListTaskFilesResponse {
            files: listed,
            next_page_token,
            summary: Some(summary),
        })
    }

    /// A tar archive of a workspace's files (or of the paths asked for), in chunks. Refused
    /// before the first byte when it would hold more than the limit.
    pub async fn download(
        &self,
        reference: &WorkspaceRef,
        query: &DownloadTaskFilesRequest,
    ) -> Result<ArchiveChunks, WorkerError> {
        let tracking = self.find(reference)?;
        let paths = Self::checked_paths(&tracking, &query.paths)?;
        let entries = walk(&tracking, &paths, query.include_git).await?;
        if let Some(missing) = first_missing(&paths, entries.iter().map(|e| e.path.as_str())) {
            return Err(WorkerError::NoSuchPath(missing.clone()));
        }
        let workspace = tracking.workspace().to_path_buf();
        // A link's size is its target's length, which the archive holds in its header.
        let content_bytes: u64 = entries
            .iter()
            .filter(|entry| entry.link_target.is_none())
            .map(|entry| entry.size)
            .sum();
        let limit = match query.max_bytes {
            0 => self.max_download_bytes,
            asked => asked.min(self.max_download_bytes),
        };
        if content_bytes > limit {
            return Err(WorkerError::DownloadTooLarge {
                bytes: content_bytes,
                files: entries.len(),
                limit,
            });
        }
        let (sender, receiver) = mpsc::channel(4);
        let first = DownloadTaskFilesResponse {
            chunk: Vec::new(),
            content_bytes,
            files: entries.len() as u32,
        };
        tokio::task::spawn_blocking(move || {
            let mut out = ChunkWriter {
                sender,
                buffer: Vec::with_capacity(CHUNK_BYTES),
                first: Some(first),
            };
            let written = files::archive(&workspace, &entries, &mut out);
            match written {
                Ok(()) => {
                    let _ = out.flush_chunk();
                }
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(err) => {
                    let _ = out.sender.blocking_send(Err(WorkerError::Workspace(format!(
                        "the archive stopped: {err}"
                    ))));
                }
            }
        });
        Ok(receiver)
    }

    /// The unified diff of what changed in a workspace, with its summary.
    pub async fn diff(
        &self,
        reference: &WorkspaceRef,
        query: &GetTaskDiffRequest,
    ) -> Result<GetTaskDiffResponse, WorkerError> {
        let tracking = self.find(reference)?;
        let paths = Self::checked_paths(&tracking, &query.paths)?;
        let lock = self.lock_for(&tracking);
        let _held = lock.lock().await;
        let changes = tracking.changes().await.map_err(WorkerError::Workspace)?;
        let (diff, truncated) = tracking
            .diff(&changes, &paths, self.max_diff_bytes)
            .await
            .map_err(WorkerError::Workspace)?;
        let summary = changes.summary.clone();
        Ok(GetTaskDiffResponse {
            diff,
            summary: Some(summary),
            truncated,
        })
    }

    /// What a task attempt's agent changed, for its record once it ended.
    pub async fn summary_of_task(&self, task_id: &str, attempt: u32) -> Option<ChangeSummary> {
        let summary = self
            .with_task(task_id, attempt, async |tracking| tracking.summary().await)
            .await?;
        summary
            .inspect_err(|err| {
                tracing::warn!(task = %task_id, attempt, error = %err, "cannot summarise the task's changes");
            })
            .ok()
    }

    /// Runs `work` on the tracking of a task attempt's workspace, holding its lock; `None`
    /// when the worker holds no such workspace.
    pub(crate) async fn with_task<T>(
        &self,
        task_id: &str,
        attempt: u32,
        work: impl AsyncFnOnce(&Tracking) -> T,
    ) -> Option<T> {
        let reference = WorkspaceRef {
            task_id: task_id.to_owned(),
            attempt,
            ..WorkspaceRef::default()
        };
        let tracking = self.find(&reference).ok()?;
        let lock = self.lock_for(&tracking);
        let _held = lock.lock().await;
        Some(work(&tracking).await)
    }

    /// Removes a task attempt's workspace and its tracking. False when there was none.
    pub async fn remove_task(&self, task_id: &str, attempt: u32) -> Result<bool, WorkerError> {
        crate::runtime::check_id("workspace.task_id", task_id)?;
        Ok(self
            .remove_tracked(&self.task_dir(task_id, attempt.max(1)))
            .await)
    }

    async fn remove_tracked(&self, dir: &Path) -> bool {
        let Ok(workspace) = tokio::fs::read_link(dir.join("workspace")).await else {
            return false;
        };
        // Only ever a directory of this worker's root, whatever the link says.
        let inside = workspace.parent() == Some(self.root.as_path());
        if inside {
            let _ = tokio::fs::remove_dir_all(&workspace).await;
        }
        let _ = tokio::fs::remove_dir_all(dir).await;
        self.locks
            .lock()
            .expect("results lock poisoned")
            .remove(&workspace);
        inside
    }

    /// Marks the workspaces an earlier process of this worker left unended as ended now: their
    /// runs died with it. Called before the worker takes work.
    pub fn mark_orphans_ended(&self) {
        let Ok(dirs) = std::fs::read_dir(self.root.join(TRACKED_DIR)) else {
            return;
        };
        for dir in dirs.flatten() {
            let marker = dir.path().join("ended");
            if !marker.exists() {
                let _ = std::fs::write(&marker, b"");
            }
        }
    }

    /// Removes the workspaces of tasks that ended more than `retention` ago.
    pub async fn sweep(&self, retention: Duration) {
        let Ok(mut dirs) = tokio::fs::read_dir(self.root.join(TRACKED_DIR)).await else {
            return;
        };
        let now = SystemTime::now();
        while let Ok(Some(dir)) = dirs.next_entry().await {
            // A run that has not ended has no marker.
            let Ok(meta) = tokio::fs::metadata(dir.path().join("ended")).await else {
                continue;
            };
            let ended = meta.modified().unwrap_or(now);
            if now.duration_since(ended).unwrap_or_default() >= retention {
                let removed = self.remove_tracked(&dir.path()).await;
                let name = dir.file_name();
                tracing::info!(tracked = %name.to_string_lossy(), removed, "workspace removed after its retention (`worker.workspaceRetention`)");
            }
        }
    }

    /// Counts the bytes the workspaces hold, for heartbeats.
    pub async fn measure(&self) {
        let root = self.root.clone();
        let bytes = tokio::task::spawn_blocking(move || files::disk_usage(&root))
            .await
            .unwrap_or(0);
        self.workspace_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The bytes the workspaces held when last counted.
    pub fn workspace_bytes(&self) -> u64 {
        self.workspace_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes free where workspaces are made.
    pub fn disk_free_bytes(&self) -> u64 {
        sys::free_bytes(&files::existing_ancestor(&self.root)).unwrap_or(0)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The files and links under `paths`, walked off the runtime's threads.
async fn walk(
    tracking: &Tracking,
    paths: &[String],
    include_git: bool,
) -> Result<Vec<files::Entry>, WorkerError> {
    let (workspace, paths) = (tracking.workspace().to_path_buf(), paths.to_vec());
    tokio::task::spawn_blocking(move || files::walk(&workspace, &paths, include_git))
        .await
        .expect("the walk panicked")
        .map_err(|err| WorkerError::Workspace(format!("cannot read the workspace: {err}")))
}

/// Whether `path` is `start` or lies under it; `""` is the whole workspace.
fn is_under(path: &str, start: &str) -> bool {
    start.is_empty()
        || path
            .strip_prefix(start)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The first of `starts` under which none of `found` lies (the whole workspace, `""`, is
/// never missing).
fn first_missing<'a, 'b>(
    starts: &'a [String],
    found: impl Iterator<Item = &'b str> + Clone,
) -> Option<&'a String> {
    starts
        .iter()
        .find(|start| !start.is_empty() && !found.clone().any(|path| is_under(path, start)))
}

fn describe(reference: &WorkspaceRef) -> String {
    if reference.session_id.is_empty() {
        format!(
            "task {} attempt {}",
            reference.task_id,
            reference.attempt.max(1)
        )
    } else {
        format!("session {}", reference.session_id)
    }
}

/// Page tokens are the last path of the page before, hex-encoded: opaque to clients.
fn encode_token(path: &str) -> String {
    path.bytes().map(|byte| format!("{byte:02x}")).collect()
}

fn decode_token(token: &str) -> Result<Option<String>, WorkerError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || WorkerError::InvalidArgument {
        field: "page_token",
        message: "is not a token this call returned".into(),
    };
    if !token.len().is_multiple_of(2) {
        return Err(invalid());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(token.get(at..at + 2).unwrap_or("x"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| invalid())?;
    String::from_utf8(bytes).map(Some).map_err(|_| invalid())
}

/// Cuts what the archive writes into chunks and sends them; a client that went away stops
/// the archive (as a broken pipe).
struct ChunkWriter {
    sender: mpsc::Sender<Result<DownloadTaskFilesResponse, WorkerError>>,
    buffer: Vec<u8>,
    /// The first message says what the archive holds.
    first: Option<DownloadTaskFilesResponse>,
}

impl ChunkWriter {
    fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() && self.first.is_none() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK_BYTES));
        let mut message = self.first.take().unwrap_or_default();
        message.chunk = Bytes::from(chunk).into();
        self.sender
            .blocking_send(Ok(message))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = CHUNK_BYTES - self.buffer.len();
        let taken = data.len().min(room);
        self.buffer.extend_from_slice(&data[..taken]);
        if self.buffer.len() >= CHUNK_BYTES {
            self.flush_chunk()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str) -> WorkspaceRef {
        WorkspaceRef {
            task_id: id.into(),
            attempt: 1,
            ..WorkspaceRef::default()
        }
    }

    #[tokio::test]
    async fn listings_tell_added_ignored_and_deleted_files_apart_page_by_page() {
        let root = tempfile::tempdir().unwrap();
        let results = Results::new(root.path().into(), "w1".into(), &WorkerConfig::default());
        let workspace = root.path().join("t1");
        std::fs::create_dir_all(&workspace).unwrap();
        results.start_task("t1", 1, &workspace).await.unwrap();
        std::fs::write(workspace.join(".gitignore"), "*.log\n").unwrap();
        std::fs::write(workspace.join("a.txt"), "a\n").unwrap();
        std::fs::write(workspace.join("b.log"), "noise\n").unwrap();
        // A name git could read as pathspec magic is a name.
        std::fs::write(workspace.join(":(glob)c.log"), "noise\n").unwrap();

        let mut seen = Vec::new();
        let mut page_token = String::new();
        loop {
            let query = ListTaskFilesRequest {
                page_size: 1,
                page_token,
                ..ListTaskFilesRequest::default()
            };
            let page = results.list(&task("t1"), &query).await.unwrap();
            assert!(page.files.len() <= 1);
            seen.extend(page.files.iter().map(|f| (f.path.clone(), f.change())));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        assert_eq!(
            seen,
            [
                (".gitignore".to_owned(), FileChange::Added),
                (":(glob)c.log".to_owned(), FileChange::Ignored),
                ("a.txt".to_owned(), FileChange::Added),
                ("b.log".to_owned(), FileChange::Ignored),
            ]
        );

        for paths in [
            vec!["x".repeat(MAX_PATH_BYTES + 1)],
            vec!["a".into(); MAX_PATHS + 1],
        ] {
            let query = ListTaskFilesRequest {
                paths,
                ..ListTaskFilesRequest::default()
            };
            let refused = results.list(&task("t1"), &query).await.unwrap_err();
            assert!(matches!(
                refused,
                WorkerError::InvalidArgument { field: "paths", .. }
            ));
        }
        let missing = ListTaskFilesRequest {
            paths: vec!["nowhere".into()],
            ..ListTaskFilesRequest::default()
        };
        let refused = results.list(&task("t1"), &missing).await.unwrap_err();
        assert!(matches!(refused, WorkerError::NoSuchPath(ref path) if path == "nowhere"));
        let unknown = results.list(&task("t2"), &missing).await.unwrap_err();
        assert!(matches!(unknown, WorkerError::WorkspaceNotHere { .. }));

        assert!(results.remove_task("t1", 1).await.unwrap());
        assert!(!workspace.exists());
        assert!(!results.remove_task("t1", 1).await.unwrap());
    }

    #[tokio::test]
    async fn a_sweep_removes_only_what_ended_longer_ago_than_the_retention() {
        let root = tempfile::tempdir().unwrap();
        let results = Results::new(root.path().into(), "w1".into(), &WorkerConfig::default());
        for id in ["ended", "running"] {
            let workspace = root.path().join(id);
            std::fs::create_dir_all(&workspace).unwrap();
            results.start_task(id, 1, &workspace).await.unwrap();
        }
        results.task_ended("ended", 1);
        results.sweep(Duration::from_secs(3600)).await;
        assert!(
            root.path().join("ended").exists(),
            "its retention has not passed"
        );
        results.sweep(Duration::ZERO).await;
        assert!(!root.path().join("ended").exists());
        assert!(
            root.path().join("running").exists(),
            "a running task's is kept"
        );
        // What a worker that died left unended counts as ended from its restart.
        results.mark_orphans_ended();
        results.sweep(Duration::ZERO).await;
        assert!(!root.path().join("running").exists());
    }

    #[test]
    fn page_tokens_round_trip_and_foreign_ones_are_refused() {
        let token = encode_token("dir/ä.txt");
        assert_eq!(decode_token(&token).unwrap().as_deref(), Some("dir/ä.txt"));
        assert!(decode_token("zz").is_err());
        assert!(decode_token("abc").is_err());
        assert_eq!(decode_token("").unwrap(), None);
    }
}
