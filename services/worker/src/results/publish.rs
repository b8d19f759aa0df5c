//! A task's changes as a branch of its repository, and a pull request of it.
//!
//! The worker commits the workspace after the agent ended, pushes with its own credential
//! (`worker.publish`), which no agent ever sees, and opens the pull request through the forge's
//! REST API (GitHub's, or one that speaks it). Whatever fails is said in the task's result; the
//! task itself stays as the agent left it.

use std::time::Duration;

use bytes::Bytes;
use claudecluster_config::PublishConfig;
use claudecluster_proto::v1::{BranchResult, ChangeSummary, ResultSpec};
use http_body_util::{BodyExt, Full};

use super::git::Tracking;
use crate::outbound::Endpoint;

/// The longest subject line of a result commit, and of a pull request's title.
const SUBJECT_CHARS: usize = 72;
/// How much of the prompt a commit message and a pull request carry.
const PROMPT_CHARS: usize = 4000;

/// What a task asked, and what it is.
pub struct Publication<'a> {
    pub task_id: &'a str,
    pub attempt: u32,
    pub prompt: &'a str,
    pub repo_url: &'a str,
    pub result: &'a ResultSpec,
}

/// The branch name a template makes for a task attempt.
pub fn branch_name(template: &str, task_id: &str, attempt: u32) -> String {
    template
        .replace("{task_id}", task_id)
        .replace("{attempt}", &attempt.to_string())
}

/// The token of `config`: given, or read from its file now (so it may be rotated).
fn token(config: &PublishConfig) -> Result<Option<String>, String> {
    if let Some(token) = config.token.as_ref().filter(|token| !token.is_empty()) {
        return Ok(Some(token.clone()));
    }
    match &config.token_file {
        Some(path) => std::fs::read_to_string(path)
            .map(|token| Some(token.trim().to_owned()))
            .map_err(|err| {
                format!(
                    "cannot read the push credential {} (`worker.publish.tokenFile`): {err}",
                    path.display()
                )
            }),
        None => Ok(None),
    }
}

/// Commits the workspace, pushes the branch and opens the pull request, as asked. `changes` is
/// what the agent changed: nothing changed, nothing is pushed.
pub async fn publish(
    tracking: &Tracking,
    publication: &Publication<'_>,
    changes: Option<&ChangeSummary>,
    config: &PublishConfig,
    timeout: Duration,
) -> BranchResult {
    let name = branch_name(
        &publication.result.branch,
        publication.task_id,
        publication.attempt,
    );
    let mut result = BranchResult {
        name: name.clone(),
        ..BranchResult::default()
    };
    let token = match token(config) {
        Ok(token) => token,
        Err(err) => {
            result.error = err;
            return result;
        }
    };
    let hide = |text: String| hide_secrets(&text, publication.repo_url, token.as_deref());
    if changes.is_some_and(|changes| changes.files_changed == 0) {
        result.error = "the agent changed no files: nothing was pushed".into();
        return result;
    }
    let message = commit_message(publication);
    let commit = match tracking
        .commit(&message, (&config.author_name, &config.author_email))
        .await
    {
        Ok(Some(commit)) => commit,
        Ok(None) => {
            result.error = "the agent changed no files: nothing was pushed".into();
            return result;
        }
        Err(err) => {
            result.error = hide(err);
            return result;
        }
    };
    result.commit = commit.clone();
    let over_http =
        publication.repo_url.starts_with("https://") || publication.repo_url.starts_with("http://");
    let header = token
        .as_deref()
        .filter(|_| over_http)
        .map(|token| basic_authorization(&config.username, token));
    if let Err(err) = tracking
        .push(
            publication.repo_url,
            &commit,
            &name,
            header.as_deref(),
            timeout,
        )
        .await
    {
        // Git asks for a user name when the server refuses the credential in the header, and
        // cannot ask: that is a refused credential, not a missing terminal.
        let refused_credential =
            err.contains("could not read Username") || err.contains("Authentication failed");
        let err = if refused_credential {
            format!("authentication failed ({})", hide(err))
        } else {
            hide(err)
        };
        let mut reason = format!(
            "the push of branch {name} to {} failed: {err}",
            claudecluster_proto::without_credentials(publication.repo_url),
        );
        if token.is_none() && over_http {
            reason.push_str(" (no credential: set `worker.publish.token` or `tokenFile`)");
        }
        result.error = reason;
        return result;
    }
    result.pushed = true;
    tracing::info!(task = %publication.task_id, branch = %name, %commit, "result branch pushed");
    if !publication.result.pull_request {
        return result;
    }
    let base = match publication.result.pull_request_base.as_str() {
        "" => tracking.base_branch().await,
        base => Some(base.to_owned()),
    };
    let Some(base) = base else {
        result.error =
            "no pull request: the repository had no branch to merge into; set `result.pull_request_base`".into();
        return result;
    };
    match open_pull_request(publication, config, token.as_deref(), &name, &base, changes).await {
        Ok(url) => {
            tracing::info!(task = %publication.task_id, %url, "pull request opened");
            result.pull_request_url = url;
        }
        Err(err) => result.error = format!("no pull request: {}", hide(err)),
    }
    result
}

/// The commit's message: the one asked for, or the prompt's first line as the subject and the
/// prompt below it.
fn commit_message(publication: &Publication<'_>) -> String {
    if !publication.result.commit_message.is_empty() {
        return publication.result.commit_message.clone();
    }
    let prompt: String = publication.prompt.chars().take(PROMPT_CHARS).collect();
    format!(
        "{}\n\n{}\n\nTask {} attempt {}, by ClaudeCluster.\n",
        subject(publication.prompt),
        prompt.trim_end(),
        publication.task_id,
        publication.attempt
    )
}

fn subject(prompt: &str) -> String {
    let line = prompt
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("Changes");
    let mut subject: String = line.chars().take(SUBJECT_CHARS).collect();
    if line.chars().count() > SUBJECT_CHARS {
        subject.pop();
        subject.push('…');
    }
    subject
}

fn basic_authorization(username: &str, token: &str) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{token}"));
    format!("Authorization: Basic {encoded}")
}

/// `text` without the repository URL's credentials and without the token (plain or encoded).
fn hide_secrets(text: &str, repo_url: &str, token: Option<&str>) -> String {
    let mut text = claudecluster_proto::hide_credentials_of(repo_url, text);
    if let Some(token) = token.filter(|token| !token.is_empty()) {
        text = text.replace(token, "***");
    }
    text
}

/// `owner` and `repo` of a forge URL: `https://host/owner/repo(.git)`.
fn owner_and_repo(url: &str) -> Option<(String, String)> {
    let path = url.split_once("://")?.1.split_once('/')?.1;
    let mut parts = path.trim_end_matches('/').rsplitn(3, '/');
    let repo = parts.next()?.trim_end_matches(".git");
    let owner = parts.next()?;
    (!repo.is_empty() && !owner.is_empty()).then(|| (owner.to_owned(), repo.to_owned()))
}

async fn open_pull_request(
    publication: &Publication<'_>,
    config: &PublishConfig,
    token: Option<&str>,
    head: &str,
    base: &str,
    changes: Option<&ChangeSummary>,
) -> Result<String, String> {
    let token = token.ok_or("no credential for the forge's API (`worker.publish.token`)")?;
    let (owner, repo) = owner_and_repo(publication.repo_url).ok_or_else(|| {
        format!(
            "{} names no owner and repository",
            claudecluster_proto::without_credentials(publication.repo_url)
        )
    })?;
    let endpoint = Endpoint::parse(&config.api_url)
        .map_err(|err| format!("`worker.publish.apiUrl`: {err}"))?;
    let tls = crate::outbound::tls_connector()?;
    let mut body = format!(
        "{}\n\nOpened by ClaudeCluster for task {} (attempt {}).",
        publication
            .prompt
            .chars()
            .take(PROMPT_CHARS)
            .collect::<String>(),
        publication.task_id,
        publication.attempt
    );
    if let Some(changes) = changes {
        body.push_str(&format!(
            " {} files changed, {} insertions, {} deletions.",
            changes.files_changed, changes.insertions, changes.deletions
        ));
    }
    let payload = serde_json::json!({
        "title": subject(publication.prompt),
        "head": head,
        "base": base,
        "body": body,
    });
    let request =
        hyper::Request::post(format!("{}/repos/{owner}/{repo}/pulls", endpoint.base_path))
            .header(hyper::header::HOST, endpoint.host_header())
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::ACCEPT, "application/vnd.github+json")
            .header(hyper::header::USER_AGENT, "claudecluster-worker")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload.to_string())))
            .map_err(|err| format!("cannot build the request: {err}"))?;
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        crate::outbound::send(&endpoint, &tls, request),
    )
    .await
    .map_err(|_| format!("{} did not answer within 60 s", config.api_url))??;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|err| format!("the answer broke off: {err}"))?
        .to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if !status.is_success() {
        let message = answer["message"].as_str().unwrap_or("no message");
        let details = answer["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .map(|error| {
                        error["message"]
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| error.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .filter(|details| !details.is_empty())
            .map(|details| format!(" ({details})"))
            .unwrap_or_default();
        return Err(format!("the forge answered {status}: {message}{details}"));
    }
    answer["html_url"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| "the forge's answer has no `html_url`".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_filled_and_urls_name_their_repository() {
        assert_eq!(
            branch_name("claudecluster/{task_id}-{attempt}", "t1", 2),
            "claudecluster/t1-2"
        );
        assert_eq!(
            owner_and_repo("https://github.com/acme/widgets.git"),
            Some(("acme".into(), "widgets".into()))
        );
        assert_eq!(
            owner_and_repo("http://127.0.0.1:9/git/acme/widgets"),
            Some(("acme".into(), "widgets".into()))
        );
        assert_eq!(owner_and_repo("https://github.com/"), None);
    }

    #[test]
    fn subjects_are_the_prompts_first_line_cut_short() {
        assert_eq!(subject("\n  Fix the parser\nthen test"), "Fix the parser");
        let long = "x".repeat(100);
        let cut = subject(&long);
        assert_eq!(cut.chars().count(), SUBJECT_CHARS);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn secrets_are_hidden_from_reasons() {
        let shown = hide_secrets(
            "fatal: https://u:pw@h/r.git said s3cr3t",
            "https://u:pw@h/r.git",
            Some("s3cr3t"),
        );
        assert!(
            !shown.contains("pw@") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }
}
