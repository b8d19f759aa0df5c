//! Checks on what clients submit, each error naming the field.

use claudecluster_proto::v1::{
    AgentOptions, ExecutionMode, Priority, ResourceLimits, SessionSpec, TaskSpec,
};

use crate::error::DriverError;

/// Prompts past this size are refused rather than passed on a command line.
const MAX_PROMPT_BYTES: usize = 512 * 1024;

/// The CLI's permission modes (2.1.328), plus `default`.
const PERMISSION_MODES: &[&str] = &[
    "default",
    "acceptEdits",
    "auto",
    "bypassPermissions",
    "manual",
    "dontAsk",
    "plan",
];

pub fn task_spec(spec: Option<&TaskSpec>) -> Result<&TaskSpec, DriverError> {
    let spec = spec.ok_or_else(|| DriverError::invalid("spec", "is required"))?;
    if spec.prompt.trim().is_empty() {
        return Err(DriverError::invalid("spec.prompt", "must not be empty"));
    }
    if spec.prompt.len() > MAX_PROMPT_BYTES {
        return Err(DriverError::invalid(
            "spec.prompt",
            format!(
                "is {} bytes; at most {MAX_PROMPT_BYTES} are accepted",
                spec.prompt.len()
            ),
        ));
    }
    if spec.prompt.contains('\0') {
        return Err(DriverError::invalid(
            "spec.prompt",
            "must not contain NUL characters",
        ));
    }
    if !spec.repo_url.is_empty() {
        repo_url(&spec.repo_url)
            .map_err(|message| DriverError::invalid("spec.repo_url", message))?;
    }
    if ExecutionMode::try_from(spec.execution_mode).is_err() {
        return Err(DriverError::invalid(
            "spec.execution_mode",
            format!("{} is not an execution mode", spec.execution_mode),
        ));
    }
    if Priority::try_from(spec.priority).is_err() {
        return Err(DriverError::invalid(
            "spec.priority",
            format!("{} is not a priority", spec.priority),
        ));
    }
    for key in spec.worker_selector.keys() {
        if key.trim().is_empty() {
            return Err(DriverError::invalid(
                "spec.worker_selector",
                "label names must not be empty",
            ));
        }
    }
    if let Some(limits) = &spec.limits {
        resource_limits(limits)?;
    }
    if let Some(agent) = &spec.agent {
        agent_options(agent)?;
    }
    for (name, value) in &spec.environment {
        environment_variable(name, value)?;
    }
    Ok(spec)
}

/// The worker's own variables stay the worker's: a task that could set `ANTHROPIC_BASE_URL`
/// could send the worker's key anywhere.
fn environment_variable(name: &str, value: &str) -> Result<(), DriverError> {
    let field = "spec.environment";
    let valid_name = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(DriverError::invalid(
            field,
            format!("`{name}` is not a variable name"),
        ));
    }
    if name.starts_with("ANTHROPIC_")
        || name.starts_with("CLAUDE_CODE_")
        || name == "CLAUDE_CONFIG_DIR"
    {
        return Err(DriverError::invalid(
            field,
            format!("`{name}` is set by the worker and cannot be set by a task"),
        ));
    }
    if value.contains('\n') || value.contains('\0') {
        return Err(DriverError::invalid(
            field,
            format!("the value of `{name}` must be one line"),
        ));
    }
    Ok(())
}

pub fn session_spec(spec: SessionSpec) -> Result<SessionSpec, DriverError> {
    if !spec.repo_url.is_empty() {
        repo_url(&spec.repo_url)
            .map_err(|message| DriverError::invalid("spec.repo_url", message))?;
    }
    if spec.worker_selector.keys().any(|key| key.trim().is_empty()) {
        return Err(DriverError::invalid(
            "spec.worker_selector",
            "label names must not be empty",
        ));
    }
    if let Some(limits) = &spec.limits {
        resource_limits(limits)?;
    }
    if let Some(agent) = &spec.agent {
        agent_options(agent)?;
    }
    Ok(spec)
}

fn resource_limits(limits: &ResourceLimits) -> Result<(), DriverError> {
    if !(limits.cpus >= 0.0 && limits.cpus.is_finite()) {
        return Err(DriverError::invalid(
            "spec.limits.cpus",
            "must be a number of cores, zero or more",
        ));
    }
    Ok(())
}

fn agent_options(agent: &AgentOptions) -> Result<(), DriverError> {
    if !agent.permission_mode.is_empty()
        && !PERMISSION_MODES.contains(&agent.permission_mode.as_str())
    {
        return Err(DriverError::invalid(
            "spec.agent.permission_mode",
            format!(
                "`{}` is not one of {}",
                agent.permission_mode,
                PERMISSION_MODES.join(", ")
            ),
        ));
    }
    if !(agent.max_budget_usd >= 0.0 && agent.max_budget_usd.is_finite()) {
        return Err(DriverError::invalid(
            "spec.agent.max_budget_usd",
            "must be zero or more",
        ));
    }
    for (field, tools) in [
        ("spec.agent.allowed_tools", &agent.allowed_tools),
        ("spec.agent.disallowed_tools", &agent.disallowed_tools),
    ] {
        if tools
            .iter()
            .any(|tool| tool.trim().is_empty() || tool.contains(','))
        {
            return Err(DriverError::invalid(
                field,
                "each entry must be one tool name",
            ));
        }
    }
    Ok(())
}

/// Accepts what `git clone` should get from a client: https, http, ssh, git and file URLs,
/// scp-like `user@host:path`, and absolute paths. Refuses anything git could read as an option.
pub fn repo_url(url: &str) -> Result<(), String> {
    // What errors show: the URL without its credentials.
    let shown = claudecluster_proto::without_credentials(url);
    if url.trim() != url || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "`{shown}` contains whitespace or control characters"
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
                let host = rest.split(['/', ':']).next().unwrap_or("");
                let host = host.rsplit('@').next().unwrap_or("");
                if host.is_empty() {
                    Err(format!("`{shown}` has no host"))
                } else if rest.len() <= host.len() + 1 {
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
                "scheme `{other}` is not supported; use https, http, ssh, git or file"
            )),
        };
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
            ("file://relative/path", "absolute path"),
            ("relative/path", "is not a repository URL"),
        ] {
            let err = repo_url(url).unwrap_err();
            assert!(err.contains(expected), "{url}: {err}");
        }
    }

    #[test]
    fn an_empty_prompt_names_the_field() {
        let spec = TaskSpec {
            prompt: "  \n".into(),
            ..Default::default()
        };
        let err = task_spec(Some(&spec)).unwrap_err();
        assert_eq!(err.to_string(), "spec.prompt: must not be empty");
        assert_eq!(
            task_spec(None).unwrap_err().to_string(),
            "spec: is required"
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
        let err = task_spec(Some(&spec)).unwrap_err().to_string();
        assert!(
            err.starts_with("spec.agent.permission_mode: `yolo` is not one of"),
            "{err}"
        );
    }
}
