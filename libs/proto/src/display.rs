//! Short lowercase names for enums, as used in logs, CLI output and configuration.

use crate::v1::{ExecutionMode, FileChange, Priority, SessionState, TaskStatus};

impl SessionState {
    /// The state as a user reads it: `ready`, `busy`, `stopped`, ...
    pub fn label(self) -> &'static str {
        match self {
            SessionState::Unspecified => "unspecified",
            SessionState::Creating => "creating",
            SessionState::Ready => "ready",
            SessionState::Busy => "busy",
            SessionState::Idle => "idle",
            SessionState::Stopped => "stopped",
            SessionState::Closed => "closed",
            SessionState::Failed => "failed",
            SessionState::Lost => "lost",
        }
    }

    /// No more messages: the session is closed, failed or lost.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SessionState::Closed | SessionState::Failed | SessionState::Lost
        )
    }

    pub fn from_label(label: &str) -> Option<Self> {
        [
            SessionState::Creating,
            SessionState::Ready,
            SessionState::Busy,
            SessionState::Idle,
            SessionState::Stopped,
            SessionState::Closed,
            SessionState::Failed,
            SessionState::Lost,
        ]
        .into_iter()
        .find(|state| state.label() == label.to_ascii_lowercase())
    }
}

impl TaskStatus {
    /// The status as a user reads it: `pending`, `running`, `completed`, ...
    pub fn label(self) -> &'static str {
        match self {
            TaskStatus::Unspecified => "unspecified",
            TaskStatus::Pending => "pending",
            TaskStatus::Assigned => "assigned",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the task can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    /// Parses a label as written by users, including the original system's names.
    pub fn from_label(label: &str) -> Option<Self> {
        Some(match label.to_ascii_lowercase().as_str() {
            "pending" => TaskStatus::Pending,
            "assigned" => TaskStatus::Assigned,
            "running" => TaskStatus::Running,
            "completed" => TaskStatus::Completed,
            "failed" => TaskStatus::Failed,
            "cancelled" | "canceled" => TaskStatus::Cancelled,
            _ => return None,
        })
    }
}

impl ExecutionMode {
    /// The mode as written in configuration: `process_pool`, `container_agentic`.
    pub fn label(self) -> &'static str {
        match self {
            ExecutionMode::Unspecified => "any",
            ExecutionMode::ProcessPool => "process_pool",
            ExecutionMode::ContainerAgentic => "container_agentic",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Some(match label.to_ascii_lowercase().as_str() {
            "process_pool" | "process-pool" => ExecutionMode::ProcessPool,
            "container_agentic" | "container-agentic" | "container" => {
                ExecutionMode::ContainerAgentic
            }
            "any" | "" => ExecutionMode::Unspecified,
            _ => return None,
        })
    }
}

impl FileChange {
    pub fn label(self) -> &'static str {
        match self {
            FileChange::Unspecified => "unknown",
            FileChange::Unchanged => "unchanged",
            FileChange::Added => "added",
            FileChange::Modified => "modified",
            FileChange::Deleted => "deleted",
            FileChange::Ignored => "ignored",
        }
    }
}

impl Priority {
    pub fn label(self) -> &'static str {
        match self {
            Priority::Unspecified | Priority::Normal => "normal",
            Priority::Low => "low",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// Parses a priority, mapping the original system's `background` to low and `medium` to normal.
    pub fn from_label(label: &str) -> Option<Self> {
        Some(match label.to_ascii_lowercase().as_str() {
            "low" | "background" => Priority::Low,
            "normal" | "medium" => Priority::Normal,
            "high" => Priority::High,
            "critical" => Priority::Critical,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_priority_names_map_onto_the_four_levels() {
        assert_eq!(Priority::from_label("background"), Some(Priority::Low));
        assert_eq!(Priority::from_label("medium"), Some(Priority::Normal));
        assert_eq!(Priority::from_label("Critical"), Some(Priority::Critical));
        assert_eq!(Priority::from_label("urgent"), None);
    }

    #[test]
    fn status_labels_round_trip() {
        for status in [
            TaskStatus::Pending,
            TaskStatus::Assigned,
            TaskStatus::Running,
            TaskStatus::Completed,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
        ] {
            assert_eq!(TaskStatus::from_label(status.label()), Some(status));
        }
        assert!(TaskStatus::Failed.is_terminal());
        assert!(!TaskStatus::Running.is_terminal());
    }
}

/// A repository URL as it may be shown to anyone: without the credentials it may carry
/// (`https://user:token@host/repo.git` becomes `https://***@host/repo.git`). The clone itself
/// still uses them.
pub fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{path}"),
        None => url.to_owned(),
    }
}

/// `text` (a message of git's, say) with any credentials of `url` in it hidden: the URL
/// itself, and its user and password wherever they appear alone.
pub fn hide_credentials_of(url: &str, text: &str) -> String {
    let shown = without_credentials(url);
    let mut text = text.replace(url, &shown);
    if let Some((_, rest)) = url.split_once("://") {
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            for secret in [
                Some(userinfo),
                userinfo.split_once(':').map(|(_, password)| password),
            ]
            .into_iter()
            .flatten()
            .filter(|secret| !secret.is_empty())
            {
                text = text.replace(secret, "***");
            }
        }
    }
    text
}

#[cfg(test)]
mod credential_tests {
    use super::{hide_credentials_of, without_credentials};

    #[test]
    fn credentials_are_hidden_wherever_a_message_repeats_them() {
        let url = "https://bob:tok3n@git.example/app.git";
        assert_eq!(
            hide_credentials_of(
                url,
                "fatal: unable to access 'https://bob:tok3n@git.example/app.git/': denied; password tok3n"
            ),
            "fatal: unable to access 'https://***@git.example/app.git/': denied; password ***"
        );
        assert_eq!(
            hide_credentials_of("git@host:a.git", "no such repo"),
            "no such repo"
        );
    }

    #[test]
    fn credentials_in_a_url_are_hidden_and_the_rest_kept() {
        assert_eq!(
            without_credentials("https://user:s3cret@git.example/org/app.git"),
            "https://***@git.example/org/app.git"
        );
        assert_eq!(
            without_credentials("https://ghp_token@git.example/a.git?x=1"),
            "https://***@git.example/a.git?x=1"
        );
        assert_eq!(
            without_credentials("https://git.example/a@b.git"),
            "https://git.example/a@b.git",
            "an @ in the path is not a credential"
        );
        assert_eq!(
            without_credentials("git@github.com:org/app.git"),
            "git@github.com:org/app.git"
        );
    }
}

/// A response of one of the driver's event streams: it carries one event.
pub trait CarriesEvent {
    fn into_event(self) -> Option<crate::v1::Event>;
}

impl CarriesEvent for crate::v1::StreamTaskEventsResponse {
    fn into_event(self) -> Option<crate::v1::Event> {
        self.event
    }
}

impl CarriesEvent for crate::v1::StreamSessionEventsResponse {
    fn into_event(self) -> Option<crate::v1::Event> {
        self.event
    }
}

/// A size as people read it: `512 B`, `1.5 KiB`, `120.0 MiB`, `2.0 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod size_tests {
    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(120 << 20), "120.0 MiB");
    }
}
