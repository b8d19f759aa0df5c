//! The API from outside Rust: grpcurl through server reflection, and a Python client generated
//! with grpcio-tools from the project's protos.

use std::path::Path;
use std::process::Output;

use claudecluster_integration_tests::*;

/// Runs a tool without blocking the runtime that serves the stand-in API.
async fn run(program: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", program.display()))
}

async fn stdout_of(program: &Path, args: &[&str]) -> String {
    let output = run(program, args).await;
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}\n{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn grpcurl_lists_checks_health_submits_and_streams() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let grpcurl = venv_tool("grpcurl");
    let version = run(&grpcurl, &["-version"]).await;
    assert!(
        String::from_utf8_lossy(&version.stderr).contains("1.8.6"),
        "grpcurl 1.8.6 speaks only reflection v1alpha"
    );

    // Every service answers reflection and health with nothing but its address.
    for (address, service) in [
        (&cluster.driver.address, "claudecluster.v1.DriverService"),
        (
            &cluster.scheduler.address,
            "claudecluster.v1.SchedulerService",
        ),
        (
            &cluster.workers[0].address,
            "claudecluster.v1.WorkerService",
        ),
    ] {
        let services = stdout_of(&grpcurl, &["-plaintext", address, "list"]).await;
        let mut listed: Vec<&str> = services.lines().collect();
        listed.sort();
        let mut expected = vec![
            service,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        expected.sort();
        assert_eq!(
            listed, expected,
            "{address} advertises exactly what it serves"
        );
        let health = stdout_of(
            &grpcurl,
            &[
                "-plaintext",
                "-d",
                &format!(r#"{{"service":"{service}"}}"#),
                address,
                "grpc.health.v1.Health/Check",
            ],
        )
        .await;
        assert!(health.contains("SERVING"), "{health}");
    }
    let described = stdout_of(
        &grpcurl,
        &[
            "-plaintext",
            &cluster.driver.address,
            "describe",
            "claudecluster.v1.DriverService",
        ],
    )
    .await;
    assert!(described.contains("rpc StreamTaskEvents"), "{described}");

    let submitted = stdout_of(
        &grpcurl,
        &[
            "-plaintext",
            "-d",
            r#"{"spec": {"prompt": "hello from grpcurl"}}"#,
            &cluster.driver.address,
            "claudecluster.v1.DriverService/SubmitTask",
        ],
    )
    .await;
    let submitted: serde_json::Value = serde_json::from_str(&submitted).unwrap();
    let task_id = submitted["task"]["taskId"]
        .as_str()
        .expect("a task id")
        .to_owned();
    assert_eq!(submitted["task"]["status"], "TASK_STATUS_PENDING");

    // The stream ends by itself after the terminal status.
    let streamed = stdout_of(
        &grpcurl,
        &[
            "-plaintext",
            "-d",
            &format!(r#"{{"task_id": "{task_id}"}}"#),
            &cluster.driver.address,
            "claudecluster.v1.DriverService/StreamTaskEvents",
        ],
    )
    .await;
    assert!(
        streamed.contains(r#""text": "MOCK_REPLY turn=1: hello from grpcurl""#),
        "{streamed}"
    );
    assert!(streamed.contains("TASK_STATUS_COMPLETED"), "{streamed}");

    let missing = run(
        &grpcurl,
        &[
            "-plaintext",
            "-d",
            r#"{"task_id": "nope"}"#,
            &cluster.driver.address,
            "claudecluster.v1.DriverService/GetTask",
        ],
    )
    .await;
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("NotFound"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

#[tokio::test]
async fn a_python_client_generated_from_the_protos_submits_and_streams() {
    let cluster = TestCluster::start(vec![WorkerSpec::default()]).await;
    let python = venv_tool("python");
    let generated = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = generated.path().to_str().unwrap();
    python_stubs(generated.path()).await;

    let script = root.join("integration-tests/python/client.py");
    let output = stdout_of(
        &python,
        &[
            script.to_str().unwrap(),
            out,
            &cluster.driver.address,
            "hello from python",
        ],
    )
    .await;
    let lines: Vec<&str> = output.lines().collect();
    assert!(lines[0].starts_with("submitted "), "{output}");
    assert!(lines.contains(&"1 status TASK_STATUS_PENDING"), "{output}");
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("text MOCK_REPLY turn=1: hello from python")),
        "{output}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("status TASK_STATUS_COMPLETED")),
        "{output}"
    );
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("final TASK_STATUS_COMPLETED cost 0.0"),
        "{output}"
    );
}
