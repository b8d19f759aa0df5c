//! The credential proxy: agents talk to the Messages API through the worker, which holds the
//! real credentials. Each agent gets a token of its own as its API key and the proxy as its
//! base URL; the proxy swaps the token for a real credential, streams the answer back
//! unchanged (Server-Sent Events or JSON), and refuses tokens it did not grant or has revoked.
//! A token is revoked when its [`Grant`] is dropped, which is when its agent has ended.
//!
//! Several credentials make a pool, used in turn; one the upstream answers 429 or 529 is set
//! aside for `worker.credentialProxy.coolDown` and the request is sent again with the next.
//!
//! The proxy listens on TCP, for agents on the host's network, and on a Unix socket, for
//! agent containers that have no network at all (`egress: proxy-only`): the socket's
//! directory is mounted into them, and a forwarder on the container's loopback takes the
//! agent's connections there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use claudecluster_config::ModelPrice;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};

use crate::outbound::Endpoint;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_util::sync::CancellationToken;

/// How an upstream credential is presented.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// `x-api-key`.
    ApiKey(String),
    /// `authorization: Bearer`, for an auth token or a Claude subscription (OAuth) token.
    Bearer(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::ApiKey(_) => f.write_str("ApiKey(***)"),
            Credential::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

/// The credentials, and which one is next.
struct Pool {
    credentials: Vec<PooledCredential>,
    next: usize,
}

struct PooledCredential {
    credential: Credential,
    /// Set aside until then, after a 429 or 529.
    resting_until: Option<Instant>,
}

/// What a run spent by the proxy's count: tokens from the upstream's answers, priced by the
/// worker's table, and the budget it may not pass.
#[derive(Default)]
pub struct Meter {
    state: Mutex<MeterState>,
}

#[derive(Default, Clone, Copy)]
struct MeterState {
    input: u64,
    output: u64,
    cache_write: u64,
    cache_read: u64,
    cost_usd: f64,
    budget_usd: Option<f64>,
}

impl Meter {
    /// Requests after `usd` is spent are refused.
    pub fn set_budget(&self, usd: Option<f64>) {
        self.state.lock().expect("meter lock poisoned").budget_usd = usd.filter(|usd| *usd > 0.0);
    }

    /// The tokens counted so far, and their price.
    pub fn usage(&self) -> (claudecluster_proto::v1::TokenUsage, f64) {
        let state = *self.state.lock().expect("meter lock poisoned");
        (
            claudecluster_proto::v1::TokenUsage {
                input_tokens: state.input,
                output_tokens: state.output,
                cache_creation_input_tokens: state.cache_write,
                cache_read_input_tokens: state.cache_read,
            },
            state.cost_usd,
        )
    }

    /// Why no further request may go upstream, when the budget is spent.
    fn spent(&self) -> Option<String> {
        let state = *self.state.lock().expect("meter lock poisoned");
        let budget = state.budget_usd?;
        (state.cost_usd >= budget).then(|| {
            format!(
                "the task's budget of ${budget:.2} (agent.max_budget_usd) is spent: ${:.4} by the worker's count",
                state.cost_usd
            )
        })
    }

    fn add(&self, usage: Usage, price: ModelPrice) {
        let mut state = self.state.lock().expect("meter lock poisoned");
        state.input += usage.input;
        state.output += usage.output;
        state.cache_write += usage.cache_write;
        state.cache_read += usage.cache_read;
        state.cost_usd += (usage.input as f64 * price.input
            + usage.output as f64 * price.output
            + usage.cache_write as f64 * price.cache_write
            + usage.cache_read as f64 * price.cache_read)
            / 1_000_000.0;
    }
}

/// Tokens of one answer.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Usage {
    input: u64,
    output: u64,
    cache_write: u64,
    cache_read: u64,
}

impl Usage {
    /// Reads a `usage` object: `message_start` and JSON answers carry all of it,
    /// `message_delta` the output so far.
    fn read(&mut self, usage: &serde_json::Value) {
        let field = |name: &str| usage.get(name).and_then(serde_json::Value::as_u64);
        if let Some(input) = field("input_tokens") {
            self.input = input;
        }
        if let Some(written) = field("cache_creation_input_tokens") {
            self.cache_write = written;
        }
        if let Some(read) = field("cache_read_input_tokens") {
            self.cache_read = read;
        }
        if let Some(output) = field("output_tokens") {
            self.output = self.output.max(output);
        }
    }
}

/// What a granted token may do; dropped, it is revoked.
pub struct Grant {
    token: String,
    proxy: Arc<CredentialProxy>,
    meter: Arc<Meter>,
}

impl Grant {
    /// What the run holding this grant spent.
    pub fn meter(&self) -> Arc<Meter> {
        self.meter.clone()
    }
}

impl Grant {
    /// The variables that point an agent at the proxy with this grant's token; with hosts to
    /// tunnel to, the proxy is its HTTP(S) proxy too.
    pub fn agent_env(&self) -> Vec<(String, String)> {
        let base = self.proxy.agent_base_url();
        let mut env = vec![
            ("ANTHROPIC_BASE_URL".to_owned(), base.clone()),
            ("ANTHROPIC_API_KEY".to_owned(), self.token.clone()),
        ];
        if !self.proxy.allowed_hosts.is_empty() {
            let through = base.replacen("http://", &format!("http://agent:{}@", self.token), 1);
            env.push(("HTTPS_PROXY".to_owned(), through.clone()));
            env.push(("HTTP_PROXY".to_owned(), through));
            env.push(("NO_PROXY".to_owned(), "127.0.0.1,localhost".to_owned()));
        }
        env
    }
}

/// The token in a `Proxy-Authorization` value: `Bearer <token>`, or Basic with the token as
/// the password.
fn proxy_token(value: &str) -> Option<String> {
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_owned());
    }
    let encoded = value.strip_prefix("Basic ")?.trim();
    let decoded = decode_base64(encoded)?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, token)| token.to_owned())
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::new();
    let mut bits = 0u32;
    let mut count = 0;
    for c in text.bytes().filter(|c| *c != b'=') {
        bits = (bits << 6) | u32::from(value(c)?);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Some(out)
}

/// Whether `host` is `allowed`, or under it when `allowed` starts with a dot.
fn host_matches(host: &str, allowed: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let allowed = allowed.to_ascii_lowercase();
    match allowed.strip_prefix('.') {
        Some(domain) => host == domain || host.ends_with(&allowed),
        None => host == allowed,
    }
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grant(***)")
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.proxy
            .grants
            .lock()
            .expect("proxy lock poisoned")
            .remove(&self.token);
    }
}

/// What the proxy knows of a granted token.
struct GrantRecord {
    /// Who holds it, for logs: a task and attempt, a session, or a warm agent.
    holder: String,
    meter: Arc<Meter>,
}

pub struct CredentialProxy {
    address: SocketAddr,
    /// The base URL agents get, as they reach the proxy.
    agent_url: String,
    upstream: Endpoint,
    credentials: Mutex<Pool>,
    cool_down: Duration,
    prices: std::collections::BTreeMap<String, ModelPrice>,
    /// Hosts agents may open tunnels to (`container.egressAllow`).
    allowed_hosts: Vec<String>,
    grants: Mutex<HashMap<String, GrantRecord>>,
    tls: tokio_rustls::TlsConnector,
    stop: CancellationToken,
    /// The Unix socket agent containers reach the proxy through, once listening; removed when
    /// the proxy stops.
    socket: Mutex<Option<PathBuf>>,
}

/// The directory of the proxy's Unix socket under the worker's workspace root: on the host's
/// file system, as Docker mounts it into agent containers from there.
pub fn socket_dir(workspace_root: &Path) -> PathBuf {
    workspace_root.join(".agent-proxy")
}

/// The socket's file name in [`socket_dir`].
pub const SOCKET_NAME: &str = "proxy.sock";

/// The variables of the worker's environment that hold credentials or say where they go:
/// agents never get them while the proxy runs.
pub const CREDENTIAL_VARIABLES: &[&str] = &[
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "CLAUDE_CODE_OAUTH_TOKEN",
];

impl CredentialProxy {
    /// Starts the proxy on `listener`, forwarding to `upstream` with `credentials`; agents
    /// reach it at `agent_host` (loopback, or a name containers resolve to this host).
    pub fn start(
        listener: TcpListener,
        agent_host: &str,
        upstream: &str,
        credentials: Vec<Credential>,
        cool_down: Duration,
        prices: std::collections::BTreeMap<String, ModelPrice>,
        allowed_hosts: Vec<String>,
    ) -> Result<Arc<CredentialProxy>, String> {
        let address = listener
            .local_addr()
            .map_err(|err| format!("the credential proxy has no address: {err}"))?;
        let upstream = Endpoint::parse(upstream)?;
        let tls = crate::outbound::tls_connector().map_err(|err| format!("the upstream: {err}"))?;
        let proxy = Arc::new(CredentialProxy {
            address,
            agent_url: format!("http://{agent_host}:{}", address.port()),
            upstream,
            credentials: Mutex::new(Pool {
                credentials: credentials
                    .into_iter()
                    .map(|credential| PooledCredential {
                        credential,
                        resting_until: None,
                    })
                    .collect(),
                next: 0,
            }),
            cool_down,
            prices,
            allowed_hosts,
            grants: Mutex::default(),
            tls,
            stop: CancellationToken::new(),
            socket: Mutex::default(),
        });
        tokio::spawn(proxy.clone().serve(listener));
        tracing::info!(address = %address, "credential proxy listening");
        Ok(proxy)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// What agents get as `ANTHROPIC_BASE_URL`.
    pub fn agent_base_url(&self) -> String {
        self.agent_url.clone()
    }

    /// A new token for `holder`, valid until the returned grant is dropped.
    pub fn grant(self: &Arc<Self>, holder: &str) -> Grant {
        let token = format!(
            "cct_{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let meter = Arc::new(Meter::default());
        self.grants.lock().expect("proxy lock poisoned").insert(
            token.clone(),
            GrantRecord {
                holder: holder.to_owned(),
                meter: meter.clone(),
            },
        );
        Grant {
            token,
            proxy: self.clone(),
            meter,
        }
    }

    /// The price of `model`: the longest prefix of the table that matches, else `default`.
    fn price_of(&self, model: &str) -> ModelPrice {
        self.prices
            .iter()
            .filter(|(prefix, _)| model.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .or_else(|| self.prices.get_key_value("default"))
            .map(|(_, price)| *price)
            .unwrap_or_default()
    }

    pub fn stop(&self) {
        self.stop.cancel();
        self.remove_socket();
    }

    /// Listens on a Unix socket in `dir` too, for agent containers without a network. Its
    /// tokens guard it, as they do the TCP port: anyone may connect.
    pub fn listen_for_containers(self: &Arc<Self>, dir: &Path) -> Result<PathBuf, String> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let path = dir.join(SOCKET_NAME);
        let fail = |what: &str, err: std::io::Error| {
            format!(
                "cannot {what} {} for agent containers: {err}",
                path.display()
            )
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|err| fail("make the directory of", err))?;
        // A socket an earlier run left, which nothing listens on any more.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(fail("replace", err)),
        }
        let listener = UnixListener::bind(&path).map_err(|err| fail("listen on", err))?;
        // The agent's user must be able to connect, whichever it is.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
            .map_err(|err| fail("open", err))?;
        *self.socket.lock().expect("proxy lock poisoned") = Some(path.clone());
        tokio::spawn(self.clone().serve_unix(listener));
        tracing::info!(socket = %path.display(), "credential proxy listening for agent containers");
        Ok(path)
    }

    fn remove_socket(&self) {
        if let Some(path) = self.socket.lock().expect("proxy lock poisoned").take() {
            let _ = std::fs::remove_file(path);
        }
    }

    async fn serve(self: Arc<Self>, listener: TcpListener) {
        let listener = &listener;
        let accept = move || async move {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok(stream)
        };
        self.accept_until_stopped("", accept).await;
    }

    async fn serve_unix(self: Arc<Self>, listener: UnixListener) {
        let listener = &listener;
        let accept = move || async move { Ok(listener.accept().await?.0) };
        self.accept_until_stopped(" on its socket", accept).await;
    }

    /// Serves each connection `accept` yields until the proxy stops; `on` says where, in the
    /// warning of a failed accept.
    async fn accept_until_stopped<Connection, Accepted>(
        self: Arc<Self>,
        on: &str,
        mut accept: impl FnMut() -> Accepted,
    ) where
        Accepted: std::future::Future<Output = std::io::Result<Connection>>,
        Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        loop {
            let connection = tokio::select! {
                _ = self.stop.cancelled() => return,
                accepted = accept() => match accepted {
                    Ok(connection) => connection,
                    Err(err) => {
                        tracing::warn!(error = %err, "the credential proxy cannot accept{on}");
                        continue;
                    }
                },
            };
            tokio::spawn(self.clone().serve_connection(connection));
        }
    }

    async fn serve_connection<Connection>(self: Arc<Self>, connection: Connection)
    where
        Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |request| {
            let proxy = self.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(request).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(connection), service)
            .with_upgrades()
            .await;
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<BoxBody<Bytes, hyper::Error>> {
        if request.method() == hyper::Method::CONNECT {
            return self.tunnel(request);
        }
        let presented = request
            .headers()
            .get("x-api-key")
            .and_then(|value| value.to_str().ok())
            .or_else(|| {
                request
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.strip_prefix("Bearer "))
            })
            .map(str::to_owned);
        let granted = presented.as_ref().and_then(|token| {
            self.grants
                .lock()
                .expect("proxy lock poisoned")
                .get(token)
                .map(|grant| (grant.holder.clone(), grant.meter.clone()))
        });
        let Some((holder, meter)) = granted else {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "this token was not granted by the worker, or its run has ended",
            );
        };
        let (parts, body) = request.into_parts();
        // Requests are JSON, small next to answers: kept whole so that one refused for rate
        // can be sent again with another credential.
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("cannot read the request: {err}"),
                );
            }
        };
        if let Some(spent) = meter.spent() {
            tracing::info!(%holder, "refused a request past the task's budget");
            return error_response(StatusCode::BAD_REQUEST, "invalid_request_error", &spent);
        }
        let model = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|request| request.get("model")?.as_str().map(str::to_owned))
            .unwrap_or_default();
        let price = self.price_of(&model);
        let tries = self
            .credentials
            .lock()
            .expect("proxy lock poisoned")
            .credentials
            .len()
            .max(1);
        let mut last = None;
        for _ in 0..tries {
            let credential = self.take_credential();
            match self
                .forward(&parts, body.clone(), credential.as_ref())
                .await
            {
                Ok(response) if matches!(response.status().as_u16(), 429 | 529) && tries > 1 => {
                    if let Some(credential) = &credential {
                        self.rest(credential);
                    }
                    tracing::info!(%holder, status = response.status().as_u16(), "upstream refused a credential for now; trying the next");
                    last = Some(response);
                }
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let metered = MeteredBody {
                        inner: body,
                        scanner: Scanner::default(),
                        meter: meter.clone(),
                        price,
                    };
                    return Response::from_parts(parts, metered.boxed());
                }
                Err(message) => {
                    tracing::warn!(%holder, error = %message, "cannot reach the upstream");
                    return error_response(StatusCode::BAD_GATEWAY, "api_error", &message);
                }
            }
        }
        match last {
            Some(response) => {
                let (parts, body) = response.into_parts();
                Response::from_parts(parts, body.boxed())
            }
            None => error_response(StatusCode::BAD_GATEWAY, "api_error", "no credential"),
        }
    }

    /// A tunnel to an allowed host (`container.egressAllow`), for an agent that presents its
    /// token as `Proxy-Authorization` (Basic with the token as password, or Bearer).
    fn tunnel(&self, request: Request<Incoming>) -> Response<BoxBody<Bytes, hyper::Error>> {
        let presented = request
            .headers()
            .get(hyper::header::PROXY_AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(proxy_token);
        let granted = presented.is_some_and(|token| {
            self.grants
                .lock()
                .expect("proxy lock poisoned")
                .contains_key(&token)
        });
        if !granted {
            return error_response(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "authentication_error",
                "a tunnel needs a token the worker granted, as Proxy-Authorization",
            );
        }
        let Some(authority) = request.uri().authority().cloned() else {
            return error_response(StatusCode::BAD_REQUEST, "invalid_request_error", "no host");
        };
        let host = authority.host().to_owned();
        if !self
            .allowed_hosts
            .iter()
            .any(|allowed| host_matches(&host, allowed))
        {
            tracing::info!(%host, "refused a tunnel to a host not on container.egressAllow");
            return error_response(
                StatusCode::FORBIDDEN,
                "permission_error",
                &format!("`{host}` is not on the worker's container.egressAllow"),
            );
        }
        let port = authority.port_u16().unwrap_or(443);
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(request).await {
                Ok(upgraded) => upgraded,
                Err(err) => {
                    tracing::debug!(error = %err, "a tunnel was not taken up");
                    return;
                }
            };
            let Ok(mut target) = TcpStream::connect((host.as_str(), port)).await else {
                return;
            };
            let mut upgraded = hyper_util::rt::TokioIo::new(upgraded);
            let _ = tokio::io::copy_bidirectional(&mut upgraded, &mut target).await;
        });
        Response::new(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        )
    }

    /// The next credential not resting, in turn; a resting one when all are.
    fn take_credential(&self) -> Option<Credential> {
        let mut pool = self.credentials.lock().expect("proxy lock poisoned");
        let count = pool.credentials.len();
        if count == 0 {
            return None;
        }
        let now = Instant::now();
        let index = (0..count)
            .map(|offset| (pool.next + offset) % count)
            .find(|index| {
                pool.credentials[*index]
                    .resting_until
                    .is_none_or(|until| until <= now)
            })
            .unwrap_or(pool.next % count);
        pool.next = (index + 1) % count;
        Some(pool.credentials[index].credential.clone())
    }

    fn rest(&self, credential: &Credential) {
        let mut pool = self.credentials.lock().expect("proxy lock poisoned");
        if let Some(pooled) = pool
            .credentials
            .iter_mut()
            .find(|pooled| &pooled.credential == credential)
        {
            pooled.resting_until = Some(Instant::now() + self.cool_down);
        }
    }

    async fn forward(
        &self,
        parts: &hyper::http::request::Parts,
        body: Bytes,
        credential: Option<&Credential>,
    ) -> Result<Response<Incoming>, String> {
        let upstream = &self.upstream;
        let path_and_query = parts.uri.path_and_query().map_or("/", |path| path.as_str());
        let mut request = Request::builder()
            .method(parts.method.clone())
            .uri(format!("{}{path_and_query}", upstream.base_path));
        for (name, value) in &parts.headers {
            if !matches!(
                name.as_str(),
                "host" | "x-api-key" | "authorization" | "connection" | "proxy-authorization"
            ) {
                request = request.header(name, value);
            }
        }
        request = request.header(hyper::header::HOST, upstream.host_header());
        request = match credential {
            Some(Credential::ApiKey(key)) => request.header("x-api-key", key),
            Some(Credential::Bearer(token)) => {
                request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            }
            None => request,
        };
        let request = request
            .body(Full::new(body))
            .map_err(|err| format!("cannot build the upstream request: {err}"))?;
        crate::outbound::send(upstream, &self.tls, request).await
    }
}

impl Drop for CredentialProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An answer passed through as it comes, its usage counted on the way.
struct MeteredBody {
    inner: Incoming,
    scanner: Scanner,
    meter: Arc<Meter>,
    price: ModelPrice,
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let data = data.clone();
                    self.scanner.feed(&data);
                }
            }
            std::task::Poll::Ready(None) => {
                let usage = self.scanner.finish();
                let price = self.price;
                self.meter.add(usage, price);
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Finds the usage in an answer: the `data:` lines of Server-Sent Events, or a JSON body.
#[derive(Default)]
struct Scanner {
    line: Vec<u8>,
    /// The body so far, for a JSON answer (not events); given up past a bound.
    whole: Vec<u8>,
    events: bool,
    usage: Usage,
}

/// The most of a JSON answer kept to read its usage.
const JSON_ANSWER_BYTES: usize = 4 << 20;

impl Scanner {
    fn feed(&mut self, data: &[u8]) {
        for &byte in data {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.read_line(&line);
            } else if self.line.len() < JSON_ANSWER_BYTES {
                self.line.push(byte);
            }
        }
        if !self.events && self.whole.len() + data.len() <= JSON_ANSWER_BYTES {
            self.whole.extend_from_slice(data);
        }
    }

    fn read_line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            if line.starts_with(b"event:") {
                self.events = true;
                self.whole.clear();
            }
            return;
        };
        self.events = true;
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        if let Some(usage) = event
            .pointer("/message/usage")
            .or_else(|| event.get("usage"))
        {
            self.usage.read(usage);
        }
    }

    fn finish(&mut self) -> Usage {
        if !self.events
            && let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&self.whole)
            && let Some(usage) = answer.get("usage")
        {
            self.usage.read(usage);
        }
        self.usage
    }
}

/// An error as the Messages API words it, which the CLI reports.
fn error_response(
    status: StatusCode,
    kind: &str,
    message: &str,
) -> Response<BoxBody<Bytes, hyper::Error>> {
    let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("a static response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn credentials_are_used_in_turn_and_a_resting_one_is_passed_over() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = CredentialProxy::start(
            listener,
            "127.0.0.1",
            "http://127.0.0.1:9",
            vec![
                Credential::ApiKey("one".into()),
                Credential::ApiKey("two".into()),
            ],
            Duration::from_secs(60),
            Default::default(),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            proxy.take_credential(),
            Some(Credential::ApiKey("one".into()))
        );
        assert_eq!(
            proxy.take_credential(),
            Some(Credential::ApiKey("two".into()))
        );
        proxy.rest(&Credential::ApiKey("one".into()));
        assert_eq!(
            proxy.take_credential(),
            Some(Credential::ApiKey("two".into()))
        );
        assert_eq!(
            proxy.take_credential(),
            Some(Credential::ApiKey("two".into()))
        );
    }

    #[test]
    fn usage_is_read_from_events_and_from_json_answers() {
        let mut events = Scanner::default();
        events.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":100,\"cache_read_input_tokens\":7,\"output_tokens\":1}}}\n\n");
        events.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":");
        events.feed(b"20}}\n\n");
        assert_eq!(
            events.finish(),
            Usage {
                input: 100,
                output: 20,
                cache_write: 0,
                cache_read: 7
            }
        );
        let mut json = Scanner::default();
        json.feed(br#"{"type":"message","usage":{"input_tokens":5,"output_tokens":3}}"#);
        assert_eq!(json.finish().output, 3);
        let meter = Meter::default();
        meter.set_budget(Some(0.01));
        assert!(meter.spent().is_none());
        meter.add(
            Usage {
                input: 10_000,
                ..Usage::default()
            },
            ModelPrice {
                input: 3.0,
                ..ModelPrice::default()
            },
        );
        assert_eq!(
            meter.spent().unwrap(),
            "the task's budget of $0.01 (agent.max_budget_usd) is spent: $0.0300 by the worker's count"
        );
    }

    /// A proxy on loopback with no credential, forwarding nowhere.
    async fn proxy_without_credentials() -> Arc<CredentialProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        CredentialProxy::start(
            listener,
            "127.0.0.1",
            "http://127.0.0.1:9",
            Vec::new(),
            Duration::from_secs(60),
            Default::default(),
            Vec::new(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn the_socket_for_containers_replaces_a_stale_one_serves_anyone_and_goes_at_stop() {
        use std::os::unix::fs::PermissionsExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let root = tempfile::tempdir().unwrap();
        let dir = socket_dir(root.path());
        // What a killed worker leaves: a socket file nothing listens on.
        std::fs::create_dir_all(&dir).unwrap();
        drop(std::os::unix::net::UnixListener::bind(dir.join(SOCKET_NAME)).unwrap());
        let proxy = proxy_without_credentials().await;
        let path = proxy.listen_for_containers(&dir).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o666, "any agent user may connect");

        let mut connection = tokio::net::UnixStream::connect(&path).await.unwrap();
        connection
            .write_all(b"POST /v1/messages HTTP/1.1\r\nhost: proxy\r\nx-api-key: cct_unknown\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0; 12];
        connection.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, b"HTTP/1.1 401", "a token the proxy did not grant");

        proxy.stop();
        assert!(!path.exists(), "the socket outlived the proxy");
    }

    #[tokio::test]
    async fn a_dropped_grant_is_revoked() {
        let proxy = proxy_without_credentials().await;
        let grant = proxy.grant("task t attempt 1");
        let token = grant.token.clone();
        assert!(proxy.grants.lock().unwrap().contains_key(&token));
        drop(grant);
        assert!(!proxy.grants.lock().unwrap().contains_key(&token));
    }
}
