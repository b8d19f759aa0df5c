//! A real headless browser (Debian's `chromium`) driven over the DevTools protocol: load a
//! page, run script in it, collect what it logs as errors, take screenshots.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// The browser: `CHROMIUM` when set, else Debian's `chromium`.
pub fn chromium_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("chromium"))
        .find(|path| path.exists());
    found.unwrap_or_else(|| {
        panic!("chromium is missing: run scripts/setup.sh (it installs Debian's chromium)")
    })
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A headless chromium with one page, ended (with its helper processes) when dropped.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    commands: mpsc::UnboundedSender<Message>,
    pending: Pending,
    next_id: AtomicU64,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Browser {
    pub async fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium_bin())
            .args([
                "--headless",
                // Root (as in CI) cannot use the sandbox.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--window-size=1400,1000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so that its helpers end with it.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start chromium: {err}"));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let browser_url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("chromium exited before it listened for DevTools")
        })
        .await
        .expect("chromium listens for DevTools within 30 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        // ws://127.0.0.1:PORT/devtools/browser/ID: the page's socket is listed on that port.
        let host = browser_url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let targets = crate::http::get(&format!("http://{host}/json/list"))
            .await
            .json();
        let page_url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|target| target["type"] == "page")
            .and_then(|target| target["webSocketDebuggerUrl"].as_str())
            .expect("chromium has a page")
            .to_owned();
        let (socket, _) = tokio_tungstenite::connect_async(&page_url)
            .await
            .expect("connect to the page's DevTools");
        let (mut sink, mut stream) = socket.split();
        let (commands, mut outgoing) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(message) = outgoing.recv().await {
                if sink.send(message).await.is_err() {
                    return;
                }
            }
        });
        let pending: Pending = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        {
            let (pending, errors) = (pending.clone(), errors.clone());
            tokio::spawn(async move {
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let value: Value = serde_json::from_str(&text).unwrap_or_default();
                    if let Some(id) = value["id"].as_u64() {
                        if let Some(waiter) = pending.lock().unwrap().remove(&id) {
                            let _ = waiter.send(value);
                        }
                        continue;
                    }
                    if let Some(error) = page_error(&value) {
                        errors.lock().unwrap().push(error);
                    }
                }
            });
        }
        let browser = Browser {
            child,
            _profile: profile,
            commands,
            pending,
            next_id: AtomicU64::new(1),
            errors,
        };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            browser.call(domain, json!({})).await;
        }
        browser
    }

    /// Calls a DevTools method; its result, or a panic with its error.
    pub async fn call(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, answer);
        let command = json!({"id": id, "method": method, "params": params});
        self.commands
            .send(Message::text(command.to_string()))
            .expect("the DevTools connection is open");
        let answer = tokio::time::timeout(Duration::from_secs(30), answered)
            .await
            .unwrap_or_else(|_| panic!("{method} was not answered within 30 s"))
            .expect("the DevTools connection answered");
        if let Some(error) = answer.get("error") {
            panic!("{method} failed: {error}");
        }
        answer["result"].clone()
    }

    /// Loads `url` and waits until its document has loaded.
    pub async fn open(&self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        crate::wait_until(Duration::from_secs(30), || async {
            self.eval("document.readyState === 'complete'").await == json!(true)
        })
        .await
        .expect("the page loads within 30 s");
    }

    /// The value of `expression` in the page (awaited when it is a promise). An exception
    /// fails the test.
    pub async fn eval(&self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("`{expression}` threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Errors the page logged or threw so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Saves a PNG of the page at `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("a screenshot"))
            .expect("base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

/// An error a page reported: a console error, an uncaught exception, or a browser log entry
/// of level error (a resource that failed to load, a refused WebSocket).
fn page_error(event: &Value) -> Option<String> {
    let params = &event["params"];
    match event["method"].as_str()? {
        "Runtime.consoleAPICalled"
            if matches!(params["type"].as_str(), Some("error" | "assert")) =>
        {
            Some(format!("console.{}: {}", params["type"], params["args"]))
        }
        "Runtime.exceptionThrown" => Some(format!(
            "uncaught: {}",
            params["exceptionDetails"]["exception"]["description"]
        )),
        "Log.entryAdded" if params["entry"]["level"] == "error" => Some(format!(
            "log: {} ({})",
            params["entry"]["text"], params["entry"]["url"]
        )),
        _ => None,
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromium's zygote and renderers are its children.
        if let Some(pid) = self.child.id() {
            crate::send_signal_to_group(pid, libc::SIGKILL);
        }
    }
}
