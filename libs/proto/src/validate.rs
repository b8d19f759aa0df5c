//! Checks on what clients ask for, shared by the driver (which refuses a bad request before
//! storing it) and the worker (which checks again what reaches it, from a driver or not). Each
//! refusal names the field.
//!
//! The bounds keep any task record, whole, well inside one message between services
//! ([`MAX_MESSAGE_BYTES`]): a prompt of `driver.maxPromptBytes` (at most 1 MiB), a result of
//! `worker.agent.maxLineBytes` (at most 2 MiB) and every other field at its bound add up to
//! less than 4 MiB.

use crate::v1::{AgentOptions, ExecutionMode, Priority, ResourceLimits, SessionSpec, TaskSpec};

/// The largest message any service or client sends or accepts: gRPC's own default, which
/// grpcurl and grpcio clients also use, so that everything one service can send, every client
/// can read.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Prompts and session messages the driver takes when `driver.maxPromptBytes` is not set.
pub const DEFAULT_MAX_PROMPT_BYTES: usize = 512 << 10;
/// The most `driver.maxPromptBytes` may be.
pub const PROMPT_BYTES_CEILING: usize = 1 << 20;
/// `agent.append_system_prompt`.
pub const MAX_SYSTEM_PROMPT_BYTES: usize = 64 << 10;
/// Entries of `labels` and of `worker_selector`.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_NAME_BYTES: usize = 128;
pub const MAX_LABEL_VALUE_BYTES: usize = 1024;
/// Variables in `environment`, and their names and values together.
pub const MAX_ENVIRONMENT_VARIABLES: usize = 256;
pub const MAX_ENVIRONMENT_BYTES: usize = 64 << 10;
/// Entries of `allowed_tools` and of `disallowed_tools`, and the length of each.
pub const MAX_TOOLS: usize = 256;
/// A model, permission mode, tool name or idempotency key.
pub const MAX_NAME_BYTES: usize = 256;
pub const MAX_REPO_URL_BYTES: usize = 4096;
/// Entries of `depends_on`.
pub const MAX_DEPENDENCIES: usize = 1000;
/// Task and session ids, and batch keys: they become directory, container and volume names.
pub const MAX_ID_BYTES: usize = 128;
/// Below these an agent cannot start; zero still means the worker's default.
pub const MIN_MEMORY_BYTES: u64 = 6 << 20;
pub const MIN_CPUS: f64 = 0.01;
pub const MIN_PIDS: u32 = 16;

/// The most of a message a status carries: it travels in an HTTP/2 trailer, whose size peers
/// cap (hyper at 16 KiB for all of a response's headers), so a message echoing a huge input
/// would turn a clear error into a broken stream.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 4096;

/// `message` cut to [`MAX_STATUS_MESSAGE_BYTES`] on a character boundary, saying so.
pub fn status_message(mut message: String) -> String {
    const MARKER: &str = "… (cut)";
    if message.len() > MAX_STATUS_MESSAGE_BYTES {
        let mut end = MAX_STATUS_MESSAGE_BYTES - MARKER.len();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str(MARKER);
    }
    message
}

/// The CLI's permission modes (2.1.328), plus `default`.
pub const PERMISSION_MODES: &[&str] = &[
    "default",
    "acceptEdits",
    "auto",
    "bypassPermissions",
    "manual",
    "dontAsk",
    "plan",
];

/// A refused field and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn invalid<T>(field: &'static str, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        field,
        message: message.into(),
    })
}

/// Checks a task's spec; `max_prompt_bytes` is the driver's `driver.maxPromptBytes` (a worker
/// passes [`PROMPT_BYTES_CEILING`]).
pub fn task_spec(spec: &TaskSpec, max_prompt_bytes: usize) -> Result<(), Invalid> {
    prompt("spec.prompt", &spec.prompt, max_prompt_bytes)?;
    if !spec.repo_url.is_empty() {
        repo_url(&spec.repo_url).or_else(|message| invalid("spec.repo_url", message))?;
    }
    if ExecutionMode::try_from(spec.execution_mode).is_err() {
        return invalid(
            "spec.execution_mode",
            format!("{} is not an execution mode", spec.execution_mode),
        );
    }
    if Priority::try_from(spec.priority).is_err() {
        return invalid(
            "spec.priority",
            format!("{} is not a priority", spec.priority),
        );
    }
    labels("spec.worker_selector", &spec.worker_selector)?;
    labels("spec.labels", &spec.labels)?;
    if let Some(limits) = &spec.limits {
        resource_limits(limits)?;
    }
    if let Some(agent) = &spec.agent {
        agent_options(agent)?;
    }
    environment(&spec.environment)?;
    name("spec.idempotency_key", &spec.idempotency_key)?;
    if spec.depends_on.len() > MAX_DEPENDENCIES {
        return invalid(
            "spec.depends_on",
            format!(
                "has {} entries; at most {MAX_DEPENDENCIES} are accepted",
                spec.depends_on.len()
            ),
        );
    }
    if let Some(id) = spec.depends_on.iter().find(|id| id.len() > MAX_ID_BYTES) {
        return invalid(
            "spec.depends_on",
            format!(
                "an entry of {} bytes is longer than any id ({MAX_ID_BYTES})",
                id.len()
            ),
        );
    }
    if let Some(result) = &spec.result {
        result_spec(result, !spec.repo_url.is_empty())?;
    }
    Ok(())
}

/// The longest branch name or template taken.
const MAX_BRANCH_BYTES: usize = 200;

/// Checks what a task asks of its result: a branch needs a repository, a pull request needs a
/// branch, and names follow git's rules for branch names (`git check-ref-format --branch`).
fn result_spec(result: &crate::v1::ResultSpec, has_repository: bool) -> Result<(), Invalid> {
    if result.branch.is_empty() {
        if result.pull_request || !result.pull_request_base.is_empty() {
            return invalid(
                "spec.result.branch",
                "is empty; a pull request is opened from a branch",
            );
        }
        return Ok(());
    }
    if !has_repository {
        return invalid(
            "spec.result.branch",
            "needs spec.repo_url: the branch is pushed to the task's repository",
        );
    }
    // The placeholders are filled with ids, which are valid in branch names.
    let filled = result
        .branch
        .replace("{task_id}", "t")
        .replace("{attempt}", "1");
    branch_name(&filled).or_else(|message| {
        invalid(
            "spec.result.branch",
            format!("`{}` {message}", result.branch),
        )
    })?;
    if !result.pull_request_base.is_empty() {
        branch_name(&result.pull_request_base).or_else(|message| {
            invalid(
                "spec.result.pull_request_base",
                format!("`{}` {message}", result.pull_request_base),
            )
        })?;
    }
    if result.commit_message.len() > MAX_SYSTEM_PROMPT_BYTES {
        return invalid(
            "spec.result.commit_message",
            format!(
                "is {} bytes; at most {MAX_SYSTEM_PROMPT_BYTES} are accepted",
                result.commit_message.len()
            ),
        );
    }
    Ok(())
}

/// Why `name` is not a branch name git takes, if it is not.
pub fn branch_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_BRANCH_BYTES {
        return Err(format!("must be 1 to {MAX_BRANCH_BYTES} bytes"));
    }
    let bad_char = name
        .chars()
        .find(|c| c.is_ascii_control() || " ~^:?*[\\".contains(*c));
    if let Some(c) = bad_char {
        return Err(format!("may not hold {c:?}"));
    }
    let broken = name.starts_with('-')
        || name.starts_with('/')
        || name.ends_with('/')
        || name.ends_with('.')
        || name.contains("..")
        || name.contains("//")
        || name.contains("@{")
        || name == "@"
        || name
            .split('/')
            .any(|part| part.starts_with('.') || part.ends_with(".lock"));
    if broken {
        return Err("is not a branch name git takes (see `git check-ref-format`)".into());
    }
    Ok(())
}

/// Checks a session's spec.
pub fn session_spec(spec: &SessionSpec) -> Result<(), Invalid> {
    if !spec.repo_url.is_empty() {
        repo_url(&spec.repo_url).or_else(|message| invalid("spec.repo_url", message))?;
    }
    labels("spec.worker_selector", &spec.worker_selector)?;
    labels("spec.labels", &spec.labels)?;
    if let Some(limits) = &spec.limits {
        resource_limits(limits)?;
    }
    if let Some(agent) = &spec.agent {
        agent_options(agent)?;
    }
    Ok(())
}

/// A prompt or a session message: not empty, within `max_bytes`, no NUL (which no process
/// argument or JSON consumer takes whole).
pub fn prompt(field: &'static str, text: &str, max_bytes: usize) -> Result<(), Invalid> {
    if text.trim().is_empty() {
        return invalid(field, "must not be empty");
    }
    if text.len() > max_bytes {
        return invalid(
            field,
            format!(
                "is {} bytes; at most {max_bytes} are accepted (driver.maxPromptBytes)",
                text.len()
            ),
        );
    }
    if text.contains('\0') {
        return invalid(field, "must not contain NUL characters");
    }
    Ok(())
}

fn name(field: &'static str, value: &str) -> Result<(), Invalid> {
    if value.len() > MAX_NAME_BYTES {
        return invalid(
            field,
            format!(
                "is {} bytes; at most {MAX_NAME_BYTES} are accepted",
                value.len()
            ),
        );
    }
    if value.chars().any(char::is_control) {
        return invalid(field, "must not contain control characters");
    }
    Ok(())
}

/// Checks a map of labels (a task's, a selector, a worker's): at most [`MAX_LABELS`] entries of
/// bounded size, names not empty, no control characters.
pub fn labels(
    field: &'static str,
    labels: &std::collections::HashMap<String, String>,
) -> Result<(), Invalid> {
    if labels.len() > MAX_LABELS {
        return invalid(
            field,
            format!(
                "has {} entries; at most {MAX_LABELS} are accepted",
                labels.len()
            ),
        );
    }
    for (key, value) in labels {
        if key.trim().is_empty() {
            return invalid(field, "label names must not be empty");
        }
        if key.len() > MAX_LABEL_NAME_BYTES || value.len() > MAX_LABEL_VALUE_BYTES {
            return invalid(
                field,
                format!(
                    "label names may have {MAX_LABEL_NAME_BYTES} bytes and values {MAX_LABEL_VALUE_BYTES}"
                ),
            );
        }
        if key.chars().chain(value.chars()).any(char::is_control) {
            return invalid(field, "labels must not contain control characters");
        }
    }
    Ok(())
}

/// The worker's own variables stay the worker's: a task that could set `ANTHROPIC_BASE_URL`
/// could send the worker's key anywhere.
fn environment(variables: &std::collections::HashMap<String, String>) -> Result<(), Invalid> {
    let field = "spec.environment";
    if variables.len() > MAX_ENVIRONMENT_VARIABLES {
        return invalid(
            field,
            format!(
                "has {} variables; at most {MAX_ENVIRONMENT_VARIABLES} are accepted",
                variables.len()
            ),
        );
    }
    let total: usize = variables.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_ENVIRONMENT_BYTES {
        return invalid(
            field,
            format!("holds {total} bytes; at most {MAX_ENVIRONMENT_BYTES} are accepted"),
        );
    }
    for (name, value) in variables {
        let valid_name = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_uppercase() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !valid_name {
            let shown: String = name.chars().take(64).collect();
            return invalid(
                field,
                format!(
                    "`{}` is not a variable name of the form [A-Z_][A-Z0-9_]*",
                    shown.escape_debug()
                ),
            );
        }
        if let Some(why) = reserved_variable(name) {
            return invalid(field, format!("`{name}` cannot be set by a task: {why}"));
        }
        if value.contains('\n') || value.contains('\0') {
            return invalid(field, format!("the value of `{name}` must be one line"));
        }
    }
    Ok(())
}

/// Why a task may not set the variable `name`, if it may not: what the agent, its tools or its
/// credentials depend on stays the worker's. Case-insensitive, so that `anthropic_base_url`
/// (which some tools read too) is refused like `ANTHROPIC_BASE_URL`.
pub fn reserved_variable(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_uppercase();
    const PREFIXES: &[(&str, &str)] = &[
        (
            "ANTHROPIC_",
            "the agent's API endpoint and credentials are the worker's",
        ),
        ("CLAUDE", "the agent's own settings are the worker's"),
        ("LD_", "it changes what every program loads"),
        (
            "NODE_",
            "it changes how the agent's runtime starts and trusts TLS",
        ),
        ("NPM_CONFIG_", "it changes where packages come from"),
        ("SSL_", "it changes which certificates are trusted"),
        ("GIT_", "it changes what git runs and where it connects"),
    ];
    const NAMES: &[(&str, &str)] = &[
        (
            "PATH",
            "it decides which programs run, the agent among them",
        ),
        ("HOME", "the agent's home is the worker's to give"),
        ("USER", "the agent's user is the worker's to give"),
        ("SHELL", "it decides what runs the agent's commands"),
    ];
    PREFIXES
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .or_else(|| NAMES.iter().find(|(reserved, _)| name == *reserved))
        .map(|(_, why)| *why)
        .or_else(|| {
            (name.ends_with("_PROXY") || name == "PROXY")
                .then_some("where the agent's traffic goes is the worker's egress policy")
        })
}

fn resource_limits(limits: &ResourceLimits) -> Result<(), Invalid> {
    if limits.memory_bytes != 0 && limits.memory_bytes < MIN_MEMORY_BYTES {
        return invalid(
            "spec.limits.memory_bytes",
            format!(
                "is {}; an agent needs at least {MIN_MEMORY_BYTES} (0 means the worker's default)",
                limits.memory_bytes
            ),
        );
    }
    if !limits.cpus.is_finite()
        || limits.cpus < 0.0
        || (limits.cpus > 0.0 && limits.cpus < MIN_CPUS)
    {
        return invalid(
            "spec.limits.cpus",
            format!(
                "is {}; it must be 0 (the worker's default) or at least {MIN_CPUS} cores",
                limits.cpus
            ),
        );
    }
    if limits.pids != 0 && limits.pids < MIN_PIDS {
        return invalid(
            "spec.limits.pids",
            format!(
                "is {}; an agent needs at least {MIN_PIDS} processes (0 means the worker's default)",
                limits.pids
            ),
        );
    }
    Ok(())
}

fn agent_options(agent: &AgentOptions) -> Result<(), Invalid> {
    name("spec.agent.model", &agent.model)?;
    if agent.model.starts_with('-') {
        return invalid("spec.agent.model", "must not start with '-'");
    }
    if !agent.permission_mode.is_empty()
        && !PERMISSION_MODES.contains(&agent.permission_mode.as_str())
    {
        let shown: String = agent.permission_mode.chars().take(64).collect();
        return invalid(
            "spec.agent.permission_mode",
            format!(
                "`{}` is not one of {}",
                shown.escape_debug(),
                PERMISSION_MODES.join(", ")
            ),
        );
    }
    if !(agent.max_budget_usd >= 0.0 && agent.max_budget_usd.is_finite()) {
        return invalid(
            "spec.agent.max_budget_usd",
            format!(
                "is {}; it must be 0 (no budget) or more",
                agent.max_budget_usd
            ),
        );
    }
    if agent.append_system_prompt.len() > MAX_SYSTEM_PROMPT_BYTES {
        return invalid(
            "spec.agent.append_system_prompt",
            format!(
                "is {} bytes; at most {MAX_SYSTEM_PROMPT_BYTES} are accepted",
                agent.append_system_prompt.len()
            ),
        );
    }
    if agent.append_system_prompt.contains('\0') {
        return invalid(
            "spec.agent.append_system_prompt",
            "must not contain NUL characters",
        );
    }
    for (field, tools) in [
        ("spec.agent.allowed_tools", &agent.allowed_tools),
        ("spec.agent.disallowed_tools", &agent.disallowed_tools),
    ] {
        if tools.len() > MAX_TOOLS {
            return invalid(
                field,
                format!(
                    "has {} entries; at most {MAX_TOOLS} are accepted",
                    tools.len()
                ),
            );
        }
        if tools.iter().any(|tool| {
            tool.trim().is_empty()
                || tool.contains(',')
                || tool.starts_with('-')
                || tool.len() > MAX_NAME_BYTES
                || tool.chars().any(char::is_control)
        }) {
            return invalid(field, "each entry must be one tool name");
        }
    }
    Ok(())
}

/// Accepts what `git clone` should get from a client: https, http, ssh, git and file URLs,
/// scp-like `user@host:path`, and absolute paths. Refuses anything git could read as an option
/// or a transport of its own (`ext::`). Which of these a worker clones is its
/// `worker.allowedRepoSchemes` (see [`crate::admission`]).
pub fn repo_url(url: &str) -> Result<(), String> {
    // What errors show: the URL without its credentials.
    let shown = crate::without_credentials(url);
    if url.len() > MAX_REPO_URL_BYTES {
        return Err(format!(
            "is {} bytes; at most {MAX_REPO_URL_BYTES} are accepted",
            url.len()
        ));
    }
    if url.trim() != url || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "`{}` contains whitespace or control characters",
            shown.escape_debug()
        ));
    }
    if url.starts_with('-') {
        return Err(format!("`{shown}` must not start with '-'"));
    }
    if url.starts_with('/') {
        return Ok(());
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        return match scheme {
            "https" | "http" | "ssh" | "git" => {
                let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                // The user and password go before the host: `user:pw@host:port`.
                let host_port = authority.rsplit('@').next().unwrap_or("");
                let host = host_port.split(':').next().unwrap_or("");
                if host.is_empty() {
                    Err(format!("`{shown}` has no host"))
                } else if path.len() <= 1 {
                    Err(format!("`{shown}` names no repository"))
                } else {
                    Ok(())
                }
            }
            "file" if rest.starts_with('/') => Ok(()),
            "file" => Err(format!(
                "`{shown}` must be file:// followed by an absolute path"
            )),
            other => Err(format!(
                "scheme `{}` is not supported; use https, http, ssh, git or file",
                other.escape_debug()
            )),
        };
    }
    // git reads `transport::address` as a remote helper (`ext::sh -c …` runs any command).
    if url.contains("::") {
        return Err(format!(
            "`{shown}` names a git remote helper, which is not supported"
        ));
    }
    // scp-like syntax: [user@]host:path
    if let Some((host, path)) = url.split_once(':') {
        let host = host.rsplit('@').next().unwrap_or("");
        if !host.is_empty() && !path.is_empty() && !host.contains('/') {
            return Ok(());
        }
    }
    Err(format!(
        "`{shown}` is not a repository URL (https://, ssh://, git://, file://, user@host:path or an absolute path)"
    ))
}

/// Whether `id` may name a task, session or batch key: it becomes a directory, a container and
/// volume name and a command-line argument.
pub fn id(field: &'static str, id: &str) -> Result<(), Invalid> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return invalid(field, format!("must have 1 to {MAX_ID_BYTES} characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return invalid(field, "must be letters, digits, '-' or '_'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_urls_users_write_are_accepted() {
        for url in [
            "https://github.com/org/repo.git",
            "http://localhost:8080/repo",
            "ssh://git@host/org/repo",
            "git://host/repo",
            "file:///srv/repos/app.git",
            "/srv/repos/app.git",
            "git@github.com:org/repo.git",
        ] {
            assert_eq!(repo_url(url), Ok(()), "{url}");
        }
    }

    #[test]
    fn malformed_repository_urls_are_refused_with_a_reason() {
        for (url, expected) in [
            ("not a url", "whitespace"),
            ("--upload-pack=evil", "must not start with '-'"),
            ("ftp://host/repo", "scheme `ftp`"),
            ("https://", "no host"),
            ("https://github.com", "names no repository"),
            ("https://user:s3cret@", "has no host"),
            ("https://user:pw@host", "names no repository"),
            ("https://user:pw@host:8443/", "names no repository"),
            ("file://relative/path", "absolute path"),
            ("relative/path", "is not a repository URL"),
            ("ext::sh -c touch% /tmp/pwned", "whitespace"),
            ("ext::sh", "remote helper"),
            ("fd::17", "remote helper"),
        ] {
            let err = repo_url(url).unwrap_err();
            assert!(err.contains(expected), "{url}: {err}");
        }
        let long = format!("https://host/{}", "a".repeat(MAX_REPO_URL_BYTES));
        assert!(repo_url(&long).unwrap_err().contains("at most 4096"));
    }

    #[test]
    fn an_empty_prompt_names_the_field() {
        let spec = TaskSpec {
            prompt: "  \n".into(),
            ..Default::default()
        };
        let err = task_spec(&spec, DEFAULT_MAX_PROMPT_BYTES).unwrap_err();
        assert_eq!(err.to_string(), "spec.prompt: must not be empty");
    }

    #[test]
    fn a_prompt_at_the_limit_passes_and_one_byte_more_is_refused() {
        let mut spec = TaskSpec {
            prompt: "x".repeat(1000),
            ..Default::default()
        };
        assert_eq!(task_spec(&spec, 1000), Ok(()));
        spec.prompt.push('x');
        assert_eq!(
            task_spec(&spec, 1000).unwrap_err().to_string(),
            "spec.prompt: is 1001 bytes; at most 1000 are accepted (driver.maxPromptBytes)"
        );
    }

    #[test]
    fn unknown_permission_modes_are_refused() {
        let spec = TaskSpec {
            prompt: "hi".into(),
            agent: Some(AgentOptions {
                permission_mode: "yolo".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = task_spec(&spec, DEFAULT_MAX_PROMPT_BYTES)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("spec.agent.permission_mode: `yolo` is not one of"),
            "{err}"
        );
    }

    #[test]
    fn negative_tiny_and_non_finite_limits_name_their_field() {
        let with = |limits: ResourceLimits, agent: AgentOptions| TaskSpec {
            prompt: "hi".into(),
            limits: Some(limits),
            agent: Some(agent),
            ..Default::default()
        };
        let cases = [
            (
                with(
                    ResourceLimits {
                        memory_bytes: 1000,
                        ..Default::default()
                    },
                    AgentOptions::default(),
                ),
                "spec.limits.memory_bytes",
            ),
            (
                with(
                    ResourceLimits {
                        cpus: -1.0,
                        ..Default::default()
                    },
                    AgentOptions::default(),
                ),
                "spec.limits.cpus",
            ),
            (
                with(
                    ResourceLimits {
                        cpus: f64::NAN,
                        ..Default::default()
                    },
                    AgentOptions::default(),
                ),
                "spec.limits.cpus",
            ),
            (
                with(
                    ResourceLimits {
                        pids: 3,
                        ..Default::default()
                    },
                    AgentOptions::default(),
                ),
                "spec.limits.pids",
            ),
            (
                with(
                    ResourceLimits::default(),
                    AgentOptions {
                        max_budget_usd: f64::INFINITY,
                        ..Default::default()
                    },
                ),
                "spec.agent.max_budget_usd",
            ),
        ];
        for (spec, field) in cases {
            let err = task_spec(&spec, DEFAULT_MAX_PROMPT_BYTES).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn ids_that_could_leave_their_directory_are_refused() {
        for bad in ["", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(id("task_id", bad).is_err(), "{bad:?}");
        }
        assert_eq!(id("task_id", "task-1_A"), Ok(()));
    }
}
