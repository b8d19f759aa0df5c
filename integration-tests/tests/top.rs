//! `claudecluster top` on a real terminal (a tmux pane, or a pseudo-terminal of `script`
//! where tmux is missing): what it shows of a busy cluster, and that `q` ends it and gives
//! the terminal back.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

#[tokio::test]
async fn top_shows_running_tasks_on_their_worker_and_quits_on_q() {
    let kind = TerminalKind::installed();
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    cluster.wait_for_healthy_workers(1).await;
    let worker_id = cluster.worker_ids[0].clone();
    // Both outlast the test: ten seconds and more of streamed text, and a Bash call that waits.
    // Not `sleep 60`: the CLI may refuse a standalone sleep of 25 s or more, and then the task
    // ends at once.
    let streaming = cluster.submit(prompt("SLOW 120 250")).await;
    let in_tool = cluster
        .submit(with_tools("BASH timeout 60 tail -f /dev/null", &["Bash"]))
        .await;
    wait_for(&cluster, &streaming.task_id, |task| {
        task.status() == TaskStatus::Running
    })
    .await;
    wait_for(&cluster, &in_tool.task_id, |task| {
        task.status() == TaskStatus::Running && task.last_tool == "Bash"
    })
    .await;

    let command = format!(
        "{} top --driver {} --interval 200",
        quoted(&claudecluster_bin()),
        cluster.driver.address
    );
    let mut terminal = Terminal::start(kind, &command).await;
    let screen = terminal
        .wait_for_screen(Duration::from_secs(30), |screen| {
            screen.contains(&streaming.task_id) && screen.contains(&in_tool.task_id)
        })
        .await;
    let row = |needle: &str| {
        screen
            .lines()
            .find(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no row with {needle}:\n{screen}"))
            .to_owned()
    };
    let streaming_row = row(&streaming.task_id);
    assert!(
        streaming_row.contains(&worker_id) && streaming_row.contains("running"),
        "{streaming_row}"
    );
    let in_tool_row = row(&in_tool.task_id);
    assert!(
        in_tool_row.contains(&worker_id) && in_tool_row.contains("Bash"),
        "{in_tool_row}"
    );
    let worker_row = screen
        .lines()
        .find(|line| line.starts_with(&worker_id))
        .unwrap_or_else(|| panic!("no row of worker {worker_id}:\n{screen}"));
    assert!(worker_row.contains("process_pool"), "{worker_row}");
    assert!(screen.contains(&cluster.driver.address), "{screen}");
    assert!(
        terminal.on_alternate_screen().await,
        "top draws on the alternate screen"
    );

    terminal.press_q().await;
    let status = terminal.exit_status(Duration::from_secs(5)).await;
    assert_eq!(status, 0, "top exits 0 on q");
    assert!(
        !terminal.on_alternate_screen().await,
        "the terminal is given back"
    );

    // Into a pipe, a script gets one snapshot as plain text.
    let printed = Command::new(claudecluster_bin())
        .args(["top", "--driver", &cluster.driver.address])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(printed.stdout).unwrap();
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let streaming_line = text
        .lines()
        .find(|line| line.starts_with(&streaming.task_id))
        .unwrap_or_else(|| panic!("no row of the task:\n{text}"));
    assert!(streaming_line.contains("running"), "{streaming_line}");
    assert!(!text.contains('\x1b'), "no terminal codes: {text:?}");
    assert!(!text.contains("q quits"), "{text}");
}

/// Polls the task until `holds` (a minute at most).
async fn wait_for(cluster: &TestCluster, task_id: &str, holds: impl Fn(&Task) -> bool) {
    let reached = wait_until(Duration::from_secs(60), || async {
        holds(&cluster.task(task_id).await)
    })
    .await;
    if reached.is_err() {
        let task = cluster.task(task_id).await;
        panic!(
            "task {task_id} is {} (last tool `{}`): {}",
            task.status().label(),
            task.last_tool,
            task.status_reason
        );
    }
}

fn quoted(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

#[derive(Clone, Copy)]
enum TerminalKind {
    Tmux,
    Script,
}

impl TerminalKind {
    /// tmux where it is installed, else `script` of util-linux. Without either the test fails:
    /// like every component of these tests, a terminal is required, never skipped.
    fn installed() -> Self {
        if on_path("tmux") {
            TerminalKind::Tmux
        } else if on_path("script") {
            TerminalKind::Script
        } else {
            panic!("neither tmux nor script (util-linux) is installed: `apt-get install tmux`")
        }
    }
}

/// A command on a 160×50 terminal of its own.
enum Terminal {
    /// A tmux server of the test's own, its socket in `dir`. The pane's shell writes the
    /// command's exit status to `dir/status`: tmux may be slow to reap the command and tell.
    Tmux { dir: tempfile::TempDir },
    /// `script` gives the command a pseudo-terminal; what it draws is collected raw.
    Script {
        child: Box<Child>,
        keys: ChildStdin,
        drawn: Arc<Mutex<Vec<u8>>>,
    },
}

const COLUMNS: u16 = 160;
const ROWS: u16 = 50;

impl Terminal {
    async fn start(kind: TerminalKind, command: &str) -> Terminal {
        match kind {
            TerminalKind::Tmux => {
                let dir = tempfile::tempdir().unwrap();
                // The dead pane stays, so that the screen can be read after the command ended.
                let config = dir.path().join("tmux.conf");
                std::fs::write(&config, "set-option -g remain-on-exit on\n").unwrap();
                let reporting = format!(
                    "{command}; echo $? > {}",
                    quoted(&dir.path().join("status"))
                );
                let (columns, rows) = (COLUMNS.to_string(), ROWS.to_string());
                let terminal = Terminal::Tmux { dir };
                terminal
                    .tmux(&[
                        "-f",
                        config.to_str().unwrap(),
                        "new-session",
                        "-d",
                        "-x",
                        &columns,
                        "-y",
                        &rows,
                        "-s",
                        "top",
                        &reporting,
                    ])
                    .await;
                terminal
            }
            TerminalKind::Script => {
                let sized = format!("stty cols {COLUMNS} rows {ROWS} && exec {command}");
                let mut child = Command::new("script")
                    .args(["-qfec", &sized, "/dev/null"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("start script");
                let keys = child.stdin.take().unwrap();
                let mut stdout = child.stdout.take().unwrap();
                let drawn = Arc::new(Mutex::new(Vec::new()));
                let sink = drawn.clone();
                tokio::spawn(async move {
                    let mut buffer = [0; 8192];
                    while let Ok(read) = stdout.read(&mut buffer).await {
                        if read == 0 {
                            break;
                        }
                        sink.lock().unwrap().extend_from_slice(&buffer[..read]);
                    }
                });
                Terminal::Script {
                    child: Box::new(child),
                    keys,
                    drawn,
                }
            }
        }
    }

    async fn tmux(&self, args: &[&str]) -> String {
        let Terminal::Tmux { dir } = self else {
            unreachable!("only a tmux terminal runs tmux")
        };
        let output = Command::new("tmux")
            .arg("-S")
            .arg(dir.path().join("socket"))
            .args(args)
            .output()
            .await
            .expect("run tmux");
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The text on the screen, a line per row.
    async fn screen(&self) -> String {
        match self {
            Terminal::Tmux { .. } => self.tmux(&["capture-pane", "-p", "-t", "top"]).await,
            Terminal::Script { drawn, .. } => text_of(&drawn.lock().unwrap()),
        }
    }

    /// Polls the screen until `shows` holds of it; fails with the last screen after `limit`.
    async fn wait_for_screen(&self, limit: Duration, shows: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let screen = self.screen().await;
            if shows(&screen) {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the screen did not show what was expected within {limit:?}:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn press_q(&mut self) {
        match self {
            Terminal::Tmux { .. } => {
                self.tmux(&["send-keys", "-t", "top", "q"]).await;
            }
            Terminal::Script { keys, .. } => {
                keys.write_all(b"q").await.unwrap();
                keys.flush().await.unwrap();
            }
        }
    }

    /// Waits for the command to exit; its exit status.
    async fn exit_status(&mut self, limit: Duration) -> i32 {
        match self {
            Terminal::Tmux { dir } => {
                let written = dir.path().join("status");
                let deadline = tokio::time::Instant::now() + limit;
                loop {
                    let status = std::fs::read_to_string(&written).unwrap_or_default();
                    if let Some(status) = status.strip_suffix('\n') {
                        return status.parse().expect("an exit status");
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the command still runs after {limit:?}:\n{}",
                        self.screen().await
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Terminal::Script { child, .. } => tokio::time::timeout(limit, child.wait())
                .await
                .unwrap_or_else(|_| panic!("the command still runs after {limit:?}"))
                .unwrap()
                .code()
                .expect("an exit code, not a signal"),
        }
    }

    async fn on_alternate_screen(&self) -> bool {
        match self {
            Terminal::Tmux { .. } => {
                let flag = self
                    .tmux(&["display-message", "-p", "-t", "top", "#{alternate_on}"])
                    .await;
                flag.trim() == "1"
            }
            Terminal::Script { drawn, .. } => {
                let drawn = String::from_utf8_lossy(&drawn.lock().unwrap()).into_owned();
                let entered = drawn.rfind("\x1b[?1049h");
                entered.is_some() && drawn.rfind("\x1b[?1049l") < entered
            }
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Terminal::Tmux { dir } = self {
            let _ = std::process::Command::new("tmux")
                .arg("-S")
                .arg(dir.path().join("socket"))
                .arg("kill-server")
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What raw terminal output leaves on screen, near enough to search: escape sequences
/// dropped, and a new line wherever the cursor is moved to a row.
fn text_of(drawn: &[u8]) -> String {
    let drawn = String::from_utf8_lossy(drawn);
    let mut text = String::new();
    let mut chars = drawn.chars();
    while let Some(char) = chars.next() {
        if char != '\x1b' {
            text.push(char);
            continue;
        }
        if chars.next() != Some('[') {
            continue;
        }
        // A control sequence: parameters, then a final character from `@` to `~`.
        for char in chars.by_ref() {
            if ('@'..='~').contains(&char) {
                if char == 'H' {
                    text.push('\n');
                }
                break;
            }
        }
    }
    text
}
