//! A stand-in for a git forge, for tests (not a product feature): bare repositories served over
//! smart HTTP by the real `git http-backend`, and the pull-request endpoint of the GitHub REST
//! API, both on one loopback port.
//!
//! | request                                          | answer                                      |
//! |--------------------------------------------------|---------------------------------------------|
//! | clone or fetch `/{owner}/{name}.git`             | anonymous, through `git http-backend`       |
//! | push to `/{owner}/{name}.git`                    | HTTP Basic auth whose password is the token |
//! | `POST /api/v3/repos/{owner}/{repo}/pulls`        | `Authorization: Bearer <token>` or `token <token>` |
//!
//! Pull requests are recorded for assertions; they are never merged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::process::Command;

/// A pull request as the stand-in received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub owner: String,
    pub repo: String,
    pub number: u64,
    pub title: String,
    pub body: String,
    /// The head as the client sent it (`branch`, or `owner:branch`).
    pub head: String,
    pub base: String,
    pub html_url: String,
    /// The `Authorization` header the request presented.
    pub authorization: Option<String>,
}

struct Shared {
    token: String,
    address: SocketAddr,
    /// `GIT_PROJECT_ROOT`: holds `owner/name.git`.
    root: PathBuf,
    pull_requests: Mutex<Vec<PullRequest>>,
}

impl Shared {
    fn repo_dir(&self, owner: &str, name: &str) -> PathBuf {
        self.root.join(owner).join(format!("{name}.git"))
    }
}

/// A running stand-in forge on a loopback port; its repositories vanish when it is dropped.
pub struct ForgeStandin {
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
    /// The repositories, removed once the server is aborted (`drop` runs before the fields go).
    _root: tempfile::TempDir,
}

impl ForgeStandin {
    /// Starts on 127.0.0.1 on a free port; pushes and API calls must present `token`.
    pub async fn start(token: &str) -> std::io::Result<ForgeStandin> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let root = tempfile::Builder::new().prefix("forge-standin").tempdir()?;
        let shared = Arc::new(Shared {
            token: token.to_owned(),
            address: listener.local_addr()?,
            root: root.path().to_owned(),
            pull_requests: Mutex::default(),
        });
        let app = Router::new()
            .route(
                "/api/v3/repos/{owner}/{repo}/pulls",
                post(open_pull_request),
            )
            .fallback(git_http)
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(ForgeStandin {
            shared,
            server,
            _root: root,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.shared.address
    }

    /// Makes a bare repository `owner/name` whose `main` branch has one commit holding `files`
    /// (path, content; paths may name directories). Returns its clone URL.
    pub async fn create_repo(&self, owner: &str, name: &str, files: &[(&str, &[u8])]) -> String {
        assert!(
            is_plain_name(owner) && is_plain_name(name),
            "a repository is named by plain names, not {owner:?}/{name:?}"
        );
        let repo = self.repo_dir(owner, name);
        assert!(!repo.exists(), "repository {owner}/{name} already exists");
        tokio::fs::create_dir_all(repo.parent().unwrap())
            .await
            .unwrap();
        git(
            &repo,
            &[],
            &["init", "--quiet", "--bare", "--initial-branch=main"],
        )
        .await;

        // The commit is built with a scratch index and work tree, so the bare repository gets
        // nothing but the objects and the branch.
        let scratch = tempfile::tempdir().expect("a scratch directory");
        let work = scratch.path().join("work");
        tokio::fs::create_dir_all(&work).await.unwrap();
        for (path, content) in files {
            let relative = Path::new(path);
            assert!(
                relative.is_relative()
                    && relative
                        .components()
                        .all(|part| matches!(part, std::path::Component::Normal(_))),
                "a file of the repository has a plain relative path, not {path:?}"
            );
            let file = work.join(relative);
            tokio::fs::create_dir_all(file.parent().unwrap())
                .await
                .unwrap();
            tokio::fs::write(&file, content).await.unwrap();
        }
        let index = scratch.path().join("index");
        let index = index.to_str().expect("a UTF-8 temporary path");
        let work_tree = format!("--work-tree={}", work.display());
        let scratch_index = [("GIT_INDEX_FILE", index)];
        git(&repo, &scratch_index, &[&work_tree, "add", "--all"]).await;
        let tree = git(&repo, &scratch_index, &["write-tree"]).await;
        let author = [
            ("GIT_AUTHOR_NAME", "Forge Stand-in"),
            ("GIT_AUTHOR_EMAIL", "forge@standin.invalid"),
            ("GIT_COMMITTER_NAME", "Forge Stand-in"),
            ("GIT_COMMITTER_EMAIL", "forge@standin.invalid"),
        ];
        let commit = git(
            &repo,
            &author,
            &["commit-tree", &tree, "-m", "Initial commit"],
        )
        .await;
        git(&repo, &[], &["update-ref", "refs/heads/main", &commit]).await;
        self.repo_url(owner, name)
    }

    /// The clone URL of `owner/name`: `http://127.0.0.1:PORT/owner/name.git`.
    pub fn repo_url(&self, owner: &str, name: &str) -> String {
        format!("http://{}/{owner}/{name}.git", self.shared.address)
    }

    /// The base URL of the REST API, as GitHub Enterprise has it: `http://127.0.0.1:PORT/api/v3`.
    pub fn api_url(&self) -> String {
        format!("http://{}/api/v3", self.shared.address)
    }

    /// The commit `branch` points at, if the branch exists.
    pub async fn branch_commit(&self, owner: &str, name: &str, branch: &str) -> Option<String> {
        branch_commit(&self.repo_dir(owner, name), branch).await
    }

    /// Where the bare repository lies on disk, for `git -C` assertions.
    pub fn repo_dir(&self, owner: &str, name: &str) -> PathBuf {
        self.shared.repo_dir(owner, name)
    }

    /// Refuses every push to `owner/name` from now on, as a protected repository would: its
    /// pre-receive hook declines with a message.
    pub async fn refuse_pushes(&self, owner: &str, name: &str) {
        use std::os::unix::fs::OpenOptionsExt;
        let hook = self.repo_dir(owner, name).join("hooks/pre-receive");
        let script = format!(
            "#!/bin/sh\necho 'forge stand-in: pushes to {owner}/{name} are refused' >&2\nexit 1\n"
        );
        // git runs a hook only when it is executable.
        tokio::task::spawn_blocking(move || {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o755)
                .open(&hook)
                .unwrap_or_else(|err| panic!("cannot write {}: {err}", hook.display()));
            std::io::Write::write_all(&mut file, script.as_bytes()).unwrap();
        })
        .await
        .unwrap();
    }

    /// The pull requests opened so far, in order.
    pub fn pull_requests(&self) -> Vec<PullRequest> {
        self.shared.pull_requests.lock().unwrap().clone()
    }
}

impl Drop for ForgeStandin {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A name a URL path segment and a directory can both carry as is.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// A git command that reads no configuration but the repository's own, so that the machine's
/// and the user's settings cannot change what the forge does.
fn git_command() -> Command {
    let mut command = Command::new("git");
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs git on the bare repository `repo` and returns its trimmed output; fails the test if git
/// fails.
async fn git(repo: &Path, env: &[(&str, &str)], args: &[&str]) -> String {
    let output = git_command()
        .arg(format!("--git-dir={}", repo.display()))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("git runs");
    assert!(
        output.status.success(),
        "git {args:?} in {} failed: {}",
        repo.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

async fn branch_commit(repo: &Path, branch: &str) -> Option<String> {
    if !repo.is_dir() {
        return None;
    }
    let output = git_command()
        .arg(format!("--git-dir={}", repo.display()))
        .args(["rev-parse", "--verify", "--quiet"])
        .arg(format!("refs/heads/{branch}^{{commit}}"))
        .output()
        .await
        .expect("git runs");
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Every request that is not the REST API: git's smart HTTP for `/{owner}/{name}.git/...`.
async fn git_http(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Some((owner, name, rest)) = split_repo_path(parts.uri.path()) else {
        return text(StatusCode::NOT_FOUND, "Not Found");
    };
    let repo = shared.repo_dir(owner, name);
    if !repo.is_dir() {
        return text(StatusCode::NOT_FOUND, "Repository not found");
    }
    let query = parts.uri.query().unwrap_or("");
    let pushing = rest == "git-receive-pack"
        || (rest == "info/refs"
            && query
                .split('&')
                .any(|pair| pair == "service=git-receive-pack"));
    let user = basic_user(&parts.headers, &shared.token);
    if pushing && user.is_none() {
        // What GitHub answers too: git then asks its credential helpers, or gives up with
        // "Authentication failed" when the credentials it sent were refused.
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(header::WWW_AUTHENTICATE, "Basic realm=\"forge\"")
            .body(Body::from("Authentication required\n"))
            .unwrap();
    }
    // The whole body, whatever its length and however it came (git sends large pushes
    // chunked); http-backend then reads exactly CONTENT_LENGTH bytes.
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return text(StatusCode::BAD_REQUEST, "Unreadable request body");
    };

    let mut backend = git_command();
    backend
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", &shared.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{owner}/{name}.git/{rest}"))
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("QUERY_STRING", query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // http-backend inflates gzip bodies itself, and speaks protocol v2 when git asks for it.
    for (name, variable) in [
        (header::CONTENT_TYPE.as_str(), "CONTENT_TYPE"),
        (header::CONTENT_ENCODING.as_str(), "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "HTTP_GIT_PROTOCOL"),
    ] {
        if let Some(value) = parts.headers.get(name).and_then(|v| v.to_str().ok()) {
            backend.env(variable, value);
        }
    }
    // http-backend serves pushes when REMOTE_USER is set (and `http.receivepack` is unset, as
    // here); only authenticated requests get this far with one.
    if let Some(user) = user {
        backend.env("REMOTE_USER", user);
    }
    let mut child = match backend.spawn() {
        Ok(child) => child,
        Err(err) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot run git http-backend: {err}"),
            );
        }
    };
    // Written while the output is read, so that neither side waits on a full pipe.
    let mut stdin = child.stdin.take().unwrap();
    let feeding = tokio::spawn(async move {
        // http-backend may answer without reading everything (an error); that is its answer.
        let _ = stdin.write_all(&body).await;
    });
    let output = match child.wait_with_output().await {
        Ok(output) => output,
        Err(err) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("git http-backend failed: {err}"),
            );
        }
    };
    let _ = feeding.await;
    cgi_response(&output.stdout)
}

/// `(owner, name, rest)` of `/{owner}/{name}.git/{rest}` (the `.git` may be left out, as GitHub
/// allows).
fn split_repo_path(path: &str) -> Option<(&str, &str, &str)> {
    let mut segments = path.strip_prefix('/')?.splitn(3, '/');
    let owner = segments.next()?;
    let repo = segments.next()?;
    let rest = segments.next()?;
    let name = repo.strip_suffix(".git").unwrap_or(repo);
    (is_plain_name(owner) && is_plain_name(name) && !rest.is_empty()).then_some((owner, name, rest))
}

/// The user name of HTTP Basic credentials whose password is `token`.
fn basic_user(headers: &HeaderMap, token: &str) -> Option<String> {
    let credentials = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let decoded = String::from_utf8(decode_base64(credentials.trim())?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    // http-backend enables pushes only for a non-empty REMOTE_USER.
    let user = if user.is_empty() { "token" } else { user };
    (password == token).then(|| user.to_owned())
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut decoded = Vec::with_capacity(text.len() * 3 / 4);
    let (mut bits, mut held) = (0u32, 0u32);
    for byte in text.trim_end_matches('=').bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6 | u32::from(value)) & 0xffff;
        held += 6;
        if held >= 8 {
            held -= 8;
            decoded.push((bits >> held) as u8);
        }
    }
    Some(decoded)
}

/// The HTTP response a CGI program wrote: headers (a `Status` header among them) up to a blank
/// line, then the body.
fn cgi_response(output: &[u8]) -> Response {
    let (head, body) = [&b"\r\n\r\n"[..], b"\n\n"]
        .iter()
        .find_map(|blank| {
            output
                .windows(blank.len())
                .position(|window| window == *blank)
                .map(|at| (&output[..at], &output[at + blank.len()..]))
        })
        .unwrap_or((output, &[]));
    let mut response = Response::builder().status(StatusCode::OK);
    for line in String::from_utf8_lossy(head).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().and_then(|code| code.parse().ok());
            response = response.status(code.unwrap_or(500));
        } else {
            response = response.header(name.trim(), value);
        }
    }
    response
        .body(Body::from(Bytes::copy_from_slice(body)))
        .unwrap_or_else(|err| {
            text(
                StatusCode::BAD_GATEWAY,
                &format!("git http-backend answered nonsense: {err}"),
            )
        })
}

fn text(status: StatusCode, message: &str) -> Response {
    (status, format!("{message}\n")).into_response()
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn validation_failed(field: &str, code: &str) -> Response {
    json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({
            "message": "Validation Failed",
            "errors": [{"resource": "PullRequest", "field": field, "code": code}]
        }),
    )
}

/// `POST /api/v3/repos/{owner}/{repo}/pulls`, as GitHub answers it.
async fn open_pull_request(
    State(shared): State<Arc<Shared>>,
    UrlPath((owner, repo)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let presented = authorization.as_deref().and_then(|value| {
        value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("token "))
    });
    if presented != Some(shared.token.as_str()) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"message": "Bad credentials"}),
        );
    }
    let repo_dir = shared.repo_dir(&owner, &repo);
    if !is_plain_name(&owner) || !is_plain_name(&repo) || !repo_dir.is_dir() {
        return json_response(StatusCode::NOT_FOUND, json!({"message": "Not Found"}));
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"message": "Problems parsing JSON"}),
        );
    };
    let field = |name: &str| request[name].as_str().map(str::to_owned);
    let (Some(title), Some(head), Some(base)) = (field("title"), field("head"), field("base"))
    else {
        let missing = ["title", "head", "base"]
            .into_iter()
            .find(|name| field(name).is_none())
            .unwrap();
        return validation_failed(missing, "missing_field");
    };
    // A head in this repository may be named `owner:branch`.
    let head_branch = head
        .strip_prefix(&format!("{owner}:"))
        .unwrap_or(&head)
        .to_owned();
    if branch_commit(&repo_dir, &head_branch).await.is_none() {
        return validation_failed("head", "invalid");
    }
    if branch_commit(&repo_dir, &base).await.is_none() {
        return validation_failed("base", "invalid");
    }

    let pull_request = {
        let mut pull_requests = shared.pull_requests.lock().unwrap();
        let number = pull_requests.len() as u64 + 1;
        let pull_request = PullRequest {
            html_url: format!("http://{}/{owner}/{repo}/pull/{number}", shared.address),
            owner,
            repo,
            number,
            title,
            body: field("body").unwrap_or_default(),
            head,
            base,
            authorization,
        };
        pull_requests.push(pull_request.clone());
        pull_request
    };
    json_response(
        StatusCode::CREATED,
        json!({
            "number": pull_request.number,
            "html_url": pull_request.html_url,
            "state": "open",
            "title": pull_request.title,
            "body": pull_request.body,
            "head": {"ref": head_branch},
            "base": {"ref": pull_request.base},
        }),
    )
}
