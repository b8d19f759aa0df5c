//! The worker's credential proxy: agents hold a token of their own, never the real key; the
//! upstream (the stand-in API) sees only the real key; a finished run's token is refused; a
//! rate-limited credential is set aside.

use std::time::Duration;

use claudecluster_integration_tests::*;
use claudecluster_proto::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REAL_KEY: &str = "sk-ant-standin-secret";

/// The HTTP status the proxy at `base_url` answers a Messages request presenting `token`.
async fn status_for(base_url: &str, token: &str) -> u16 {
    let address = base_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let body = r#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: {address}\r\nx-api-key: {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"))
}

/// What the agent sees as its key and base URL, through a Bash call.
fn print_credentials() -> TaskSpec {
    with_tools(
        "BASH echo $ANTHROPIC_API_KEY $ANTHROPIC_BASE_URL ${ANTHROPIC_AUTH_TOKEN:-none}",
        &["Bash"],
    )
}

async fn agent_credentials(cluster: &TestCluster) -> (String, String, Vec<Event>) {
    let task = cluster.submit(print_credentials()).await;
    let (ended, events) = cluster.finish(&task.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    let text = ended.result.unwrap().text;
    let mut words = text.trim_start_matches("MOCK_DONE ").split_whitespace();
    let token = words.next().unwrap().to_owned();
    let base_url = words.next().unwrap().to_owned();
    assert_eq!(words.next(), Some("none"), "no auth token either: {text}");
    (token, base_url, events)
}

/// Everything written under `dir`, as text.
fn files_under(dir: &std::path::Path) -> String {
    let mut text = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return text;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            text.push_str(&files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            text.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    text
}

async fn proxy_holds_the_key(mode: Mode) {
    let mut cluster = TestCluster::start(vec![WorkerSpec::in_mode(mode)]).await;
    let (token, base_url, events) = agent_credentials(&cluster).await;
    assert!(token.starts_with("cct_"), "{token}");
    assert_ne!(
        base_url,
        cluster.api.base_url(),
        "the agent talks to the proxy"
    );
    // The stand-in saw only the real key, on every request.
    let requests = cluster.api.requests();
    assert!(!requests.is_empty());
    assert!(
        requests
            .iter()
            .all(|request| request.api_key.as_deref() == Some(REAL_KEY)),
        "{:?}",
        requests.iter().map(|r| &r.api_key).collect::<Vec<_>>()
    );
    // Neither events, any service's log, nor any file the agent left holds the real key.
    let mut everything = format!("{events:?}");
    everything.push_str(&files_under(&cluster.workspaces(&cluster.worker_ids[0])));
    everything.push_str(&cluster.driver.log());
    everything.push_str(&cluster.workers[0].log());
    assert!(!everything.contains(REAL_KEY));
    // The finished run's token is refused; a token nobody granted too. (A container reached
    // the proxy at its network's gateway, gone with it; the proxy also listens on loopback.)
    let port = base_url.rsplit(':').next().unwrap();
    let base_url = format!("http://127.0.0.1:{port}");
    assert_eq!(status_for(&base_url, &token).await, 401);
    assert_eq!(status_for(&base_url, "cct_made_up").await, 401);
    assert_eq!(status_for(&base_url, REAL_KEY).await, 401);
    cluster.assert_unharmed().await;
}

#[tokio::test]
async fn a_process_agent_holds_only_its_own_token() {
    proxy_holds_the_key(Mode::ProcessPool).await;
}

#[tokio::test]
async fn a_container_agent_holds_only_its_own_token() {
    proxy_holds_the_key(Mode::Container).await;
}

#[tokio::test]
async fn a_rate_limited_credential_is_set_aside_and_tasks_complete_on_the_next() {
    let worker = WorkerSpec {
        extra_yaml:
            "credentialProxy:\n  apiKeys: [sk-ant-limited, sk-ant-second]\n  coolDown: 60\n".into(),
        ..WorkerSpec::default()
    };
    let cluster = TestCluster::start(vec![worker]).await;
    cluster.api.rate_limit("sk-ant-limited");
    for round in 0..3 {
        let task = cluster.submit(prompt(&format!("hello {round}"))).await;
        let (ended, _) =
            tokio::time::timeout(Duration::from_secs(60), cluster.finish(&task.task_id))
                .await
                .unwrap();
        assert_eq!(
            ended.status(),
            TaskStatus::Completed,
            "{}",
            ended.status_reason
        );
    }
    let keys: Vec<_> = cluster
        .api
        .requests()
        .into_iter()
        .filter_map(|request| request.api_key)
        .collect();
    assert!(keys.iter().any(|key| key == "sk-ant-second"), "{keys:?}");
    // Set aside after its first 429, the limited key was tried once.
    assert_eq!(
        keys.iter().filter(|key| *key == "sk-ant-limited").count(),
        1,
        "{keys:?}"
    );
}

#[tokio::test]
async fn the_proxy_counts_what_a_run_spends_and_holds_it_to_its_budget() {
    // A dollar per thousand tokens: the stand-in's 120 tokens an answer cost $0.12.
    let worker = WorkerSpec {
        extra_yaml: "credentialProxy:\n  prices:\n    default: {input: 1000, output: 1000}\n"
            .into(),
        ..WorkerSpec::default()
    };
    let mut cluster = TestCluster::start(vec![worker]).await;

    let counted = cluster.submit(prompt("hello")).await;
    let (ended, _) = cluster.finish(&counted.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    let requests = cluster.api.requests().len() as u64;
    let usage = ended
        .metered_usage
        .expect("the proxy's count is on the task");
    assert_eq!(usage.input_tokens, 100 * requests, "{usage:?}");
    assert!(usage.output_tokens > 0, "{usage:?}");
    let expected = (usage.input_tokens + usage.output_tokens) as f64 / 1000.0;
    assert!(
        (ended.metered_cost_usd - expected).abs() < 1e-9,
        "{} against {expected}",
        ended.metered_cost_usd
    );

    // A tool call takes two answers; the budget is spent after the first.
    let budgeted = cluster
        .submit(TaskSpec {
            agent: Some(AgentOptions {
                allowed_tools: vec!["Bash".into()],
                max_budget_usd: 0.05,
                ..Default::default()
            }),
            ..prompt("BASH echo hi")
        })
        .await;
    let (ended, _) = cluster.finish(&budgeted.task_id).await;
    assert_eq!(ended.status(), TaskStatus::Failed);
    assert!(
        ended
            .status_reason
            .contains("the task's budget of $0.05 (agent.max_budget_usd) is spent"),
        "{}",
        ended.status_reason
    );
    assert!(ended.metered_cost_usd >= 0.05, "{}", ended.metered_cost_usd);
    cluster.assert_unharmed().await;
}

/// The pinned CLI where any user can run it: the cache under root's home is closed to others.
fn cli_for_everyone() -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::path::Path::new("/var/tmp/claudecluster-cli");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cli = dir.join("claude");
    let source = std::fs::canonicalize(claude_bin()).unwrap();
    let same = std::fs::metadata(&cli)
        .ok()
        .zip(std::fs::metadata(&source).ok())
        .is_some_and(|(a, b)| a.len() == b.len());
    if !same {
        let partial = dir.join(format!("claude.{}", std::process::id()));
        if std::fs::hard_link(&source, &partial).is_err() {
            std::fs::copy(&source, &partial).unwrap();
        }
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&partial, &cli).unwrap();
    }
    cli
}

#[tokio::test]
async fn process_agents_of_their_own_uids_read_neither_each_other_nor_the_worker() {
    use std::os::unix::fs::PermissionsExt;
    let mut cluster = TestCluster::start(vec![]).await;
    // Agents of other uids must reach their workspaces under the test's directory.
    std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    cluster
        .add_worker(WorkerSpec {
            claude_path: Some(cli_for_everyone()),
            pool_yaml: "  runAs: {uid: 23000, count: 8}\n".into(),
            ..WorkerSpec::default()
        })
        .await;
    let _ = &mut cluster;
    cluster.wait_for_healthy_workers(1).await;
    let gate = cluster.dir.path().join("gate");
    let holding = cluster
        .submit(with_tools(
            &format!(
                "BASH while [ ! -e {} ]; do sleep 0.05; done; echo done",
                gate.display()
            ),
            &["Bash"],
        ))
        .await;
    cluster.wait_for_agent(&holding.task_id).await;
    let pid = cluster
        .task(&holding.task_id)
        .await
        .runner
        .strip_prefix("process ")
        .unwrap()
        .to_owned();
    let secret = cluster.dir.path().join("data/claudecluster/cluster-secret");
    let probe = cluster
        .submit(with_tools(
            &format!(
                "BASH echo $(cat /proc/{pid}/environ >/dev/null 2>&1 && echo read-env || echo no-env) $(cat {} >/dev/null 2>&1 && echo read-secret || echo no-secret) $(id -u)",
                secret.display()
            ),
            &["Bash"],
        ))
        .await;
    let (ended, _) = cluster.finish(&probe.task_id).await;
    std::fs::write(&gate, "").unwrap();
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );
    let text = ended.result.unwrap().text;
    let words: Vec<&str> = text.trim_start_matches("MOCK_DONE ").split(' ').collect();
    assert_eq!(&words[..2], ["no-env", "no-secret"], "{text}");
    let uid: u32 = words[2].parse().unwrap();
    assert!((23_000..23_008).contains(&uid), "{text}");
    let (held, _) = cluster.finish(&holding.task_id).await;
    assert_eq!(
        held.status(),
        TaskStatus::Completed,
        "{}",
        held.status_reason
    );
}

/// What an agent of `cluster` finds trying to reach `port` on `host` (a shell word, evaluated
/// in the agent's Bash): `reached` or `unreachable`.
async fn reach_from_agent(cluster: &TestCluster, host: &str, port: u16) -> String {
    cluster
        .completed_text(with_tools(
            &format!(
                "BASH timeout 3 bash -c \"echo > /dev/tcp/{host}/{port}\" 2>/dev/null && echo reached || echo unreachable"
            ),
            &["Bash"],
        ))
        .await
        .trim_start_matches("MOCK_DONE ")
        .to_owned()
}

/// The host's IPv4 addresses, loopback among them.
async fn host_addresses() -> Vec<String> {
    let output = tokio::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .await
        .expect("run ip");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|word| *word == "inet")?;
            Some(words.get(at + 1)?.split('/').next()?.to_owned())
        })
        .collect()
}

/// The address the agent reaches the worker's proxy at: the host, as the agent sees it.
const PROXY_HOST: &str = "$(h=${ANTHROPIC_BASE_URL#http://}; echo ${h%:*})";

#[tokio::test]
async fn a_container_with_proxy_only_egress_reaches_the_api_and_nothing_else() {
    // A server on every address of the host.
    let server = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    let accepting = tokio::spawn(async move {
        while let Ok((connection, _)) = server.accept().await {
            drop(connection);
        }
    });

    let open = TestCluster::start(vec![WorkerSpec {
        network: "per_task".into(),
        container_yaml: "  egress: open\n".into(),
        ..WorkerSpec::in_mode(Mode::Container)
    }])
    .await;
    assert_eq!(
        reach_from_agent(&open, PROXY_HOST, port).await,
        "reached",
        "with open egress the host's server is reachable: the probe can tell"
    );

    // The default: the agent completes through the proxy (each probe is a completed task), and
    // reaches neither the host's server, at any of the host's addresses, nor the API itself.
    let sealed = TestCluster::start(vec![WorkerSpec::in_mode(Mode::Container)]).await;
    let addresses = host_addresses().await;
    assert!(
        addresses.iter().any(|address| address != "127.0.0.1"),
        "the host has an address besides loopback to probe: {addresses:?}"
    );
    let reached = sealed
        .completed_text(with_tools(
            &format!(
                "BASH for a in {}; do timeout 3 bash -c \"echo > /dev/tcp/$a/{port}\" 2>/dev/null && echo -n \"$a \"; done; echo probed",
                addresses.join(" ")
            ),
            &["Bash"],
        ))
        .await;
    assert_eq!(
        reached, "MOCK_DONE probed",
        "the host's server at {addresses:?}"
    );
    assert_eq!(
        reach_from_agent(&sealed, "127.0.0.1", sealed.api.address().port()).await,
        "unreachable",
        "the API only through the proxy"
    );
    // The same in a network namespace the worker keeps for its agents (made after the first),
    // once the last probe's container is gone, which frees the namespace it used: the worker
    // gives it back as soon as Docker has removed the container, well before the next probe
    // reaches it through the driver and the scheduler.
    let worker_id = &sealed.worker_ids[0];
    claudecluster_integration_tests::docker::assert_agent_containers_removed(&format!(
        "claudecluster.worker={worker_id}"
    ))
    .await;
    wait_until(Duration::from_secs(30), || async {
        !claudecluster_integration_tests::docker::network_holders(worker_id)
            .await
            .is_empty()
    })
    .await
    .expect("the worker keeps a network namespace after its first agent");
    let probe = sealed
        .submit(with_tools(
            &format!(
                "BASH for a in {}; do timeout 3 bash -c \"echo > /dev/tcp/$a/{port}\" 2>/dev/null && echo -n \"$a \"; done; echo probed",
                addresses.join(" ")
            ),
            &["Bash"],
        ))
        .await;
    let (ended, events) = sealed.finish(&probe.task_id).await;
    assert_eq!(
        ended.result.unwrap().text,
        "MOCK_DONE probed",
        "from a kept namespace"
    );
    assert!(
        events.iter().any(|event| matches!(&event.kind,
            Some(event::Kind::StatusChange(change)) if change.status() == TaskStatus::Running
                && change.reason.contains("in the namespace of claudecluster-netns-"))),
        "the probe ran in a kept namespace: {events:?}"
    );
    // Its agents come through the socket, so the proxy's port stays on loopback; agents off
    // the host's network with open egress need it on the host's other addresses.
    let proxy_address = |cluster: &TestCluster| {
        let log = cluster.workers[0].log();
        assert!(
            !log.contains('\x1b'),
            "colours in a log that is no terminal"
        );
        log.lines()
            .find(|line| line.contains("credential proxy listening") && !line.contains("socket"))
            .and_then(|line| line.split("address=").nth(1))
            .map(|rest| rest.split(':').next().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("the worker logs where its proxy listens: {log}"))
    };
    assert_eq!(proxy_address(&sealed), "127.0.0.1");
    assert_eq!(proxy_address(&open), "0.0.0.0");
    accepting.abort();
}

/// The status line the proxy answers a tunnel to `target` with, asked from inside an agent.
fn tunnel_probe(target: &str) -> TaskSpec {
    with_tools(
        &format!(
            "BASH h=${{ANTHROPIC_BASE_URL#http://}}; exec 3<>/dev/tcp/${{h%:*}}/${{h#*:}}; printf \"CONNECT {target} HTTP/1.1\\r\\nHost: {target}\\r\\nProxy-Authorization: Bearer $ANTHROPIC_API_KEY\\r\\n\\r\\n\" >&3; head -n1 <&3 | tr -d '\\r'"
        ),
        &["Bash"],
    )
}

#[tokio::test]
async fn a_container_tunnels_through_the_proxy_to_allowed_hosts_only() {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    let (reached_tx, mut reached) = tokio::sync::mpsc::channel::<()>(4);
    let accepting = tokio::spawn(async move {
        while let Ok((connection, _)) = server.accept().await {
            let _ = reached_tx.send(()).await;
            drop(connection);
        }
    });
    let cluster = TestCluster::start(vec![WorkerSpec {
        container_yaml: "  egressAllow: [localhost]\n".into(),
        ..WorkerSpec::in_mode(Mode::Container)
    }])
    .await;
    assert_eq!(
        cluster
            .completed_text(tunnel_probe(&format!("localhost:{port}")))
            .await,
        "MOCK_DONE HTTP/1.1 200 OK"
    );
    tokio::time::timeout(Duration::from_secs(10), reached.recv())
        .await
        .expect("the tunnel reached the allowed host")
        .unwrap();
    assert_eq!(
        cluster
            .completed_text(tunnel_probe(&format!("127.0.0.1:{port}")))
            .await,
        "MOCK_DONE HTTP/1.1 403 Forbidden"
    );
    accepting.abort();
}
