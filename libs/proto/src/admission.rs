//! What a worker admits of a task or session, decided in one place for the driver (which
//! refuses what no registered worker admits), the scheduler (which places work only where it
//! is admitted) and the worker (which checks again what reaches it).

use crate::v1::{SessionSpec, TaskNeeds, TaskSpec, WorkerAdmits};

/// Every scheme `worker.allowedRepoSchemes` may list.
pub const REPO_SCHEMES: &[&str] = &["https", "ssh", "http", "git", "file"];

/// The scheme of `url` as `worker.allowedRepoSchemes` names it: `ssh` for `user@host:path`,
/// `file` for an absolute path; `None` for no repository.
pub fn repo_scheme(url: &str) -> Option<&str> {
    if url.is_empty() {
        None
    } else if url.starts_with('/') {
        Some("file")
    } else if let Some((scheme, _)) = url.split_once("://") {
        Some(scheme)
    } else {
        Some("ssh")
    }
}

/// Whether `agent` asks for what only a permissive worker allows: `bypassPermissions`, or Bash
/// with no pattern restricting its commands.
fn unrestricted(agent: &crate::v1::AgentOptions) -> (bool, bool) {
    (
        agent.permission_mode == "bypassPermissions",
        agent.allowed_tools.iter().any(|tool| tool.trim() == "Bash"),
    )
}

impl TaskNeeds {
    /// Whether the task asks for `bypassPermissions` or unrestricted Bash.
    pub fn is_unrestricted(&self) -> bool {
        self.bypass_permissions || self.unrestricted_bash
    }

    pub fn of_task(spec: &TaskSpec) -> TaskNeeds {
        let limits = spec.limits.unwrap_or_default();
        let agent = spec.agent.clone().unwrap_or_default();
        let (bypass_permissions, unrestricted_bash) = unrestricted(&agent);
        TaskNeeds {
            bypass_permissions,
            unrestricted_bash,
            repo_scheme: repo_scheme(&spec.repo_url).unwrap_or("").to_owned(),
            memory_bytes: limits.memory_bytes,
            cpus: limits.cpus,
            pids: limits.pids,
            timeout_seconds: limits.timeout_seconds,
            max_budget_usd: agent.max_budget_usd,
            max_turns: agent.max_turns,
        }
    }

    pub fn of_session(spec: &SessionSpec) -> TaskNeeds {
        let limits = spec.limits.unwrap_or_default();
        let agent = spec.agent.clone().unwrap_or_default();
        let (bypass_permissions, unrestricted_bash) = unrestricted(&agent);
        TaskNeeds {
            bypass_permissions,
            unrestricted_bash,
            repo_scheme: repo_scheme(&spec.repo_url).unwrap_or("").to_owned(),
            memory_bytes: limits.memory_bytes,
            cpus: limits.cpus,
            pids: limits.pids,
            timeout_seconds: limits.timeout_seconds.max(spec.idle_timeout_seconds),
            max_budget_usd: agent.max_budget_usd,
            max_turns: agent.max_turns,
        }
    }

    /// Whether the task asks for nothing a worker might not admit: every worker takes it.
    pub fn is_default(&self) -> bool {
        *self == TaskNeeds::default()
    }
}

/// Why a worker does not admit a task: the task's field, and the worker's setting it exceeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl WorkerAdmits {
    /// Why this worker cannot take a task that needs `needs`; `None` when it can. Zero in
    /// `needs` is the worker's default, which it always admits.
    pub fn refusal(&self, needs: &TaskNeeds) -> Option<Refusal> {
        if !needs.repo_scheme.is_empty() && !self.repo_schemes.contains(&needs.repo_scheme) {
            return Some(Refusal {
                field: "spec.repo_url",
                message: format!(
                    "scheme `{}` is not in worker.allowedRepoSchemes ({})",
                    needs.repo_scheme,
                    self.repo_schemes.join(", ")
                ),
            });
        }
        if needs.bypass_permissions && !self.bypass_permissions {
            return Some(Refusal {
                field: "spec.agent.permission_mode",
                message:
                    "`bypassPermissions` is not permitted by worker.agent.permits.bypassPermissions"
                        .into(),
            });
        }
        if needs.unrestricted_bash && !self.unrestricted_bash {
            return Some(Refusal {
                field: "spec.agent.allowed_tools",
                message: "unrestricted `Bash` is not permitted by worker.agent.permits.unrestrictedBash; name the commands, as `Bash(git:*)`".into(),
            });
        }
        let above = |field: &'static str, asked: String, allowed: String, key: &str| {
            Some(Refusal {
                field,
                message: format!(
                    "{asked} is more than the {allowed} of worker.maxTaskLimits.{key}"
                ),
            })
        };
        if needs.memory_bytes > self.max_memory_bytes {
            return above(
                "spec.limits.memory_bytes",
                needs.memory_bytes.to_string(),
                self.max_memory_bytes.to_string(),
                "memory",
            );
        }
        if needs.cpus > self.max_cpus {
            return above(
                "spec.limits.cpus",
                needs.cpus.to_string(),
                self.max_cpus.to_string(),
                "cpu",
            );
        }
        if needs.pids > self.max_pids {
            return above(
                "spec.limits.pids",
                needs.pids.to_string(),
                self.max_pids.to_string(),
                "pids",
            );
        }
        if needs.timeout_seconds > self.max_timeout_seconds {
            return above(
                "spec.limits.timeout_seconds",
                needs.timeout_seconds.to_string(),
                self.max_timeout_seconds.to_string(),
                "timeout",
            );
        }
        if needs.max_budget_usd > self.max_budget_usd {
            return above(
                "spec.agent.max_budget_usd",
                needs.max_budget_usd.to_string(),
                self.max_budget_usd.to_string(),
                "budgetUsd",
            );
        }
        if needs.max_turns > self.max_turns {
            return above(
                "spec.agent.max_turns",
                needs.max_turns.to_string(),
                self.max_turns.to_string(),
                "turns",
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admits() -> WorkerAdmits {
        WorkerAdmits {
            repo_schemes: vec!["https".into(), "ssh".into()],
            max_memory_bytes: 8 << 30,
            max_cpus: 4.0,
            max_pids: 4096,
            max_timeout_seconds: 3600,
            max_budget_usd: 10.0,
            max_turns: 100,
            bypass_permissions: false,
            unrestricted_bash: true,
        }
    }

    #[test]
    fn schemes_are_named_as_the_setting_names_them() {
        assert_eq!(repo_scheme("git@host:org/app.git"), Some("ssh"));
        assert_eq!(repo_scheme("/srv/app.git"), Some("file"));
        assert_eq!(repo_scheme("file:///srv/app.git"), Some("file"));
        assert_eq!(repo_scheme("http://host/app"), Some("http"));
        assert_eq!(repo_scheme(""), None);
    }

    #[test]
    fn limits_at_the_maximum_are_admitted_and_past_it_refused_naming_the_setting() {
        let at = TaskNeeds {
            repo_scheme: "https".into(),
            memory_bytes: 8 << 30,
            cpus: 4.0,
            pids: 4096,
            timeout_seconds: 3600,
            max_budget_usd: 10.0,
            max_turns: 100,
            ..Default::default()
        };
        assert_eq!(admits().refusal(&at), None);
        assert_eq!(admits().refusal(&TaskNeeds::default()), None);
        let past = TaskNeeds {
            memory_bytes: (8 << 30) + 1,
            ..at.clone()
        };
        let refusal = admits().refusal(&past).unwrap();
        assert_eq!(refusal.field, "spec.limits.memory_bytes");
        assert!(
            refusal.message.contains("worker.maxTaskLimits.memory"),
            "{refusal}"
        );
        let http = TaskNeeds {
            repo_scheme: "http".into(),
            ..Default::default()
        };
        assert_eq!(
            admits().refusal(&http).unwrap().to_string(),
            "spec.repo_url: scheme `http` is not in worker.allowedRepoSchemes (https, ssh)"
        );
    }
}
