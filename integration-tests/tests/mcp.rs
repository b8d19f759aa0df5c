//! `claudecluster mcp` with the official Python MCP SDK as the client, over stdio and over
//! streamable HTTP, against a cluster with a container worker running the real CLI.

use std::collections::HashMap;
use std::path::Path;

use claudecluster_integration_tests::*;
use serde_json::Value;

async fn run_client(args: &[&str]) -> HashMap<String, Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/mcp_client.py");
    let mut all = vec![script.to_str().unwrap()];
    all.extend_from_slice(args);
    python_steps(&all).await
}

fn check_scenario(steps: &HashMap<String, Value>, expect_mine: bool) {
    assert_eq!(steps["initialize"]["server"], "claudecluster");
    let names: Vec<&str> = steps["tools"]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for tool in [
        "spawn_claude_container",
        "wait_for_task",
        "get_task_status",
        "get_task_result",
        "cancel_task",
        "list_tasks",
        "create_session",
        "send_message",
        "wait_for_reply",
        "close_session",
        "cluster_status",
    ] {
        assert!(names.contains(&tool), "{tool} missing from {names:?}");
    }
    let properties = &steps["tools"]["spawn_properties"];
    for parameter in [
        "task",
        "repoUrl",
        "sessionTimeout",
        "memory",
        "cpus",
        "environment",
    ] {
        assert!(
            properties
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == parameter),
            "{parameter}: {properties}"
        );
    }
    assert_eq!(
        steps["tools"]["spawn_required"],
        serde_json::json!(["task"])
    );

    let spawn = &steps["spawn"];
    assert_eq!(spawn["is_error"], false);
    assert_eq!(
        spawn["status"], "running",
        "spawn returns once the container runs: {spawn}"
    );
    assert!(
        spawn["container"]
            .as_str()
            .unwrap()
            .starts_with("claudecluster-"),
        "{spawn}"
    );
    assert!(!spawn["workerId"].as_str().unwrap().is_empty());
    assert_eq!(steps["wait"]["status"], "completed");
    let result = &steps["result"];
    assert_eq!(result["is_error"], false);
    assert_eq!(result["result"]["text"], "MOCK_DONE wrote mcp-task.txt");
    // What the agent changed comes with its answer: the summary, and the diff itself.
    assert_eq!(result["changes"]["filesAdded"], 1, "{result}");
    let diff = result["diff"].as_str().unwrap();
    assert!(
        diff.contains("+++ b/mcp-task.txt") && diff.contains("+hello from mcp"),
        "{diff}"
    );
    assert!(result["result"]["costUsd"].as_f64().unwrap() > 0.0);
    assert_eq!(steps["cancel"]["status"], "cancelled");
    assert_eq!(steps["cancel"]["reason"], "not needed");
    let failed = &steps["failed_result"];
    assert_eq!(
        failed["is_error"], true,
        "a failed task is an error result: {failed}"
    );
    assert!(
        failed["reason"].as_str().unwrap().contains("status 529"),
        "{failed}"
    );
    let mine = steps["list_mine"]["task_ids"].as_array().unwrap();
    if expect_mine {
        assert_eq!(steps["list_mine"]["is_error"], false);
        assert_eq!(mine.len(), 3, "the primary's children: {mine:?}");
        assert!(mine.contains(&spawn["taskId"]));
    } else {
        assert_eq!(
            steps["list_mine"]["is_error"], true,
            "an HTTP client has no Claude Code session"
        );
        assert!(
            steps["list_mine"]["text"]
                .as_str()
                .unwrap()
                .contains("CLAUDE_CODE_SESSION_ID")
        );
    }

    assert_eq!(steps["create_session"]["is_error"], false);
    assert_eq!(steps["message_1"]["reply"], "MOCK_DONE wrote mcp.txt");
    assert_eq!(steps["message_1"]["turn"], 1);
    assert_eq!(steps["message_2"]["reply"], "MOCK_DONE from the session");
    assert_eq!(steps["close_session"]["state"], "closed");

    let missing = &steps["missing_task"];
    assert_eq!(missing["is_error"], true);
    assert_eq!(missing["text"], "task no-such-task not found");
    let unknown = &steps["unknown_argument"];
    assert_eq!(unknown["is_error"], true);
    assert!(
        unknown["text"]
            .as_str()
            .unwrap()
            .contains("unknown field `bogus`"),
        "{unknown}"
    );
    assert_eq!(
        steps["unknown_tool"]["protocol_error"], true,
        "{}",
        steps["unknown_tool"]
    );
    let workers = steps["cluster_status"]["workers"].as_array().unwrap();
    assert_eq!(
        workers[0]["modes"],
        serde_json::json!(["container_agentic"])
    );
}

#[tokio::test]
async fn the_python_sdk_over_stdio_spawns_waits_cancels_and_talks_to_a_session() {
    let cluster = TestCluster::start(vec![WorkerSpec::in_mode(Mode::Container)]).await;
    let bin = claudecluster_bin();
    let steps = run_client(&["stdio", bin.to_str().unwrap(), &cluster.driver.address]).await;
    check_scenario(&steps, true);
    let spawned = cluster
        .task(steps["spawn"]["taskId"].as_str().unwrap())
        .await;
    let labels = spawned.spec.unwrap().labels;
    assert_eq!(
        labels
            .get("claudecluster.parent_session")
            .map(String::as_str),
        Some("primary-session-1")
    );
    eprintln!(
        "mcp stdio: spawn {:.0} ms, median call {:.2} ms",
        steps["spawn"]["spawn_ms"].as_f64().unwrap(),
        steps["latency"]["median_ms"].as_f64().unwrap()
    );
}

#[tokio::test]
async fn the_python_sdk_over_streamable_http_does_the_same() {
    let cluster = TestCluster::start(vec![WorkerSpec::in_mode(Mode::Container)]).await;
    let (_server, address) = start_mcp_http(&cluster.driver.address, &[], &[]).await;
    let steps = run_client(&["http", &format!("http://{address}/mcp")]).await;
    check_scenario(&steps, false);
}

#[tokio::test]
async fn a_driver_that_is_down_is_a_readable_tool_error() {
    // A driver address where nothing listens.
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let script = r#"
import asyncio, json, sys
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
async def main():
    params = StdioServerParameters(command=sys.argv[1], args=["mcp", "--driver", sys.argv[2]])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("cluster_status", {})
            print(json.dumps({"is_error": result.is_error, "text": result.content[0].text}))
            again = await session.call_tool("list_tasks", {})
            print(json.dumps({"is_error": again.is_error}))
asyncio.run(main())
"#;
    let output = tokio::process::Command::new(venv_tool("python"))
        .args([
            "-c",
            script,
            claudecluster_bin().to_str().unwrap(),
            &unused.to_string(),
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let first: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["is_error"], true);
    assert!(
        first["text"].as_str().unwrap().starts_with(&format!(
            "the ClaudeCluster driver at {unused} is unreachable"
        )),
        "{first}"
    );
    let second: Value = serde_json::from_str(stdout.lines().nth(1).unwrap()).unwrap();
    assert_eq!(
        second["is_error"], true,
        "the server is still up after an error"
    );
}
