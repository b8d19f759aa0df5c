//! `claudecluster mcp` with bad input and outsized output, through the official Python MCP SDK
//! over stdio against a cluster of real processes: a result larger than the bound comes back
//! shortened and says so, a list too long for one result ends early and pages on, arguments
//! the call got wrong are tool errors that name them, and no credential is ever shown.

use std::collections::{HashMap, HashSet};

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;
use serde_json::Value;

/// `claudecluster mcp`'s bound on a tool result, in bytes of JSON (`MAX_RESULT_BYTES`).
const MAX_RESULT_BYTES: usize = 64 * 1024;
/// How large the agent's answer is: well past the bound.
const LARGE_BYTES: usize = 150_000;
/// Tasks that wait, PENDING, with a long status reason: more than one result can list.
const PARKED_TASKS: usize = 200;

const CLIENT: &str = r#"
import asyncio, json, sys
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

def out(step, result):
    text = result.content[0].text if result.content else ""
    print(json.dumps({
        "step": step,
        "is_error": bool(result.is_error),
        "text_bytes": len(text.encode()),
        "text": text,
        "data": result.structured_content,
    }), flush=True)

async def main():
    bin, driver, large, clone = sys.argv[1:5]
    params = StdioServerParameters(command=bin, args=["mcp", "--driver", driver])
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            call = session.call_tool
            out("result", await call("get_task_result", {"taskId": large}))
            # Far past the longest wait: the wait is clamped, and the task is over anyway.
            out("wait", await call("wait_for_task", {"taskId": large, "timeoutSeconds": 4000000000}))
            out("status", await call("get_task_status", {"taskId": large}))
            out("clone_result", await call("get_task_result", {"taskId": clone}))

            token, page = None, 0
            while True:
                arguments = {"status": "pending", "limit": 1000}
                if token:
                    arguments["pageToken"] = token
                result = await call("list_tasks", arguments)
                out(f"page_{page}", result)
                token = (result.structured_content or {}).get("nextPageToken")
                page += 1
                if not token or page > 50:
                    break

            out("empty_id", await call("get_task_status", {"taskId": ""}))
            out("negative_wait", await call("wait_for_task", {"taskId": large, "timeoutSeconds": -1}))
            out("huge_task", await call("spawn_claude_container", {"task": "x" * (512 * 1024 + 1)}))
            out("bad_repo", await call("spawn_claude_container",
                                       {"task": "hi", "repoUrl": "https://user:s3cret@git.example/a b.git"}))
            out("zero_limit", await call("list_tasks", {"limit": 0}))
            out("turn_zero", await call("wait_for_reply", {"sessionId": "s-1", "turn": 0}))
            out("huge_id", await call("get_task_result", {"taskId": "t" * 100000}))

asyncio.run(main())
"#;

async fn run_client(
    cluster: &TestCluster,
    large_task: &str,
    clone_task: &str,
) -> HashMap<String, Value> {
    python_steps(&[
        "-c",
        CLIENT,
        claudecluster_bin().to_str().unwrap(),
        &cluster.driver.address,
        large_task,
        clone_task,
    ])
    .await
}

/// A task that waits forever, PENDING, for a worker no test starts, with a long status reason
/// (the scheduler's reason names the labels it waits for; a label value takes up to 1 KiB).
fn parked(index: usize) -> BatchTask {
    BatchTask {
        key: format!("parked-{index}"),
        spec: Some(TaskSpec {
            worker_selector: HashMap::from([("parked".to_owned(), "p".repeat(1000))]),
            ..prompt("never runs")
        }),
    }
}

#[tokio::test]
async fn outsized_results_are_shortened_lists_page_and_bad_arguments_are_named() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let large = cluster
        .submit(prompt(&format!("LARGE {LARGE_BYTES}")))
        .await;
    let clone = cluster
        .submit(TaskSpec {
            repo_url: "https://user:s3cret@127.0.0.1:9/org/app.git".into(),
            ..prompt("hello")
        })
        .await;
    let (finished, _) = cluster.finish(&large.task_id).await;
    assert_eq!(finished.status(), TaskStatus::Completed);
    let whole_text = finished.result.unwrap().text;
    assert!(
        whole_text.len() > LARGE_BYTES,
        "the agent's answer is whole"
    );
    cluster.finish(&clone.task_id).await;
    cluster
        .driver()
        .await
        .submit_tasks(SubmitTasksRequest {
            tasks: (0..PARKED_TASKS).map(parked).collect(),
        })
        .await
        .expect("submit the parked tasks");

    let steps = run_client(&cluster, &large.task_id, &clone.task_id).await;
    for (step, value) in &steps {
        assert!(
            value["text_bytes"].as_u64().unwrap() as usize <= MAX_RESULT_BYTES,
            "{step} is past the bound: {} bytes",
            value["text_bytes"]
        );
        assert!(
            !value.to_string().contains("s3cret"),
            "{step} shows a credential"
        );
    }

    // The agent's answer, cut to fit, saying how large it was and where the rest is.
    for step in ["result", "wait", "status"] {
        let value = &steps[step];
        assert_eq!(value["is_error"], false, "{step}: {}", value["text"]);
        let data = &value["data"];
        assert_eq!(data["status"], "completed", "{step}");
        assert_eq!(data["shortened"], true, "{step}");
        assert!(
            data["whole"]
                .as_str()
                .unwrap()
                .contains(&format!("claudecluster tasks get {}", large.task_id)),
            "{step}: {}",
            data["whole"]
        );
        let text = data["result"]["text"].as_str().unwrap();
        assert!(
            text.ends_with(&format!(" …[shortened from {} bytes]", whole_text.len())),
            "{step}: …{}",
            &text[text.len().saturating_sub(80)..]
        );
        let kept = text.split(" …[shortened").next().unwrap();
        assert!(whole_text.starts_with(kept), "{step}");
        assert!(
            kept.len() > MAX_RESULT_BYTES / 2,
            "{step}: the answer keeps most of the room, not {} bytes",
            kept.len()
        );
        // The text content a client reads is the same JSON, parseable.
        let parsed: Value = serde_json::from_str(value["text"].as_str().unwrap()).unwrap();
        assert_eq!(&parsed, data);
    }
    assert_eq!(
        steps["result"]["data"]["filesChanged"],
        serde_json::json!([])
    );

    let clone_result = &steps["clone_result"];
    assert_eq!(clone_result["is_error"], true, "{clone_result}");
    assert_eq!(
        clone_result["data"]["repoUrl"],
        "https://***@127.0.0.1:9/org/app.git"
    );

    // The parked tasks, page after page: every one exactly once, the first page cut short.
    let mut listed = Vec::new();
    let mut pages = 0;
    while let Some(page) = steps.get(&format!("page_{pages}")) {
        assert_eq!(page["is_error"], false, "{page}");
        let data = &page["data"];
        for task in data["tasks"].as_array().unwrap() {
            listed.push(task["taskId"].as_str().unwrap().to_owned());
            assert!(
                task["reason"].as_str().unwrap().len() <= 1024,
                "long texts are cut in lists"
            );
        }
        pages += 1;
    }
    let first = &steps["page_0"]["data"];
    assert_eq!(first["shortened"], true, "{}", steps["page_0"]["text"]);
    let shown = first["tasks"].as_array().unwrap().len();
    assert!(shown < PARKED_TASKS, "the first page ends early: {shown}");
    assert_eq!(first["omitted"], PARKED_TASKS - shown);
    assert!(first["whole"].as_str().unwrap().contains("pageToken"));
    assert!(pages > 1);
    let unique: HashSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "no task is listed twice");
    assert_eq!(listed.len(), PARKED_TASKS, "every parked task is listed");

    // Arguments the call got wrong: tool errors that name them.
    for (step, expected) in [
        ("empty_id", "taskId: must not be empty"),
        ("negative_wait", "timeoutSeconds: "),
        // Past the driver's default limit: the driver refuses it, named as the tool's parameter.
        (
            "huge_task",
            "task: is 524289 bytes; at most 524288 are accepted",
        ),
        ("zero_limit", "limit: must be at least 1"),
        ("turn_zero", "turn: must be at least 1"),
        ("huge_id", "taskId: must have 1 to "),
    ] {
        let value = &steps[step];
        assert_eq!(value["is_error"], true, "{step}: {value}");
        assert!(
            value["text"].as_str().unwrap().contains(expected),
            "{step}: {}",
            value["text"]
        );
    }
    // The driver refuses the URL; the error shows it, if at all, without the password.
    let bad_repo = &steps["bad_repo"];
    assert_eq!(bad_repo["is_error"], true, "{bad_repo}");
    assert!(
        bad_repo["text"].as_str().unwrap().starts_with("repoUrl: "),
        "{bad_repo}"
    );
}
