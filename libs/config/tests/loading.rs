//! Loading real files: the seed's three worker.yaml examples, overrides and bad input.

use std::path::{Path, PathBuf};
use std::time::Duration;

use claudecluster_config::{ConfigError, ExecutionModeSetting, FileLayout, load};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/config")
        .join(name)
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn write(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

#[test]
fn seed_process_pool_example_loads_as_written() {
    let config = load(
        Some(&example("worker-process-pool.yaml")),
        FileLayout::Section("worker"),
        vars(&[]),
    )
    .unwrap();
    let worker = config.worker;
    assert_eq!(worker.execution_mode, ExecutionModeSetting::ProcessPool);
    assert_eq!(worker.process_pool.max_processes, 5);
    assert_eq!(
        worker.process_pool.process_timeout.get(),
        Duration::from_secs(300)
    );
    assert_eq!(
        worker.process_pool.claude_code_path,
        "/usr/local/bin/claude"
    );
    assert_eq!(worker.capacity(), 5);
}

#[test]
fn seed_container_example_loads_as_written() {
    let config = load(
        Some(&example("worker-container-agentic.yaml")),
        FileLayout::Section("worker"),
        vars(&[]),
    )
    .unwrap();
    let container = config.worker.container;
    assert_eq!(
        config.worker.execution_mode,
        ExecutionModeSetting::ContainerAgentic
    );
    assert_eq!(container.image, "claudecluster/agentic-worker:latest");
    assert_eq!(container.registry.as_deref(), Some("docker.io"));
    assert_eq!(container.resource_limits.memory.0, 4_000_000_000);
    assert_eq!(container.resource_limits.cpu, 2.0);
    assert_eq!(
        container.resource_limits.timeout.get(),
        Duration::from_secs(3600)
    );
}

#[test]
fn seed_dual_mode_example_defaults_and_follows_its_variable() {
    let path = example("worker-dual-mode.yaml");
    let default = load(Some(&path), FileLayout::Section("worker"), vars(&[])).unwrap();
    assert_eq!(
        default.worker.execution_mode,
        ExecutionModeSetting::ProcessPool
    );
    assert!(default.worker.feature_flags.enable_container_mode);
    assert!(default.worker.feature_flags.allow_mode_override);
    let switched = load(
        Some(&path),
        FileLayout::Section("worker"),
        vars(&[("EXECUTION_MODE", "container_agentic")]),
    )
    .unwrap();
    assert_eq!(
        switched.worker.execution_mode,
        ExecutionModeSetting::ContainerAgentic
    );
    // Dual mode: the default first, and the other one because the flags allow it.
    assert_eq!(
        default.worker.modes(),
        vec![
            ExecutionModeSetting::ProcessPool,
            ExecutionModeSetting::ContainerAgentic
        ]
    );
    assert_eq!(
        switched.worker.modes(),
        vec![
            ExecutionModeSetting::ContainerAgentic,
            ExecutionModeSetting::ProcessPool
        ]
    );
}

#[test]
fn a_single_mode_worker_runs_its_mode_only() {
    let config = load(
        Some(&example("worker-container-agentic.yaml")),
        FileLayout::Section("worker"),
        vars(&[]),
    )
    .unwrap();
    assert_eq!(
        config.worker.modes(),
        vec![ExecutionModeSetting::ContainerAgentic]
    );
    assert_eq!(config.worker.container.network, "bridge");
}

#[test]
fn a_root_container_user_is_refused() {
    let file = write("container:\n  user: root\n");
    let (key, _, message) =
        invalid(load(Some(file.path()), FileLayout::Section("worker"), vars(&[])).unwrap_err());
    assert_eq!(key, "container.user");
    assert!(message.contains("non-root"), "{message}");
}

#[test]
fn the_dual_mode_cluster_example_loads() {
    let config = load(
        Some(&example("cluster-dual-mode.yaml")),
        FileLayout::Cluster,
        vars(&[]),
    )
    .unwrap();
    assert_eq!(
        config.worker.modes(),
        vec![
            ExecutionModeSetting::ProcessPool,
            ExecutionModeSetting::ContainerAgentic
        ]
    );
    assert_eq!(config.worker.container.resource_limits.memory.0, 2 << 30);
}

#[test]
fn defaults_alone_are_the_embedded_cluster() {
    let config = load(None, FileLayout::Cluster, vars(&[])).unwrap();
    assert_eq!(config.driver.listen, "127.0.0.1:50051");
    assert_eq!(config.scheduler.listen, "127.0.0.1:50052");
    assert_eq!(config.worker.listen, "127.0.0.1:50053");
    assert_eq!(config.worker.capacity(), 4);
}

#[test]
fn environment_overrides_the_file() {
    let file = write("worker:\n  processPool:\n    maxProcesses: 2\n");
    let config = load(
        Some(file.path()),
        FileLayout::Cluster,
        vars(&[
            ("CLAUDECLUSTER_WORKER__PROCESS_POOL__MAX_PROCESSES", "9"),
            ("CLAUDECLUSTER_WORKER__LABELS__ZONE", "eu"),
            ("CLAUDECLUSTER_WORKER__AGENT__ALLOWED_TOOLS", "Write,Bash"),
        ]),
    )
    .unwrap();
    assert_eq!(config.worker.process_pool.max_processes, 9);
    assert_eq!(
        config.worker.labels.get("zone").map(String::as_str),
        Some("eu")
    );
    assert_eq!(config.worker.agent.allowed_tools.0, vec!["Write", "Bash"]);
}

fn invalid(err: ConfigError) -> (String, String, String) {
    match err {
        ConfigError::Invalid {
            key,
            origin,
            message,
        } => (key, origin, message),
        other => panic!("expected an invalid key, got {other}"),
    }
}

#[test]
fn an_unknown_key_is_named_with_its_file() {
    let file = write("executionMode: process_pool\nprocessPool:\n  maxProceses: 3\n");
    let (key, origin, message) =
        invalid(load(Some(file.path()), FileLayout::Section("worker"), vars(&[])).unwrap_err());
    assert_eq!(key, "processPool.maxProceses");
    assert_eq!(origin, format!("file {}", file.path().display()));
    assert!(message.contains("unknown field"), "{message}");
}

#[test]
fn a_bad_value_is_named_with_its_file() {
    let file = write("executionMode: turbo\n");
    let err = load(Some(file.path()), FileLayout::Section("worker"), vars(&[])).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("`executionMode`"), "{text}");
    assert!(text.contains(&file.path().display().to_string()), "{text}");

    let file = write("container:\n  resourceLimits:\n    memory: lots\n");
    let (key, _, message) =
        invalid(load(Some(file.path()), FileLayout::Section("worker"), vars(&[])).unwrap_err());
    assert_eq!(key, "container.resourceLimits.memory");
    assert!(message.contains("lots"), "{message}");
}

#[test]
fn a_value_that_fails_validation_is_named() {
    let file = write("processPool:\n  maxProcesses: 0\n");
    let (key, origin, message) =
        invalid(load(Some(file.path()), FileLayout::Section("worker"), vars(&[])).unwrap_err());
    assert_eq!(key, "processPool.maxProcesses");
    assert!(origin.starts_with("file "), "{origin}");
    assert_eq!(message, "must be at least 1");

    let file = write("container:\n  namespaceIdleTimeout: 0\n");
    let (key, _, message) =
        invalid(load(Some(file.path()), FileLayout::Section("worker"), vars(&[])).unwrap_err());
    assert_eq!(key, "container.namespaceIdleTimeout");
    assert_eq!(message, "must be longer than zero");
}

#[test]
fn a_bad_environment_value_names_the_variable() {
    let (key, origin, _) = invalid(
        load(
            None,
            FileLayout::Cluster,
            vars(&[("CLAUDECLUSTER_WORKER__PROCESS_POOL__MAX_PROCESSES", "many")]),
        )
        .unwrap_err(),
    );
    assert_eq!(key, "worker.processPool.maxProcesses");
    assert_eq!(
        origin,
        "environment variable CLAUDECLUSTER_WORKER__PROCESS_POOL__MAX_PROCESSES"
    );
}

#[test]
fn a_missing_file_and_an_unset_variable_are_reported() {
    let err = load(
        Some(Path::new("/nonexistent/worker.yaml")),
        FileLayout::Section("worker"),
        vars(&[]),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/worker.yaml"),
        "{err}"
    );
    let file = write("executionMode: ${MODE_WITHOUT_DEFAULT}\n");
    let err = load(Some(file.path()), FileLayout::Section("worker"), vars(&[])).unwrap_err();
    assert!(err.to_string().contains("MODE_WITHOUT_DEFAULT"), "{err}");
}

#[test]
fn limits_of_what_tasks_may_ask_are_checked_naming_the_key() {
    let file = write(
        "allowedRepoSchemes: [https, file]\nmaxTaskLimits:\n  memory: 4GiB\n  budgetUsd: 5\n",
    );
    let config = load(Some(file.path()), FileLayout::Section("worker"), vars(&[])).unwrap();
    assert_eq!(config.worker.allowed_repo_schemes.0, ["https", "file"]);
    assert_eq!(config.worker.max_task_limits.memory.0, 4 << 30);
    assert_eq!(config.driver.max_prompt_bytes.0, 512 << 10);
    for (text, key, message) in [
        (
            "allowedRepoSchemes: [https, ftp]\n",
            "allowedRepoSchemes",
            "`ftp` is not a scheme; use https, ssh, http, git, file",
        ),
        (
            "maxTaskLimits:\n  memory: 1GiB\n",
            "container.resourceLimits.memory",
            "must not be more than worker.maxTaskLimits.memory",
        ),
        (
            "workerId: ../escape\n",
            "workerId",
            "must be 1 to 128 letters, digits, '-', '_' or '.'",
        ),
    ] {
        let file = write(text);
        let err = load(Some(file.path()), FileLayout::Section("worker"), vars(&[])).unwrap_err();
        let (found_key, _, found_message) = invalid(err);
        assert_eq!(
            (found_key.as_str(), found_message.as_str()),
            (key, message),
            "{text}"
        );
    }
    let err = load(
        None,
        FileLayout::Cluster,
        vars(&[("CLAUDECLUSTER_DRIVER__MAX_PROMPT_BYTES", "2MiB")]),
    )
    .unwrap_err();
    let (key, origin, message) = invalid(err);
    assert_eq!(key, "driver.maxPromptBytes");
    assert_eq!(
        origin,
        "environment variable CLAUDECLUSTER_DRIVER__MAX_PROMPT_BYTES"
    );
    assert!(
        message.starts_with("must be from 1 byte to 1MiB"),
        "{message}"
    );
}

#[test]
fn a_service_file_may_hold_the_process_telemetry_beside_its_keys() {
    let file = write(
        "listen: 127.0.0.1:0\ntelemetry:\n  logFormat: json\n  metricsListen: 127.0.0.1:9464\nbudget:\n  usdPerDay: 5\n  whenSpent: stop\n",
    );
    let config = load(Some(file.path()), FileLayout::Section("driver"), vars(&[])).unwrap();
    assert_eq!(
        config.telemetry.log_format,
        claudecluster_config::LogFormat::Json
    );
    assert_eq!(
        config.telemetry.metrics_listen.as_deref(),
        Some("127.0.0.1:9464")
    );
    assert_eq!(config.driver.budget.usd_per_day, 5.0);
    assert_eq!(
        config.driver.budget.when_spent,
        claudecluster_config::WhenSpent::Stop
    );
    // The standard variable form works too, and a bad value names its key.
    let config = load(
        None,
        FileLayout::Section("worker"),
        vars(&[(
            "CLAUDECLUSTER_TELEMETRY__OTLP_ENDPOINT",
            "http://collector:4317",
        )]),
    )
    .unwrap();
    assert_eq!(
        config.telemetry.otlp_endpoint.as_deref(),
        Some("http://collector:4317")
    );
    let bad = write("telemetry:\n  logFormat: yaml\n");
    let err = load(Some(bad.path()), FileLayout::Section("worker"), vars(&[])).unwrap_err();
    assert!(err.to_string().contains("telemetry.logFormat"), "{err}");
}

#[test]
fn the_kubernetes_orchestrator_is_taken_and_others_are_named() {
    let file = write(
        "executionMode: container_agentic\ncontainer:\n  orchestrator: kubernetes\nkubernetes:\n  namespace: agents\n  startTimeout: 2m\n",
    );
    let config = load(Some(file.path()), FileLayout::Section("worker"), vars(&[])).unwrap();
    assert_eq!(config.worker.container.orchestrator, "kubernetes");
    assert_eq!(
        config.worker.kubernetes.namespace.as_deref(),
        Some("agents")
    );
    assert_eq!(
        config.worker.kubernetes.start_timeout.get(),
        Duration::from_secs(120)
    );
    let bad = write("container:\n  orchestrator: nomad\n");
    let err = load(Some(bad.path()), FileLayout::Section("worker"), vars(&[])).unwrap_err();
    assert!(
        err.to_string().contains("container.orchestrator")
            && err.to_string().contains("`docker` or `kubernetes`"),
        "{err}"
    );
}

#[test]
fn the_driver_serves_http_on_3000_unless_moved_or_turned_off() {
    let config = load(None, FileLayout::Cluster, vars(&[])).unwrap();
    assert_eq!(config.driver.http.listen(), Some("127.0.0.1:3000"));
    assert_eq!(
        config.driver.http.stats_interval.get(),
        std::time::Duration::from_secs(2)
    );
    let file = write("listen: 127.0.0.1:0\nhttp:\n  listen: \"\"\n");
    let config = load(Some(file.path()), FileLayout::Section("driver"), vars(&[])).unwrap();
    assert_eq!(
        config.driver.http.listen(),
        None,
        "an empty address turns it off"
    );
    let config = load(
        None,
        FileLayout::Cluster,
        vars(&[("CLAUDECLUSTER_DRIVER__HTTP__LISTEN", "0.0.0.0:8080")]),
    )
    .unwrap();
    assert_eq!(config.driver.http.listen(), Some("0.0.0.0:8080"));
    let file = write("http:\n  listen: port-3000\n");
    let err = load(Some(file.path()), FileLayout::Section("driver"), vars(&[])).unwrap_err();
    let (key, origin, message) = invalid(err);
    assert_eq!(key, "http.listen", "as written in the driver's own file");
    assert_eq!(origin, format!("file {}", file.path().display()));
    assert!(message.contains("host:port"), "{message}");
}
