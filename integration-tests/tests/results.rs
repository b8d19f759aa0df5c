//! Getting the work back: a task on a repository served over HTTP by the real `git
//! http-backend` runs the real CLI, which changes, adds, deletes and links files; its file list,
//! diff and archive match what it did; its branch lands on the server and a pull request is
//! opened against a stand-in of the GitHub REST API. Failed pushes, escapes, limits, retention,
//! deletion and low disk, with real processes.

use std::path::Path;
use std::time::Duration;

use claudecluster_integration_tests::forge::ForgeStandin;
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;
use tonic::Code;

const TOKEN: &str = "ghp_standin_push_token_0123456789";

/// What the agent does in its workspace, through its Bash tool: one change of every kind.
const CHANGES: &str = "BASH printf 'more\\n' >> keep.txt && rm gone.txt && printf 'new\\n' > added.txt && head -c 4096 /dev/urandom > blob.bin && ln -s /etc/passwd escape && echo changed";

async fn forge_with_repository(name: &str) -> (ForgeStandin, String) {
    let forge = ForgeStandin::start(TOKEN).await.unwrap();
    let url = forge
        .create_repo(
            "acme",
            name,
            &[
                ("keep.txt", b"kept\n"),
                ("gone.txt", b"to be deleted\n"),
                ("docs/readme.md", b"# widgets\n"),
            ],
        )
        .await;
    (forge, url)
}

/// A worker that clones over plain HTTP (the forge is on loopback) and publishes with `token`
/// to `forge`'s API.
fn publishing_worker(forge: &ForgeStandin, token: &str) -> WorkerSpec {
    WorkerSpec {
        extra_yaml: format!(
            "allowedRepoSchemes: [http]\npublish:\n  token: {token}\n  apiUrl: {}\n",
            forge.api_url()
        ),
        ..WorkerSpec::default()
    }
}

fn changing_task(repo_url: &str, result: Option<ResultSpec>) -> TaskSpec {
    TaskSpec {
        repo_url: repo_url.to_owned(),
        result,
        ..with_tools(CHANGES, &["Bash"])
    }
}

fn files_of(task_id: &str) -> ListTaskFilesRequest {
    ListTaskFilesRequest {
        task_id: task_id.to_owned(),
        ..ListTaskFilesRequest::default()
    }
}

/// The files of `task_id`'s workspace, which the driver must list.
async fn listing(driver: &mut Driver, task_id: &str) -> ListTaskFilesResponse {
    driver
        .list_task_files(files_of(task_id))
        .await
        .expect("the workspace's files")
        .into_inner()
}

/// The whole archive a download streams, and what its first message announced.
async fn download(
    driver: &mut Driver,
    request: DownloadTaskFilesRequest,
) -> Result<(Vec<u8>, u32, u64), tonic::Status> {
    let mut stream = driver.download_task_files(request).await?.into_inner();
    let (mut archive, mut files, mut bytes) = (Vec::new(), 0, 0);
    while let Some(chunk) = stream.message().await? {
        if chunk.files > 0 {
            (files, bytes) = (chunk.files, chunk.content_bytes);
        }
        archive.extend_from_slice(&chunk.chunk);
    }
    Ok((archive, files, bytes))
}

/// Unpacks `archive` into `dir` with the system's `tar`.
async fn untar(archive: &[u8], dir: &Path) {
    use tokio::io::AsyncWriteExt;
    std::fs::create_dir_all(dir).unwrap();
    let mut tar = tokio::process::Command::new("tar")
        .arg("-xf")
        .arg("-")
        .arg("-C")
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("tar");
    let mut stdin = tar.stdin.take().unwrap();
    stdin.write_all(archive).await.unwrap();
    drop(stdin);
    assert!(
        tar.wait().await.unwrap().success(),
        "tar could not read the archive"
    );
}

async fn git(args: &[&str], dir: &Path) -> String {
    let output = tokio::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "git {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

fn change_of(files: &[WorkspaceFile], path: &str) -> FileChange {
    files
        .iter()
        .find(|file| file.path == path)
        .unwrap_or_else(|| panic!("{path} not listed in {files:?}"))
        .change()
}

#[tokio::test]
async fn a_tasks_changes_come_back_as_files_a_diff_an_archive_a_branch_and_a_pull_request() {
    let (forge, url) = forge_with_repository("widgets").await;
    let base = forge
        .branch_commit("acme", "widgets", "main")
        .await
        .unwrap();
    let cluster = TestCluster::start(vec![publishing_worker(&forge, TOKEN)]).await;
    let mut driver = cluster.driver().await;
    let task = cluster
        .submit(changing_task(
            &url,
            Some(ResultSpec {
                branch: "claudecluster/{task_id}".into(),
                pull_request: true,
                ..ResultSpec::default()
            }),
        ))
        .await;
    let (task, events) = cluster.finish(&task.task_id).await;
    assert_eq!(
        task.status(),
        TaskStatus::Completed,
        "{}",
        task.status_reason
    );

    // The summary on the record: what git counts against the cloned commit.
    let changes = task
        .changes
        .clone()
        .expect("an ended task carries its changes");
    assert_eq!(changes.base_commit, base);
    assert_eq!(
        (
            changes.files_changed,
            changes.files_added,
            changes.files_deleted,
            changes.binary_files
        ),
        (5, 3, 1, 1),
        "{changes:?}"
    );
    // keep.txt +1, added.txt +1, the link's target +1; gone.txt -1.
    assert_eq!(
        (changes.insertions, changes.deletions),
        (3, 1),
        "{changes:?}"
    );

    // The file list.
    let listed = listing(&mut driver, &task.task_id).await;
    let files = &listed.files;
    assert_eq!(change_of(files, "keep.txt"), FileChange::Modified);
    assert_eq!(change_of(files, "gone.txt"), FileChange::Deleted);
    assert_eq!(change_of(files, "added.txt"), FileChange::Added);
    assert_eq!(change_of(files, "blob.bin"), FileChange::Added);
    assert_eq!(change_of(files, "docs/readme.md"), FileChange::Unchanged);
    let link = files.iter().find(|file| file.path == "escape").unwrap();
    assert_eq!(
        (link.mode, link.link_target.as_str()),
        (0o120000, "/etc/passwd")
    );
    assert_eq!(
        files.iter().find(|f| f.path == "blob.bin").unwrap().size,
        4096
    );
    assert!(
        files.iter().all(|file| !file.path.starts_with(".git")),
        "{files:?}"
    );
    assert_eq!(listed.summary.as_ref(), Some(&changes));

    // The diff.
    let diff = driver
        .get_task_diff(GetTaskDiffRequest {
            task_id: task.task_id.clone(),
            ..GetTaskDiffRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!diff.truncated);
    for expected in [
        "diff --git a/keep.txt b/keep.txt",
        "+more",
        "deleted file mode 100644",
        "-to be deleted",
        "+new",
        "Binary files /dev/null and b/blob.bin differ",
        "new file mode 120000",
    ] {
        assert!(
            diff.diff.contains(expected),
            "{expected} not in {}",
            diff.diff
        );
    }

    // The archive: every file as the agent left it, the link as a link.
    let (archive, count, bytes) = download(
        &mut driver,
        DownloadTaskFilesRequest {
            task_id: task.task_id.clone(),
            ..DownloadTaskFilesRequest::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(count, 5, "keep, added, blob, readme, the link");
    let unpacked = cluster.dir.path().join("unpacked");
    untar(&archive, &unpacked).await;
    let workspace = Path::new(&task.workspace);
    assert_eq!(
        std::fs::read(unpacked.join("blob.bin")).unwrap(),
        std::fs::read(workspace.join("blob.bin")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(unpacked.join("keep.txt")).unwrap(),
        "kept\nmore\n"
    );
    assert_eq!(
        std::fs::read_link(unpacked.join("escape")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert!(!unpacked.join("gone.txt").exists());
    assert!(!unpacked.join(".git").exists());
    // keep.txt, added.txt, blob.bin, docs/readme.md: a link holds no content.
    assert_eq!(bytes, 10 + 4 + 4096 + 10);

    // The branch, on the server, with the agent's changes on top of the cloned commit.
    let branch = task.branch.clone().expect("the task asked for a branch");
    let name = format!("claudecluster/{}", task.task_id);
    assert_eq!(branch.name, name);
    assert!(branch.pushed, "{branch:?}");
    assert_eq!(branch.error, "");
    assert_eq!(
        forge
            .branch_commit("acme", "widgets", &name)
            .await
            .as_deref(),
        Some(branch.commit.as_str())
    );
    let repo = forge.repo_dir("acme", "widgets");
    assert_eq!(
        git(&["rev-parse", &format!("{}^", branch.commit)], &repo)
            .await
            .trim(),
        base
    );
    assert_eq!(
        git(&["show", &format!("{}:added.txt", branch.commit)], &repo).await,
        "new\n"
    );
    let tree = git(&["ls-tree", "-r", "--name-only", &branch.commit], &repo).await;
    assert!(
        !tree.contains("gone.txt") && tree.contains("blob.bin"),
        "{tree}"
    );
    let message = git(
        &["log", "-1", "--format=%s%n%an <%ae>", &branch.commit],
        &repo,
    )
    .await;
    assert!(message.starts_with("BASH printf"), "{message}");
    assert!(
        message.contains("ClaudeCluster <claudecluster@localhost>"),
        "{message}"
    );

    // The pull request, through the REST API, with the worker's credential.
    let pulls = forge.pull_requests();
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    assert_eq!(
        (pulls[0].head.as_str(), pulls[0].base.as_str()),
        (name.as_str(), "main")
    );
    assert_eq!(
        pulls[0].authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(branch.pull_request_url, pulls[0].html_url);

    // The credential stays with the worker: not on the task, its events, or any log.
    let shown = format!("{task:?} {events:?}");
    assert!(!shown.contains(TOKEN));
    for process in [&cluster.driver, &cluster.scheduler, &cluster.workers[0]] {
        assert!(!process.log().contains(TOKEN), "a log shows the token");
    }
}

#[tokio::test]
async fn paths_that_leave_the_workspace_and_downloads_past_the_limit_are_refused() {
    let (forge, url) = forge_with_repository("escapes").await;
    let cluster = TestCluster::start(vec![publishing_worker(&forge, TOKEN)]).await;
    let mut driver = cluster.driver().await;
    let task = cluster.submit(changing_task(&url, None)).await;
    let task = cluster.finish_completed(&task.task_id).await;

    for (path, says) in [
        ("../escape", "leaves the workspace"),
        ("/etc/passwd", "is absolute"),
        ("escape", "through the link `escape`"),
    ] {
        let request = DownloadTaskFilesRequest {
            task_id: task.task_id.clone(),
            paths: vec![path.to_owned()],
            ..DownloadTaskFilesRequest::default()
        };
        let refused = download(&mut driver, request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{path}: {refused:?}");
        assert!(
            refused.message().contains(says),
            "{path}: {}",
            refused.message()
        );
        let listing = ListTaskFilesRequest {
            paths: vec![path.to_owned()],
            ..files_of(&task.task_id)
        };
        let refused = driver.list_task_files(listing).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{path}");
    }
    let missing = ListTaskFilesRequest {
        paths: vec!["no/such/file".into()],
        ..files_of(&task.task_id)
    };
    let refused = driver.list_task_files(missing).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    assert!(
        refused.message().contains("`no/such/file`"),
        "{}",
        refused.message()
    );

    // At the limit passes; one byte under it is refused, with the size.
    let whole = 10 + 4 + 4096 + 10;
    let at_limit = DownloadTaskFilesRequest {
        task_id: task.task_id.clone(),
        max_bytes: whole,
        ..DownloadTaskFilesRequest::default()
    };
    download(&mut driver, at_limit.clone()).await.unwrap();
    let past = DownloadTaskFilesRequest {
        max_bytes: whole - 1,
        ..at_limit
    };
    let refused = download(&mut driver, past).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("hold 4.0 KiB in 5 files")
            && refused
                .message()
                .contains("worker.results.maxDownloadBytes"),
        "{}",
        refused.message()
    );
    // Chosen paths only.
    let (archive, count, _) = download(
        &mut driver,
        DownloadTaskFilesRequest {
            task_id: task.task_id.clone(),
            paths: vec!["docs".into(), "added.txt".into()],
            ..DownloadTaskFilesRequest::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(count, 2);
    let unpacked = cluster.dir.path().join("chosen");
    untar(&archive, &unpacked).await;
    assert!(unpacked.join("docs/readme.md").is_file() && unpacked.join("added.txt").is_file());
    assert!(!unpacked.join("keep.txt").exists());

    // Neither or both of a task and a session, and someone else's unknown task.
    let neither = driver
        .get_task_diff(GetTaskDiffRequest::default())
        .await
        .unwrap_err();
    assert_eq!(neither.code(), Code::InvalidArgument);
    let unknown = driver
        .get_task_diff(GetTaskDiffRequest {
            task_id: "no-such-task".into(),
            ..GetTaskDiffRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn a_push_that_fails_leaves_the_task_completed_with_the_reason_and_its_work_downloadable() {
    let (forge, url) = forge_with_repository("refusing").await;
    let refused_url = url;
    forge.refuse_pushes("acme", "refusing").await;
    let other_url = forge
        .create_repo(
            "acme",
            "open",
            &[("keep.txt", b"kept\n"), ("gone.txt", b"x\n")],
        )
        .await;
    let mut rightful = publishing_worker(&forge, TOKEN);
    rightful.labels.insert("credential".into(), "right".into());
    let mut wrong = publishing_worker(&forge, "not-the-token");
    wrong.labels.insert("credential".into(), "wrong".into());
    let cluster = TestCluster::start(vec![rightful, wrong]).await;
    let mut driver = cluster.driver().await;
    let branch = || {
        Some(ResultSpec {
            branch: "result/{task_id}".into(),
            pull_request: true,
            ..ResultSpec::default()
        })
    };
    let on = |credential: &str, url: &str| TaskSpec {
        worker_selector: [("credential".to_owned(), credential.to_owned())].into(),
        ..changing_task(url, branch())
    };
    let refused = cluster.submit(on("right", &refused_url)).await;
    let unauthorised = cluster.submit(on("wrong", &other_url)).await;
    for (task, says) in [
        (&refused, "pushes to acme/refusing are refused"),
        (&unauthorised, "authentication failed"),
    ] {
        let task = cluster.finish_completed(&task.task_id).await;
        let branch = task.branch.clone().unwrap();
        assert!(!branch.pushed, "{branch:?}");
        assert!(
            branch.error.starts_with("the push of branch result/"),
            "{}",
            branch.error
        );
        // The server's own words come through.
        assert!(
            branch.error.to_lowercase().contains(says),
            "{}",
            branch.error
        );
        assert!(branch.pull_request_url.is_empty());
        assert!(!branch.error.contains(TOKEN) && !branch.error.contains("not-the-token"));
        // The work is still there to take.
        let listed = listing(&mut driver, &task.task_id).await;
        assert_eq!(change_of(&listed.files, "added.txt"), FileChange::Added);
    }
    for (repo, task) in [("refusing", &refused), ("open", &unauthorised)] {
        let name = format!("result/{}", task.task_id);
        assert_eq!(forge.branch_commit("acme", repo, &name).await, None);
    }
    assert!(forge.pull_requests().is_empty());

    // A forge that goes away between the clone and the push.
    let (vanishing, vanishing_url) = forge_with_repository("vanishing").await;
    let task = cluster
        .submit(TaskSpec {
            worker_selector: [("credential".to_owned(), "right".to_owned())].into(),
            ..TaskSpec {
                repo_url: vanishing_url,
                result: branch(),
                ..with_tools("BASH sleep 1 && echo late > late.txt && echo ok", &["Bash"])
            }
        })
        .await;
    cluster.wait_for_agent(&task.task_id).await;
    drop(vanishing);
    let task = cluster.finish_completed(&task.task_id).await;
    let branch = task.branch.unwrap();
    assert!(!branch.pushed);
    assert!(
        branch.error.contains("unable to access"),
        "{}",
        branch.error
    );
    let listed = listing(&mut driver, &task.task_id).await;
    assert_eq!(change_of(&listed.files, "late.txt"), FileChange::Added);
}

#[tokio::test]
async fn workspaces_are_removed_after_their_retention_and_with_their_task() {
    let kept = WorkerSpec {
        labels: [("retention".to_owned(), "week".to_owned())].into(),
        ..WorkerSpec::default()
    };
    let short = WorkerSpec {
        labels: [("retention".to_owned(), "short".to_owned())].into(),
        extra_yaml: "workspaceRetention: 3s\n".into(),
        ..WorkerSpec::default()
    };
    let mut cluster = TestCluster::start(vec![kept, short]).await;
    let mut driver = cluster.driver().await;
    let on = |retention: &str, text: &str| TaskSpec {
        worker_selector: [("retention".to_owned(), retention.to_owned())].into(),
        ..with_tools(text, &["Bash"])
    };

    // Retention: the workspace goes a few seconds after its task ended, not before.
    let task = cluster
        .submit(on(
            "short",
            "BASH head -c 3000000 /dev/zero > big.bin && echo written",
        ))
        .await;
    let task = cluster.finish_completed(&task.task_id).await;
    let workspace = Path::new(&task.workspace).to_path_buf();
    assert!(workspace.join("big.bin").is_file());
    let short_worker = cluster.worker_ids[1].clone();
    let counted = wait_for(Duration::from_secs(10), || {
        let mut driver = driver.clone();
        let short_worker = short_worker.clone();
        async move {
            let status = driver
                .get_cluster_status(GetClusterStatusRequest {})
                .await
                .ok()?
                .into_inner();
            status.workers.into_iter().find(|worker| {
                worker.worker_id == short_worker && worker.workspace_bytes >= 3_000_000
            })
        }
    })
    .await
    .expect("the worker reports the disk its workspaces use");
    assert!(counted.disk_free_bytes > 0);
    wait_until(Duration::from_secs(20), || {
        let gone = !workspace.exists();
        async move { gone }
    })
    .await
    .expect("the workspace is removed after its retention");
    let removed = driver
        .list_task_files(files_of(&task.task_id))
        .await
        .unwrap_err();
    assert_eq!(removed.code(), Code::NotFound);
    assert!(
        removed.message().contains("worker.workspaceRetention"),
        "{}",
        removed.message()
    );

    // Delete: a running task is refused; an ended one goes with its events and workspace.
    let running = cluster
        .submit(on("week", "BASH echo early > early.txt && sleep 30"))
        .await;
    // Its files are there to see while it runs.
    let early = wait_for(Duration::from_secs(30), || {
        let mut driver = driver.clone();
        let task_id = running.task_id.clone();
        async move {
            let listed = driver.list_task_files(files_of(&task_id)).await.ok()?;
            listed
                .into_inner()
                .files
                .into_iter()
                .find(|file| file.path == "early.txt")
        }
    })
    .await
    .expect("a running task's files are listed");
    assert_eq!(early.change(), FileChange::Added);
    let refused = driver
        .delete_task(DeleteTaskRequest {
            task_id: running.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("cancel it first"),
        "{}",
        refused.message()
    );
    driver
        .cancel_task(CancelTaskRequest {
            task_id: running.task_id.clone(),
            reason: "done with it".into(),
        })
        .await
        .unwrap();
    let (cancelled, _) = cluster.finish(&running.task_id).await;
    assert_eq!(cancelled.status(), TaskStatus::Cancelled);
    let workspace = Path::new(&cancelled.workspace).to_path_buf();
    assert!(workspace.is_dir(), "a week's retention keeps it");
    let deleted = driver
        .delete_task(DeleteTaskRequest {
            task_id: cancelled.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.workspace_removed);
    assert_eq!(deleted.task.unwrap().task_id, cancelled.task_id);
    assert!(!workspace.exists());
    for missing in [
        driver
            .get_task(GetTaskRequest {
                task_id: cancelled.task_id.clone(),
            })
            .await
            .map(drop),
        driver
            .stream_task_events(StreamTaskEventsRequest {
                task_id: cancelled.task_id.clone(),
                after_sequence: 0,
            })
            .await
            .map(drop),
    ] {
        assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    }
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn a_worker_low_on_disk_takes_no_work_and_says_why() {
    let mut cluster = TestCluster::start(vec![]).await;
    let worker_id = cluster
        .add_worker(WorkerSpec {
            // More than any disk this test runs on has free.
            extra_yaml: "minFreeDisk: 1000TB\n".into(),
            ..WorkerSpec::default()
        })
        .await;
    let driver = cluster.driver().await;
    let worker = wait_for(Duration::from_secs(20), || {
        let mut driver = driver.clone();
        let worker_id = worker_id.clone();
        async move {
            driver
                .get_cluster_status(GetClusterStatusRequest {})
                .await
                .ok()?
                .into_inner()
                .workers
                .into_iter()
                .find(|worker| worker.worker_id == worker_id && !worker.health_reason.is_empty())
        }
    })
    .await
    .expect("the worker registers and reports its disk");
    assert!(!worker.healthy);
    assert!(
        worker.health_reason.starts_with("low on disk: ")
            && worker
                .health_reason
                .contains("`worker.minFreeDisk` (909.5 TiB)"),
        "{}",
        worker.health_reason
    );
    // Nothing is placed there; the task waits rather than failing midway.
    let task = cluster.submit(prompt("hello")).await;
    let direct = cluster
        .worker_client(0)
        .execute_task(ExecuteTaskRequest {
            task_id: "direct".into(),
            attempt: 1,
            spec: Some(prompt("hello")),
            ..ExecuteTaskRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(direct.code(), Code::Unavailable);
    assert!(
        direct.message().contains("low on disk"),
        "{}",
        direct.message()
    );
    // The scheduler looked for a worker, and says why it waits.
    let waiting = wait_for(Duration::from_secs(10), || {
        let cluster = &cluster;
        let task_id = task.task_id.clone();
        async move {
            let task = cluster.task(&task_id).await;
            (!task.status_reason.is_empty()).then_some(task)
        }
    })
    .await
    .expect("the task says why it waits");
    assert_eq!(
        waiting.status(),
        TaskStatus::Pending,
        "{}",
        waiting.status_reason
    );
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn the_files_commands_of_the_cli() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let driver = cluster.driver.address.clone();
    let task = cluster
        .submit(with_tools(
            "BASH mkdir -p out && printf 'x\\n' > out/a.txt && echo ok",
            &["Bash"],
        ))
        .await;
    let task = cluster.finish_completed(&task.task_id).await;
    let id = task.task_id.as_str();

    let (ok, out, err) = cli(&driver, &["tasks", "files", id]).await;
    assert!(ok, "{err}");
    assert!(out.contains("added") && out.contains("out/a.txt"), "{out}");
    assert!(out.contains("1 files changed (1 added), +1 -0"), "{out}");

    let (ok, out, err) = cli(&driver, &["tasks", "diff", id]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("+++ b/out/a.txt") && out.contains("+x"),
        "{out}"
    );
    let (ok, out, _) = cli(&driver, &["tasks", "diff", id, "--stat"]).await;
    assert!(ok && out.starts_with("1 files changed"), "{out}");

    let into = cluster.dir.path().join("downloaded");
    let into_text = into.to_str().unwrap();
    let (ok, out, err) = cli(&driver, &["tasks", "download", id, "-o", into_text]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("1 files, 2 B into"), "{out}");
    assert_eq!(
        std::fs::read_to_string(into.join("out/a.txt")).unwrap(),
        "x\n"
    );
    let (ok, _, err) = cli(&driver, &["tasks", "download", id, "../x", "-o", into_text]).await;
    assert!(
        !ok && err.contains("InvalidArgument") && err.contains("leaves the workspace"),
        "{err}"
    );

    let (ok, out, err) = cli(&driver, &["tasks", "rm", id]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("deleted task {id} and its workspace"));
    assert!(!Path::new(&task.workspace).exists());
    let (ok, _, err) = cli(&driver, &["tasks", "get", id]).await;
    assert!(!ok && err.contains("NotFound"), "{err}");
}

#[tokio::test]
async fn a_container_tasks_changes_come_back_from_its_mounted_workspace() {
    let cluster = TestCluster::start(vec![WorkerSpec::in_mode(Mode::Container)]).await;
    let mut driver = cluster.driver().await;
    let task = cluster
        .submit(with_tools(
            "WRITE note.txt written in a container",
            &["Write"],
        ))
        .await;
    let task = cluster.finish_completed(&task.task_id).await;
    let changes = task.changes.clone().unwrap();
    assert_eq!(
        (changes.files_changed, changes.files_added),
        (1, 1),
        "{changes:?}"
    );
    let listed = listing(&mut driver, &task.task_id).await;
    assert_eq!(change_of(&listed.files, "note.txt"), FileChange::Added);
    let diff = driver
        .get_task_diff(GetTaskDiffRequest {
            task_id: task.task_id.clone(),
            ..GetTaskDiffRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        diff.diff.contains("+written in a container"),
        "{}",
        diff.diff
    );
}
