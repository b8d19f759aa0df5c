//! The stand-in forge serves its repositories to the real git over smart HTTP (anonymous
//! reads, pushes with the token only) and answers the pull-request endpoint as GitHub does.

use std::path::Path;
use std::process::Output;

use claudecluster_integration_tests::forge::ForgeStandin;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const TOKEN: &str = "ghs_standin_token";

/// git as a test runs it: no prompts, and no configuration of the machine or the user.
struct Git {
    home: tempfile::TempDir,
}

impl Git {
    fn new() -> Self {
        Git {
            home: tempfile::tempdir().unwrap(),
        }
    }

    /// The scratch directory clones go to.
    fn dir(&self) -> &Path {
        self.home.path()
    }

    async fn run(&self, dir: &Path, args: &[&str]) -> Output {
        Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("GIT_CONFIG_GLOBAL")
            .env_remove("GIT_ASKPASS")
            .env_remove("SSH_ASKPASS")
            .env("GIT_AUTHOR_NAME", "Test")
            .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
            .env("GIT_COMMITTER_NAME", "Test")
            .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
            .output()
            .await
            .unwrap()
    }

    /// Runs git and returns its trimmed output; fails the test if git fails.
    async fn ok(&self, dir: &Path, args: &[&str]) -> String {
        let output = self.run(dir, args).await;
        assert!(
            output.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Clones `url` into `name` and commits a new file on a new branch `branch`; returns the
    /// clone's directory and the commit.
    async fn commit_on_branch(&self, url: &str, name: &str, branch: &str) -> (String, String) {
        self.ok(self.dir(), &["clone", "--quiet", url, name]).await;
        let clone = self.dir().join(name);
        self.ok(&clone, &["checkout", "--quiet", "-b", branch])
            .await;
        std::fs::write(clone.join("change.txt"), "a change\n").unwrap();
        self.ok(&clone, &["add", "change.txt"]).await;
        self.ok(&clone, &["commit", "--quiet", "-m", "A change"])
            .await;
        let commit = self.ok(&clone, &["rev-parse", "HEAD"]).await;
        (clone.to_str().unwrap().to_owned(), commit)
    }

    /// Pushes `branch` of `clone` to `remote` (a URL, or `origin`) presenting `authorization`
    /// as an extra header, if any.
    async fn push(
        &self,
        clone: &str,
        remote: &str,
        branch: &str,
        authorization: Option<&str>,
    ) -> Output {
        let header = authorization.map(|value| format!("http.extraHeader=Authorization: {value}"));
        let mut args = Vec::new();
        if let Some(header) = &header {
            args.extend(["-c", header.as_str()]);
        }
        args.extend(["push", remote, branch]);
        self.run(Path::new(clone), &args).await
    }
}

/// What git presents for an installation token over HTTPS.
fn basic(user: &str, password: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for chunk in format!("{user}:{password}").as_bytes().chunks(3) {
        let bits = chunk.iter().enumerate().fold(0u32, |bits, (at, &byte)| {
            bits | u32::from(byte) << (16 - 8 * at)
        });
        for at in 0..4 {
            encoded.push(if at <= chunk.len() {
                ALPHABET[(bits >> (18 - 6 * at) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    format!("Basic {encoded}")
}

/// Posts `body` to the forge's pull-request endpoint of `owner/repo`; the status and the JSON
/// answer.
async fn open_pull_request(
    forge: &ForgeStandin,
    owner: &str,
    repo: &str,
    authorization: &str,
    body: Value,
) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(forge.address())
        .await
        .unwrap();
    let body = body.to_string();
    let url = format!("{}/repos/{owner}/{repo}/pulls", forge.api_url());
    let path = url
        .strip_prefix(&format!("http://{}", forge.address()))
        .unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {}\r\nauthorization: {authorization}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        forge.address(),
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    (status, serde_json::from_str(body).unwrap())
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn a_created_repository_clones_anonymously_with_its_files() {
    let forge = ForgeStandin::start(TOKEN).await.unwrap();
    let url = forge
        .create_repo(
            "acme",
            "widgets",
            &[
                ("README.md", b"# Widgets\n"),
                ("src/deep/lib.rs", b"pub fn widget() {}\n"),
            ],
        )
        .await;
    assert_eq!(url, forge.repo_url("acme", "widgets"));
    assert!(url.starts_with("http://127.0.0.1:") && url.ends_with("/acme/widgets.git"));

    let git = Git::new();
    git.ok(git.dir(), &["clone", "--quiet", &url, "widgets"])
        .await;
    let clone = git.dir().join("widgets");
    assert_eq!(
        std::fs::read_to_string(clone.join("README.md")).unwrap(),
        "# Widgets\n"
    );
    assert_eq!(
        std::fs::read_to_string(clone.join("src/deep/lib.rs")).unwrap(),
        "pub fn widget() {}\n"
    );
    assert_eq!(git.ok(&clone, &["branch", "--show-current"]).await, "main");
    assert_eq!(git.ok(&clone, &["rev-list", "--count", "HEAD"]).await, "1");
    assert_eq!(
        forge.branch_commit("acme", "widgets", "main").await,
        Some(git.ok(&clone, &["rev-parse", "HEAD"]).await)
    );
    assert_eq!(forge.branch_commit("acme", "widgets", "absent").await, None);
    assert_eq!(forge.branch_commit("acme", "absent", "main").await, None);
}

#[tokio::test]
async fn a_push_with_the_token_creates_the_branch() {
    let forge = ForgeStandin::start(TOKEN).await.unwrap();
    let url = forge
        .create_repo("acme", "widgets", &[("README.md", b"hello\n")])
        .await;
    let git = Git::new();
    let (clone, commit) = git.commit_on_branch(&url, "widgets", "feature").await;

    let pushed = git
        .push(
            &clone,
            "origin",
            "feature",
            Some(&basic("x-access-token", TOKEN)),
        )
        .await;
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert_eq!(
        forge.branch_commit("acme", "widgets", "feature").await,
        Some(commit.clone())
    );
    let on_disk = git
        .ok(
            &forge.repo_dir("acme", "widgets"),
            &["log", "-1", "--format=%H %s", "feature"],
        )
        .await;
    assert_eq!(on_disk, format!("{commit} A change"));

    // The token as the password of credentials in the URL, as git's credential helpers give it.
    git.ok(Path::new(&clone), &["checkout", "--quiet", "-b", "second"])
        .await;
    let in_url = url.replace("http://", &format!("http://x-access-token:{TOKEN}@"));
    let pushed = git.push(&clone, &in_url, "second", None).await;
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert_eq!(
        forge.branch_commit("acme", "widgets", "second").await,
        Some(commit)
    );
}

#[tokio::test]
async fn a_push_larger_than_gits_post_buffer_arrives_whole() {
    let forge = ForgeStandin::start(TOKEN).await.unwrap();
    let url = forge
        .create_repo("acme", "widgets", &[("README.md", b"hello\n")])
        .await;
    let git = Git::new();
    git.ok(git.dir(), &["clone", "--quiet", &url, "widgets"])
        .await;
    let clone = git.dir().join("widgets");
    // Incompressible, and more than git's 1 MiB post buffer: git sends the pack chunked.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..3 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(clone.join("noise.bin"), &noise).unwrap();
    git.ok(&clone, &["add", "noise.bin"]).await;
    git.ok(&clone, &["commit", "--quiet", "-m", "Noise"]).await;
    let commit = git.ok(&clone, &["rev-parse", "HEAD"]).await;

    let pushed = git
        .push(
            clone.to_str().unwrap(),
            "origin",
            "main",
            Some(&basic("x-access-token", TOKEN)),
        )
        .await;
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert_eq!(
        forge.branch_commit("acme", "widgets", "main").await,
        Some(commit)
    );
    let stored = git
        .ok(
            &forge.repo_dir("acme", "widgets"),
            &["cat-file", "-s", "main:noise.bin"],
        )
        .await;
    assert_eq!(stored, noise.len().to_string());
}

#[tokio::test]
async fn a_push_without_the_token_is_refused_for_authentication() {
    let forge = ForgeStandin::start(TOKEN).await.unwrap();
    let url = forge
        .create_repo("acme", "widgets", &[("README.md", b"hello\n")])
        .await;
    let git = Git::new();
    let (clone, _) = git.commit_on_branch(&url, "widgets", "feature").await;

    // Without credentials from its own credential system (an extra header is not one), git
    // can only ask for a user name, which it may not; credentials in the URL that the forge
    // refuses make it give up with "Authentication failed".
    let anonymous = git.push(&clone, "origin", "feature", None).await;
    let wrong_header = git
        .push(
            &clone,
            "origin",
            "feature",
            Some(&basic("x-access-token", "wrong")),
        )
        .await;
    let wrong_in_url = url.replace("http://", "http://x-access-token:wrong@");
    let wrong_credentials = git.push(&clone, &wrong_in_url, "feature", None).await;
    for (refused, message) in [
        (anonymous, "could not read Username"),
        (wrong_header, "could not read Username"),
        (wrong_credentials, "Authentication failed"),
    ] {
        assert!(!refused.status.success());
        assert!(stderr(&refused).contains(message), "{}", stderr(&refused));
    }
    assert_eq!(
        forge.branch_commit("acme", "widgets", "feature").await,
        None
    );
}

#[tokio::test]
async fn a_repository_that_refuses_pushes_refuses_even_the_token() {
    let forge = ForgeStandin::start(TOKEN).await.unwrap();
    let url = forge
        .create_repo("acme", "widgets", &[("README.md", b"hello\n")])
        .await;
    forge.refuse_pushes("acme", "widgets").await;
    let git = Git::new();
    let (clone, _) = git.commit_on_branch(&url, "widgets", "feature").await;

    let refused = git
        .push(
            &clone,
            "origin",
            "feature",
            Some(&basic("x-access-token", TOKEN)),
        )
        .await;
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains("pushes to acme/widgets are refused")
            && message.contains("pre-receive hook declined"),
        "{message}"
    );
    assert_eq!(
        forge.branch_commit("acme", "widgets", "feature").await,
        None
    );
}

#[tokio::test]
async fn the_pulls_endpoint_opens_and_records_pull_requests() {
    let forge = ForgeStandin::start(TOKEN).await.unwrap();
    let url = forge
        .create_repo("acme", "widgets", &[("README.md", b"hello\n")])
        .await;
    let git = Git::new();
    let (clone, _) = git.commit_on_branch(&url, "widgets", "feature").await;
    let pushed = git
        .push(
            &clone,
            "origin",
            "feature",
            Some(&basic("x-access-token", TOKEN)),
        )
        .await;
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let request = json!({"title": "A change", "head": "feature", "base": "main", "body": "Why"});

    let (status, answer) = open_pull_request(
        &forge,
        "acme",
        "widgets",
        &format!("Bearer {TOKEN}"),
        request.clone(),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let html_url = format!("http://{}/acme/widgets/pull/1", forge.address());
    assert_eq!(answer["number"], 1);
    assert_eq!(answer["html_url"], html_url.as_str());
    assert_eq!(answer["state"], "open");
    assert_eq!(answer["head"]["ref"], "feature");
    assert_eq!(answer["base"]["ref"], "main");
    let (status, answer) = open_pull_request(
        &forge,
        "acme",
        "widgets",
        &format!("token {TOKEN}"),
        request.clone(),
    )
    .await;
    assert_eq!((status, answer["number"].as_u64()), (201, Some(2)));

    let recorded = forge.pull_requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(
        (
            recorded[0].owner.as_str(),
            recorded[0].repo.as_str(),
            recorded[0].number
        ),
        ("acme", "widgets", 1)
    );
    assert_eq!(
        (
            recorded[0].title.as_str(),
            recorded[0].body.as_str(),
            recorded[0].head.as_str(),
            recorded[0].base.as_str()
        ),
        ("A change", "Why", "feature", "main")
    );
    assert_eq!(recorded[0].html_url, html_url);
    assert_eq!(recorded[0].authorization, Some(format!("Bearer {TOKEN}")));
}

#[tokio::test]
async fn the_pulls_endpoint_refuses_a_wrong_token_an_unknown_repository_and_a_missing_branch() {
    let forge = ForgeStandin::start(TOKEN).await.unwrap();
    forge
        .create_repo("acme", "widgets", &[("README.md", b"hello\n")])
        .await;
    let request = json!({"title": "A change", "head": "feature", "base": "main", "body": ""});
    let bearer = format!("Bearer {TOKEN}");

    let (status, answer) =
        open_pull_request(&forge, "acme", "widgets", "Bearer wrong", request.clone()).await;
    assert_eq!(
        (status, answer),
        (401, json!({"message": "Bad credentials"}))
    );
    let (status, answer) =
        open_pull_request(&forge, "acme", "gadgets", &bearer, request.clone()).await;
    assert_eq!((status, answer), (404, json!({"message": "Not Found"})));
    let (status, answer) =
        open_pull_request(&forge, "acme", "widgets", &bearer, request.clone()).await;
    assert_eq!(status, 422);
    assert_eq!(
        answer,
        json!({
            "message": "Validation Failed",
            "errors": [{"resource": "PullRequest", "field": "head", "code": "invalid"}]
        })
    );
    assert!(forge.pull_requests().is_empty());
}
