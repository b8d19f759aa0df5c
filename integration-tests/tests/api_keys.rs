//! Only invited callers: API keys with scopes, ownership, quotas, revocation and the audit log,
//! against a running driver; from Rust, grpcurl and Python grpcio.

use std::time::Duration;

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;
use sha2::Digest;
use tonic::Code;

const ALICE: &str = "cck_alice_0123456789abcdef0123456789";
const BOB: &str = "cck_bob_0123456789abcdef0123456789ab";
const READER: &str = "cck_reader_0123456789abcdef01234567";
const ADMIN: &str = "cck_admin_0123456789abcdef012345678";
const TIGHT: &str = "cck_tight_0123456789abcdef012345678";

fn sha256(key: &str) -> String {
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

fn keys_yaml() -> String {
    format!(
        "auth:\n  apiKeys:\n\
         \x20   - {{id: alice, sha256: {}, scopes: [tasks:read, tasks:write]}}\n\
         \x20   - {{id: bob, sha256: {}, scopes: [tasks:read, tasks:write]}}\n\
         \x20   - {{id: reader, sha256: {}, scopes: [tasks:read]}}\n\
         \x20   - {{id: admin, sha256: {}, scopes: [admin]}}\n\
         \x20   - {{id: tight, sha256: {}, scopes: [tasks:read, tasks:write], quotas: {{requestsPerSecond: 2, runningTasks: 1}}}}\n",
        sha256(ALICE),
        sha256(BOB),
        sha256(READER),
        sha256(ADMIN),
        sha256(TIGHT),
    )
}

async fn submit(driver: &mut Driver, key: &str, spec: TaskSpec) -> Result<Task, tonic::Status> {
    driver
        .submit_task(with_key(SubmitTaskRequest { spec: Some(spec) }, key))
        .await
        .map(|response| response.into_inner().task.unwrap())
}

async fn listed(driver: &mut Driver, key: &str) -> Vec<String> {
    driver
        .list_tasks(with_key(ListTasksRequest::default(), key))
        .await
        .unwrap()
        .into_inner()
        .tasks
        .into_iter()
        .map(|task| task.task_id)
        .collect()
}

fn parked(text: &str) -> TaskSpec {
    TaskSpec {
        worker_selector: [("parked".to_owned(), "true".to_owned())].into(),
        ..prompt(text)
    }
}

#[tokio::test]
async fn keys_scopes_ownership_quotas_revocation_and_the_audit_log() {
    // The harness itself calls as the admin.
    let cluster = TestCluster::start_with_env(
        &keys_yaml(),
        &[("CLAUDECLUSTER_API_KEY", ADMIN)],
        vec![WorkerSpec::default()],
    )
    .await;
    // A client with no key of its own: each call below names its key.
    let mut driver = driver_at(&cluster.driver.address);

    // Missing, malformed and wrong keys.
    for (header, case) in [
        (None, "no key"),
        (Some("Basic YWxpY2U6cHc="), "another scheme"),
        (Some("Bearer "), "an empty key"),
        (
            Some("Bearer cck_not_a_key_of_this_driver_at_all"),
            "a wrong key",
        ),
    ] {
        let mut request = tonic::Request::new(GetClusterStatusRequest {});
        if let Some(header) = header {
            request
                .metadata_mut()
                .insert("authorization", header.parse().unwrap());
        }
        let refused = driver.get_cluster_status(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{case}");
        assert!(
            !refused.message().contains("cck_not_a_key"),
            "the error repeats no key"
        );
    }

    // Under-scoped.
    let refused = submit(&mut driver, READER, prompt("hello"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "key `reader` lacks the scope `tasks:write`"
    );

    // An agent that may run any command needs a scope of its own.
    let unrestricted = submit(&mut driver, ALICE, with_tools("BASH echo hi", &["Bash"]))
        .await
        .unwrap_err();
    assert_eq!(unrestricted.code(), Code::PermissionDenied);
    assert_eq!(
        unrestricted.message(),
        "key `alice` lacks the scope `unrestricted`"
    );

    // Two keys cannot see each other's tasks; an admin sees both.
    let alices = submit(&mut driver, ALICE, prompt("hello")).await.unwrap();
    assert_eq!(alices.owner, "alice");
    let bobs = submit(&mut driver, BOB, parked("waits")).await.unwrap();
    let (ended, _) = cluster.finish(&alices.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    let hidden = driver
        .get_task(with_key(
            GetTaskRequest {
                task_id: bobs.task_id.clone(),
            },
            ALICE,
        ))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    let not_hers = driver
        .cancel_task(with_key(
            CancelTaskRequest {
                task_id: bobs.task_id.clone(),
                reason: String::new(),
            },
            ALICE,
        ))
        .await
        .unwrap_err();
    assert_eq!(not_hers.code(), Code::NotFound);
    assert_eq!(
        listed(&mut driver, ALICE).await,
        vec![alices.task_id.clone()]
    );
    assert_eq!(listed(&mut driver, BOB).await, vec![bobs.task_id.clone()]);
    assert_eq!(
        listed(&mut driver, ADMIN).await,
        [alices.task_id.clone(), bobs.task_id.clone()]
    );
    // One key's idempotency key does not find another's task.
    let keyed = TaskSpec {
        idempotency_key: "same".into(),
        ..parked("keyed")
    };
    let first = submit(&mut driver, ALICE, keyed.clone()).await.unwrap();
    let second = submit(&mut driver, BOB, keyed).await.unwrap();
    assert_ne!(first.task_id, second.task_id);

    // A key made at run time works at once, and stops at once when revoked.
    let created = driver
        .create_api_key(with_key(
            CreateApiKeyRequest {
                key_id: "carol".into(),
                scopes: vec!["tasks:read".into(), "tasks:write".into()],
                quotas: None,
            },
            ADMIN,
        ))
        .await
        .unwrap()
        .into_inner();
    let carol = created.secret.clone();
    assert!(carol.starts_with("cck_"));
    let refused = driver
        .create_api_key(with_key(
            CreateApiKeyRequest {
                key_id: "dave".into(),
                scopes: vec!["admin".into()],
                quotas: None,
            },
            ALICE,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(refused.message(), "key `alice` lacks the scope `admin`");
    let carols = submit(&mut driver, &carol, parked("carol's"))
        .await
        .unwrap();
    assert_eq!(carols.owner, "carol");
    let keys = driver
        .list_api_keys(with_key(ListApiKeysRequest {}, ADMIN))
        .await
        .unwrap()
        .into_inner()
        .keys;
    let ids: Vec<_> = keys.iter().map(|key| key.key_id.as_str()).collect();
    assert_eq!(ids, ["admin", "alice", "bob", "reader", "tight", "carol"]);
    assert!(
        !format!("{keys:?}").contains(&carol),
        "keys are listed without their values"
    );
    driver
        .revoke_api_key(with_key(
            RevokeApiKeyRequest {
                key_id: "carol".into(),
            },
            ADMIN,
        ))
        .await
        .unwrap();
    let revoked = driver
        .get_task(with_key(
            GetTaskRequest {
                task_id: carols.task_id.clone(),
            },
            &carol,
        ))
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), Code::Unauthenticated);
    assert_eq!(revoked.message(), "the API key is unknown or revoked");

    // Quotas: tasks not yet ended, then requests a second; both recover.
    let parked_one = submit(&mut driver, TIGHT, parked("one")).await.unwrap();
    let over = submit(&mut driver, TIGHT, parked("two")).await.unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted);
    assert_eq!(
        over.message(),
        "key `tight` has 1 tasks not yet ended and may have 1 (runningTasks); submit again once some end"
    );
    wait_until(Duration::from_secs(10), || {
        let mut driver = driver.clone();
        let task_id = parked_one.task_id.clone();
        async move {
            driver
                .cancel_task(with_key(
                    CancelTaskRequest {
                        task_id,
                        reason: String::new(),
                    },
                    TIGHT,
                ))
                .await
                .is_ok()
        }
    })
    .await
    .unwrap();
    // Two a second: of a burst of calls, some are refused, saying how long to wait.
    let mut refused = None;
    for _ in 0..5 {
        if let Err(status) = driver
            .get_cluster_status(with_key(GetClusterStatusRequest {}, TIGHT))
            .await
        {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("a burst past the rate is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .starts_with("key `tight` is over its 2 requests a second; try again in "),
        "{}",
        refused.message()
    );
    wait_until(Duration::from_secs(5), || {
        let mut driver = driver.clone();
        async move {
            driver
                .get_cluster_status(with_key(GetClusterStatusRequest {}, TIGHT))
                .await
                .is_ok()
        }
    })
    .await
    .expect("the rate recovers");

    // The audit log: who did what, and who was refused; never a key.
    let records = wait_for_audit(&mut driver, "key.revoke").await;
    let has = |key: &str, action: &str| {
        records
            .iter()
            .any(|record| record.key_id == key && record.action == action)
    };
    assert!(has("alice", "task.submit"));
    assert!(has("admin", "key.create"));
    assert!(has("admin", "key.revoke"));
    assert!(has("reader", "auth.refused"));
    assert!(has("carol", "auth.refused"));
    assert!(has("tight", "task.cancel"));
    assert!(has("", "auth.refused"));
    let everything = format!("{records:?}");
    for secret in [ALICE, BOB, READER, ADMIN, TIGHT, carol.as_str()] {
        assert!(!everything.contains(secret));
    }
    let log = cluster.driver.log();
    assert!(log.contains("task.submit"), "audit lines in the log");
    for secret in [ALICE, BOB, ADMIN, carol.as_str()] {
        assert!(!log.contains(secret), "a key in the log");
    }
}

/// The audit records, once `action` is among them (they are written in the background).
async fn wait_for_audit(driver: &mut Driver, action: &str) -> Vec<AuditRecord> {
    let records = std::sync::Mutex::new(Vec::new());
    wait_until(Duration::from_secs(10), || {
        let mut driver = driver.clone();
        let records = &records;
        async move {
            let found = driver
                .list_audit_records(with_key(ListAuditRecordsRequest::default(), ADMIN))
                .await
                .unwrap()
                .into_inner()
                .records;
            let done = found.iter().any(|record| record.action == action);
            *records.lock().unwrap() = found;
            done
        }
    })
    .await
    .expect("the audit record is stored");
    records.into_inner().unwrap()
}

#[tokio::test]
async fn grpcurl_and_python_present_a_key() {
    // The harness itself calls as the admin.
    let cluster = TestCluster::start_with_env(
        &keys_yaml(),
        &[("CLAUDECLUSTER_API_KEY", ADMIN)],
        vec![WorkerSpec::default()],
    )
    .await;
    let grpcurl = venv_tool("grpcurl");
    let call = |key: Option<&str>| {
        let mut args = vec!["-plaintext".to_owned()];
        if let Some(key) = key {
            args.push("-H".into());
            args.push(format!("authorization: Bearer {key}"));
        }
        args.push(cluster.driver.address.clone());
        args.push("claudecluster.v1.DriverService/GetClusterStatus".into());
        let grpcurl = grpcurl.clone();
        async move {
            tokio::process::Command::new(grpcurl)
                .args(args)
                .output()
                .await
                .unwrap()
        }
    };
    let refused = call(None).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let answered = call(Some(ALICE)).await;
    assert!(
        answered.status.success(),
        "{}",
        String::from_utf8_lossy(&answered.stderr)
    );
    assert!(String::from_utf8_lossy(&answered.stdout).contains("workers"));

    let generated = tempfile::tempdir().unwrap();
    python_stubs(generated.path()).await;
    let stubs = generated.path();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/client.py");
    let output = tokio::process::Command::new(venv_tool("python"))
        .arg(script)
        .arg(stubs)
        .arg(&cluster.driver.address)
        .arg("hello")
        .env("CLAUDECLUSTER_API_KEY", ALICE)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("TASK_STATUS_COMPLETED"), "{stdout}");
    let without = tokio::process::Command::new(venv_tool("python"))
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/client.py"))
        .arg(stubs)
        .arg(&cluster.driver.address)
        .arg("hello")
        .output()
        .await
        .unwrap();
    assert!(!without.status.success());
    assert!(
        String::from_utf8_lossy(&without.stderr).contains("UNAUTHENTICATED"),
        "{}",
        String::from_utf8_lossy(&without.stderr)
    );
}

#[tokio::test]
async fn a_driver_with_no_keys_serves_loopback_only_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("driver.yaml");
    std::fs::write(&config, "listen: 0.0.0.0:0\n").unwrap();
    let output = tokio::process::Command::new(claudecluster_bin())
        .args(["driver", "--config"])
        .arg(&config)
        .env("XDG_DATA_HOME", dir.path().join("data"))
        .env("CLAUDECLUSTER_DRIVER__HTTP__LISTEN", "127.0.0.1:0")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to serve 0.0.0.0:") && stderr.contains("`driver.insecure: true`"),
        "{stderr}"
    );
    std::fs::write(&config, "listen: 0.0.0.0:0\ninsecure: true\n").unwrap();
    let mut driver = ServiceProcess::start("driver", &config, &[]).await;
    assert!(driver.is_alive());
    assert!(driver.log().contains("no API keys"), "it says so at start");
}

/// An MCP client (the official SDK) over streamable HTTP: `URL KEY`; an empty KEY sends none.
const MCP_CLIENT: &str = r#"
import asyncio, json, sys
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

async def main():
    url, key = sys.argv[1], sys.argv[2]
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers) as http:
        raw = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                              headers={"accept": "application/json, text/event-stream"})
        print(json.dumps({"step": "raw", "status": raw.status_code}))
    try:
        async with httpx2.AsyncClient(headers=headers) as http:
            async with streamable_http_client(url, http_client=http) as streams:
                async with ClientSession(streams[0], streams[1]) as session:
                    await session.initialize()
                    listed = await session.call_tool("list_tasks", {})
                    print(json.dumps({"step": "listed", "text": listed.content[0].text}))
    except BaseException as error:
        print(json.dumps({"step": "refused", "error": repr(error)}))

asyncio.run(main())
"#;

#[tokio::test]
async fn the_mcp_server_over_http_takes_only_its_key_and_acts_as_it() {
    let cluster = TestCluster::start_with_env(
        &keys_yaml(),
        &[("CLAUDECLUSTER_API_KEY", ADMIN)],
        vec![WorkerSpec::default()],
    )
    .await;
    let mut driver = driver_at(&cluster.driver.address);
    let alices = submit(&mut driver, ALICE, parked("alice's")).await.unwrap();
    let bobs = submit(&mut driver, BOB, parked("bob's")).await.unwrap();

    // The MCP server presents bob's key to the driver, and asks its own clients for it.
    let (mut server, listen) = start_mcp_http(
        &cluster.driver.address,
        &[],
        &[("CLAUDECLUSTER_API_KEY", BOB.as_ref())],
    )
    .await;
    let url = format!("http://{listen}/mcp");

    let without = python_steps(&["-c", MCP_CLIENT, &url, ""]).await;
    assert_eq!(without["raw"]["status"], 401, "{without:?}");
    assert!(without.contains_key("refused"), "{without:?}");
    let wrong = python_steps(&["-c", MCP_CLIENT, &url, ALICE]).await;
    assert_eq!(
        wrong["raw"]["status"], 401,
        "another key is refused: {wrong:?}"
    );
    assert!(wrong.contains_key("refused"), "{wrong:?}");
    let with = python_steps(&["-c", MCP_CLIENT, &url, BOB]).await;
    assert_ne!(with["raw"]["status"], 401, "{with:?}");
    let listed = with["listed"]["text"].as_str().unwrap();
    assert!(listed.contains(&bobs.task_id), "{listed}");
    assert!(!listed.contains(&alices.task_id), "{listed}");
    server.kill().await.unwrap();
}

/// Audit records gather for a moment before they are stored; a driver stopped with SIGTERM
/// right after the calls stores them first, and a driver started again lists every one.
#[tokio::test]
async fn a_driver_stopped_right_after_calls_keeps_their_audit_records() {
    let mut cluster =
        TestCluster::start_with_env(&keys_yaml(), &[("CLAUDECLUSTER_API_KEY", ADMIN)], vec![])
            .await;
    let mut driver = cluster.driver().await;
    let mut submitted = Vec::new();
    for n in 0..20 {
        submitted.push(
            submit(&mut driver, ALICE, parked(&format!("task {n}")))
                .await
                .unwrap()
                .task_id,
        );
    }
    cluster.driver.signal(libc::SIGTERM);
    let status = cluster
        .driver
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the driver stops on SIGTERM");
    assert!(status.success(), "{status:?}");
    cluster.driver.restart().await;
    let records = wait_for_audit(&mut cluster.driver().await, "task.submit").await;
    let audited: Vec<String> = records
        .into_iter()
        .filter(|record| record.action == "task.submit" && record.key_id == "alice")
        .map(|record| record.subject)
        .collect();
    assert_eq!(audited, submitted);
}
