//! TLS to the driver, mutual TLS between the services with certificates made by
//! `claudecluster certs init`, and the roles certificates name.

use std::path::Path;

use claudecluster_grpc::ClusterIdentity;
use claudecluster_grpc::tls::{CertificateAuthority, Role, Tls, Validity};
use claudecluster_integration_tests::*;
use claudecluster_proto::v1::scheduler_service_client::SchedulerServiceClient;
use claudecluster_proto::v1::worker_service_client::WorkerServiceClient;
use claudecluster_proto::v1::*;
use tonic::Code;

/// `claudecluster certs init --dir DIR`.
async fn certs_init(dir: &Path) {
    let output = tokio::process::Command::new(claudecluster_bin())
        .args(["certs", "init", "--dir"])
        .arg(dir)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mode = std::fs::metadata(dir.join("worker.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600, "keys are private");
}

#[tokio::test]
async fn a_task_runs_over_tls_with_mutual_tls_between_the_services() {
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path()).await;
    let mut cluster =
        TestCluster::start_with_tls("", &[], Some(certs.path()), vec![WorkerSpec::default()]).await;
    let task = cluster.submit(prompt("hello over tls")).await;
    let (ended, _) = cluster.finish(&task.task_id).await;
    assert_eq!(
        ended.status(),
        TaskStatus::Completed,
        "{}",
        ended.status_reason
    );

    // A client that does not speak TLS gets nowhere.
    let plain = driver_at(&cluster.driver.address)
        .get_cluster_status(GetClusterStatusRequest {})
        .await
        .unwrap_err();
    assert_ne!(plain.code(), Code::Ok);

    // grpcurl with the cluster CA.
    let grpcurl = venv_tool("grpcurl");
    let ca = certs.path().join("ca.pem");
    let output = tokio::process::Command::new(&grpcurl)
        .arg("-cacert")
        .arg(&ca)
        .arg(&cluster.driver.address)
        .arg("claudecluster.v1.DriverService/GetClusterStatus")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains(&cluster.worker_ids[0]));

    // Python grpcio with the cluster CA.
    let generated = tempfile::tempdir().unwrap();
    python_stubs(generated.path()).await;
    let output = tokio::process::Command::new(venv_tool("python"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/client.py"))
        .arg(generated.path())
        .arg(&cluster.driver.address)
        .arg("hello from python over tls")
        .env("CLAUDECLUSTER_CA", &ca)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("final TASK_STATUS_COMPLETED"), "{stdout}");
    cluster.assert_unharmed().await;
}

/// Writes a CA and a certificate for each role into `dir`, as `certs init` does, keeping the
/// CA to issue more.
fn cluster_certificates(dir: &Path) -> CertificateAuthority {
    let ca = CertificateAuthority::new().unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
    for role in Role::ALL {
        let (cert, key) = ca.issue(role, &[], Validity::Standard).unwrap();
        std::fs::write(dir.join(format!("{}.pem", role.name())), cert).unwrap();
        std::fs::write(dir.join(format!("{}.key", role.name())), key).unwrap();
    }
    ca
}

/// What a caller holding `cert` presents: the cluster's secret and that certificate.
fn presenting(cluster: &TestCluster, dir: &Path, cert: (String, String)) -> ClusterIdentity {
    let cert_path = dir.join(format!("{}.pem", uuid::Uuid::new_v4()));
    let key_path = cert_path.with_extension("key");
    std::fs::write(&cert_path, cert.0).unwrap();
    std::fs::write(&key_path, cert.1).unwrap();
    ClusterIdentity {
        secret: cluster.secret(),
        tls: Some(Tls::from_files(&dir.join("ca.pem"), Some(&cert_path), Some(&key_path)).unwrap()),
    }
}

fn role_cert(dir: &Path, role: Role) -> (String, String) {
    (
        std::fs::read_to_string(dir.join(format!("{}.pem", role.name()))).unwrap(),
        std::fs::read_to_string(dir.join(format!("{}.key", role.name()))).unwrap(),
    )
}

async fn register(identity: &ClusterIdentity, scheduler: &str) -> Result<(), tonic::Status> {
    let mut client = SchedulerServiceClient::new(
        claudecluster_grpc::cluster::cluster_channel(scheduler, identity).unwrap(),
    );
    let register = WorkerLinkRequest {
        message: Some(worker_link_request::Message::Register(RegisterWorker {
            worker_id: "rogue".into(),
            address: "127.0.0.1:1".into(),
            execution_mode: ExecutionMode::ProcessPool as i32,
            capacity: 8,
            ..Default::default()
        })),
    };
    let mut link = client
        .worker_link(tokio_stream::iter(vec![register]))
        .await?
        .into_inner();
    link.message().await.map(|_| ())
}

#[tokio::test]
async fn only_certificates_of_the_cluster_ca_naming_the_right_role_get_in() {
    let certs = tempfile::tempdir().unwrap();
    let ca = cluster_certificates(certs.path());
    let mut cluster =
        TestCluster::start_with_tls("", &[], Some(certs.path()), vec![WorkerSpec::default()]).await;
    let dir = certs.path();
    let scheduler = cluster.scheduler.address.clone();

    // A rogue worker: no certificate, one of another CA, an expired one of this CA.
    let no_certificate = ClusterIdentity {
        secret: cluster.secret(),
        tls: Some(Tls::from_files(&dir.join("ca.pem"), None, None).unwrap()),
    };
    let other_ca = CertificateAuthority::new().unwrap();
    let foreign = presenting(
        &cluster,
        dir,
        other_ca
            .issue(Role::Worker, &[], Validity::Standard)
            .unwrap(),
    );
    let expired = presenting(
        &cluster,
        dir,
        ca.issue(Role::Worker, &[], Validity::Expired).unwrap(),
    );
    let self_signed = presenting(
        &cluster,
        dir,
        (other_ca.cert_pem.clone(), other_ca.key_pem.clone()),
    );
    // Without a certificate, the API asks for a role; health answers, for probes.
    let refused = register(&no_certificate, &scheduler).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "only the worker may call this; the caller's certificate names no role"
    );
    let mut health = claudecluster_grpc::tonic_health::pb::health_client::HealthClient::new(
        claudecluster_grpc::channel_with(
            &scheduler,
            no_certificate.tls.as_ref(),
            std::time::Duration::from_secs(30),
            std::time::Duration::from_secs(20),
        )
        .unwrap(),
    );
    assert_eq!(
        health
            .check(claudecluster_grpc::tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
            .status,
        1,
        "SERVING"
    );
    for (identity, case) in [
        (&self_signed, "a self-signed certificate"),
        (&foreign, "another CA's certificate"),
        (&expired, "an expired certificate"),
    ] {
        // The TLS handshake fails: in TLS 1.3 the client learns it as the connection closing.
        let refused = register(identity, &scheduler).await.unwrap_err();
        assert!(
            matches!(
                refused.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{case}: {refused:?}"
        );
    }
    // A valid certificate of another role.
    let as_driver = presenting(&cluster, dir, role_cert(dir, Role::Driver));
    let refused = register(&as_driver, &scheduler).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "only the worker may call this; the caller's certificate names the driver"
    );
    // A worker's certificate does not run tasks on a worker; an admin's reads its status.
    let as_worker = presenting(&cluster, dir, role_cert(dir, Role::Worker));
    let mut worker = WorkerServiceClient::new(
        claudecluster_grpc::cluster::cluster_channel(&cluster.workers[0].address, &as_worker)
            .unwrap(),
    );
    let refused = worker
        .execute_task(ExecuteTaskRequest {
            task_id: "direct".into(),
            attempt: 1,
            spec: Some(prompt("hello")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "only the driver or the admin may call this; the caller's certificate names the worker"
    );
    assert!(cluster.workers[0].log().contains("auth.refused"));
    assert!(
        cluster
            .worker_client(0)
            .get_worker_status(GetWorkerStatusRequest {})
            .await
            .is_ok()
    );

    // Only the cluster's worker is registered, and the cluster runs tasks.
    let workers = cluster
        .scheduler_client()
        .list_workers(ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 1);
    let task = cluster.submit(prompt("hello")).await;
    assert_eq!(
        cluster.finish(&task.task_id).await.0.status(),
        TaskStatus::Completed
    );
    cluster.assert_unharmed().await;
}

/// An MCP client (the official SDK) over HTTPS trusting `CA`: `URL CA`.
const MCP_OVER_TLS: &str = r#"
import asyncio, json, ssl, sys
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

async def main():
    url, ca = sys.argv[1], sys.argv[2]
    trust = ssl.create_default_context(cafile=ca)
    async with httpx2.AsyncClient(verify=trust) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                status = await session.call_tool("cluster_status", {})
                print(json.dumps({"step": "status", "text": status.content[0].text}))

asyncio.run(main())
"#;

#[tokio::test]
async fn the_mcp_server_serves_https_and_reaches_the_driver_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    certs_init(certs.path()).await;
    let cluster =
        TestCluster::start_with_tls("", &[], Some(certs.path()), vec![WorkerSpec::default()]).await;
    let ca = certs.path().join("ca.pem");
    let (mut server, listen) = start_mcp_http(
        &cluster.driver.address,
        &["--ca".as_ref(), ca.as_os_str()],
        &[
            (
                "CLAUDECLUSTER_MCP__TLS__CERT",
                certs.path().join("driver.pem").as_os_str(),
            ),
            (
                "CLAUDECLUSTER_MCP__TLS__KEY",
                certs.path().join("driver.key").as_os_str(),
            ),
        ],
    )
    .await;
    let steps = python_steps(&[
        "-c",
        MCP_OVER_TLS,
        &format!("https://{listen}/mcp"),
        ca.to_str().unwrap(),
    ])
    .await;
    let status = steps["status"]["text"].as_str().unwrap();
    assert!(status.contains(&cluster.worker_ids[0]), "{status}");
    server.kill().await.unwrap();
}
