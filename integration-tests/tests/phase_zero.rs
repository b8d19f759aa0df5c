//! The seed's Phase 0: a primary Claude Code (the real CLI) uses `claudecluster mcp` to spawn a
//! containerized Claude Code, waits for it, and answers with its result.

use claudecluster_integration_tests::docker::assert_containers_removed;
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;
use serde_json::{Value, json};

#[tokio::test]
async fn a_primary_claude_code_spawns_a_containerized_agent_and_reports_its_result() {
    let cluster = TestCluster::start(vec![WorkerSpec::in_mode(Mode::Container)]).await;
    let scratch = tempfile::tempdir().unwrap();
    let mcp_config = json!({
        "mcpServers": {
            "claudecluster": {
                "command": claudecluster_bin(),
                "args": ["mcp", "--driver", cluster.driver.address],
            }
        }
    });
    let output = tokio::process::Command::new(claude_bin())
        .args(["-p", "--output-format", "stream-json", "--verbose"])
        .args(["--mcp-config", &mcp_config.to_string()])
        .args([
            "--allowedTools",
            "mcp__claudecluster__spawn_claude_container,mcp__claudecluster__wait_for_task",
        ])
        .args(["--", "PHASE0 hello from the child"])
        .current_dir(scratch.path())
        .env("ANTHROPIC_BASE_URL", cluster.api.base_url())
        .env("ANTHROPIC_API_KEY", "sk-ant-standin-secret")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("CLAUDE_CODE_MAX_RETRIES", "0")
        .env("CLAUDE_CONFIG_DIR", scratch.path().join("primary-config"))
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run the primary claude");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let events: Vec<Value> = stdout
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let init = events
        .iter()
        .find(|e| e["type"] == "system" && e["subtype"] == "init")
        .expect("the primary started");
    assert_eq!(init["mcp_servers"][0]["name"], "claudecluster");
    assert_eq!(
        init["mcp_servers"][0]["status"], "connected",
        "the MCP server started: {}",
        init["mcp_servers"]
    );
    let result = events
        .iter()
        .find(|e| e["type"] == "result")
        .unwrap_or_else(|| panic!("no result: {stdout}"));
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(
        result["result"],
        "PRIMARY DONE: MOCK_REPLY turn=1: hello from the child"
    );

    // The child ran in a container of the cluster, and is recorded as the primary's.
    let children = cluster
        .driver()
        .await
        .list_tasks(ListTasksRequest {
            label_selector: [(
                "claudecluster.parent_session".to_owned(),
                init["session_id"].as_str().unwrap().to_owned(),
            )]
            .into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(
        children.len(),
        1,
        "the primary's session id labels its child"
    );
    let child = &children[0];
    assert_eq!(child.status(), TaskStatus::Completed);
    assert_eq!(child.spec.as_ref().unwrap().prompt, "hello from the child");
    assert!(
        child.runner.starts_with("container claudecluster-"),
        "{}",
        child.runner
    );
    assert_containers_removed(&format!("claudecluster.task={}", child.task_id)).await;
}
