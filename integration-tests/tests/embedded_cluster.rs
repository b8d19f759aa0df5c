//! `claudecluster up` (all three services in one process) driven by the `claudecluster`
//! client commands.

use std::process::Stdio;

use claudecluster_integration_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

struct Up {
    child: tokio::process::Child,
    driver: String,
    /// The driver's HTTP face: `up` serves it too.
    http: String,
}

async fn up(dir: &std::path::Path, api: &StandinApi) -> Up {
    let config = dir.join("up.yaml");
    std::fs::write(
        &config,
        format!(
            "driver:\n  listen: 127.0.0.1:0\n\
             scheduler:\n  listen: 127.0.0.1:0\n\
             worker:\n  listen: 127.0.0.1:0\n  workspaceRoot: {ws}\n  processPool:\n    maxProcesses: 2\n    claudeCodePath: {claude}\n  agent:\n    env:\n      CLAUDE_CONFIG_DIR: {cfg}\n",
            ws = dir.join("workspaces").display(),
            claude = claude_bin().display(),
            cfg = dir.join("claude-config").display(),
        ),
    )
    .unwrap();
    let mut child = Command::new(claudecluster_bin())
        .args(["up", "--config"])
        .arg(&config)
        .env("ANTHROPIC_BASE_URL", api.base_url())
        .env("ANTHROPIC_API_KEY", "sk-ant-standin-secret")
        .env("CLAUDE_CODE_MAX_RETRIES", "0")
        .env("XDG_DATA_HOME", dir.join("data"))
        // Not the default port 3000: tests run side by side.
        .env("CLAUDECLUSTER_DRIVER__HTTP__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut driver = None;
    let mut http = None;
    let mut listening = 0;
    // The scheduler, the driver's HTTP face, the driver and the worker.
    while listening < 4 {
        let line = lines.next_line().await.unwrap().expect("`up` exited early");
        if let Some(address) = line.strip_prefix("claudecluster: driver listening on ") {
            driver = Some(address.to_owned());
        }
        if let Some(address) = line.strip_prefix("claudecluster: http listening on ") {
            http = Some(address.to_owned());
        }
        if line.contains(" listening on ") {
            listening += 1;
        }
    }
    Up {
        child,
        driver: driver.expect("the driver's address"),
        http: http.expect("the HTTP face's address"),
    }
}

async fn client(driver: &str, args: &[&str]) -> std::process::Output {
    Command::new(claudecluster_bin())
        .args(args)
        .env("CLAUDECLUSTER_DRIVER", driver)
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn up_runs_a_task_that_the_client_follows_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let api = StandinApi::start().await.unwrap();
    let mut cluster = up(dir.path(), &api).await;
    // The worker registers just after it listens; `status` shows it once it has.
    wait_until(std::time::Duration::from_secs(10), || async {
        String::from_utf8_lossy(&client(&cluster.driver, &["status"]).await.stdout)
            .contains("process_pool")
    })
    .await
    .expect("the embedded worker registers");
    let workers = http::get(&format!("http://{}/workers", cluster.http))
        .await
        .json();
    assert_eq!(
        workers["workers"][0]["mode"], "process_pool",
        "`up` serves the HTTP face over the same driver: {workers}"
    );

    let output = client(
        &cluster.driver,
        &[
            "run",
            "--follow",
            "--allowed-tools",
            "Write",
            "WRITE made-by-cli.txt hi",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("MOCK_DONE wrote made-by-cli.txt"),
        "{stdout}"
    );
    assert!(stderr.contains("→ Write"), "tool calls are shown: {stderr}");
    assert!(
        stderr.contains("= done in 2 turn(s), $"),
        "the cost is shown at the end: {stderr}"
    );
    assert!(stderr.contains("[completed]"), "{stderr}");

    let failed = client(&cluster.driver, &["run", "--follow", "ERROR 500"]).await;
    assert_eq!(
        failed.status.code(),
        Some(1),
        "a failed task exits non-zero"
    );
    assert!(
        String::from_utf8_lossy(&failed.stderr)
            .contains("[failed] agent stopped on an api error (status 500)")
    );

    let listed = client(&cluster.driver, &["tasks", "list", "--status", "failed"]).await;
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(
        listed.lines().count(),
        2,
        "a header and the failed task: {listed}"
    );
    assert!(listed.contains("ERROR 500"));

    let task_id = String::from_utf8_lossy(&client(&cluster.driver, &["run", "HANG"]).await.stdout)
        .trim()
        .to_owned();
    let cancelled = client(
        &cluster.driver,
        &["tasks", "cancel", &task_id, "--reason", "changed my mind"],
    )
    .await;
    let cancelled = String::from_utf8_lossy(&cancelled.stdout);
    assert!(cancelled.contains("status:    cancelled"), "{cancelled}");
    assert!(
        cancelled.contains("reason:    changed my mind"),
        "{cancelled}"
    );

    let missing = client(&cluster.driver, &["tasks", "get", "no-such-task"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("NotFound: task no-such-task not found")
    );

    let _ = cluster.child.start_kill();
}

#[tokio::test]
async fn a_bad_config_key_stops_up_with_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    std::fs::write(&config, "worker:\n  processPool:\n    maxProcesses: -3\n").unwrap();
    let output = Command::new(claudecluster_bin())
        .args(["up", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`worker.processPool.maxProcesses`"),
        "{stderr}"
    );
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
}
