//! The credential proxy: agents talk to the Messages API through the worker, which holds the
//! real credentials. Each agent gets a token of its own as its API key and the proxy as its
//! base URL; the proxy swaps the token for a real credential, streams the answer back
//! unchanged (Server-Sent Events or JSON), and refuses tokens it did not grant or has revoked.
//! A token is revoked when its [`Grant`] is dropped, which is when its agent has ended.
//!
//! Several credentials make a pool, used in turn; one the upstream answers 429 or 529 is set
//! aside for `worker.credentialProxy.coolDown` and the request is sent again with the next.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use tokio::net::{TcpListener, TcpStream};
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

/// Where requests go: `http` or `https`, host, port, and a path prefix.
#[derive(Debug, Clone)]
struct Upstream {
    tls: bool,
    host: String,
    port: u16,
    base_path: String,
}

impl Upstream {
    fn parse(url: &str) -> Result<Upstream, String> {
        let uri: Uri = url
            .parse()
            .map_err(|err| format!("`{url}` is not a URL: {err}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("`{url}` must start with http:// or https://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("`{url}` names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Upstream {
            tls,
            port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            host,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

struct PooledCredential {
    credential: Credential,
    /// Set aside until then, after a 429 or 529.
    resting_until: Option<Instant>,
}

/// What a granted token may do; dropped, it is revoked.
pub struct Grant {
    token: String,
    proxy: Arc<CredentialProxy>,
}

impl Grant {
    /// The variables that point an agent at the proxy with this grant's token.
    pub fn agent_env(&self) -> Vec<(String, String)> {
        vec![
            ("ANTHROPIC_BASE_URL".to_owned(), self.proxy.agent_base_url()),
            ("ANTHROPIC_API_KEY".to_owned(), self.token.clone()),
        ]
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
}

pub struct CredentialProxy {
    address: SocketAddr,
    /// The base URL agents get, as they reach the proxy.
    agent_url: String,
    upstream: Upstream,
    credentials: Mutex<Vec<PooledCredential>>,
    next_credential: Mutex<usize>,
    cool_down: Duration,
    grants: Mutex<HashMap<String, GrantRecord>>,
    tls: tokio_rustls::TlsConnector,
    stop: CancellationToken,
}

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
    ) -> Result<Arc<CredentialProxy>, String> {
        let address = listener
            .local_addr()
            .map_err(|err| format!("the credential proxy has no address: {err}"))?;
        let upstream = Upstream::parse(upstream)?;
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls_config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("cannot set up TLS to the upstream: {err}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let proxy = Arc::new(CredentialProxy {
            address,
            agent_url: format!("http://{agent_host}:{}", address.port()),
            upstream,
            credentials: Mutex::new(
                credentials
                    .into_iter()
                    .map(|credential| PooledCredential {
                        credential,
                        resting_until: None,
                    })
                    .collect(),
            ),
            next_credential: Mutex::new(0),
            cool_down,
            grants: Mutex::default(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls_config)),
            stop: CancellationToken::new(),
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
        self.grants.lock().expect("proxy lock poisoned").insert(
            token.clone(),
            GrantRecord {
                holder: holder.to_owned(),
            },
        );
        Grant {
            token,
            proxy: self.clone(),
        }
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let stream = tokio::select! {
                _ = self.stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::warn!(error = %err, "the credential proxy cannot accept");
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let proxy = proxy.clone();
                    async move { Ok::<_, std::convert::Infallible>(proxy.handle(request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<BoxBody<Bytes, hyper::Error>> {
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
        let holder = presented.as_ref().and_then(|token| {
            self.grants
                .lock()
                .expect("proxy lock poisoned")
                .get(token)
                .map(|grant| grant.holder.clone())
        });
        let Some(holder) = holder else {
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
        let tries = self
            .credentials
            .lock()
            .expect("proxy lock poisoned")
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
                    return Response::from_parts(parts, body.boxed());
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

    /// The next credential not resting, in turn; a resting one when all are.
    fn take_credential(&self) -> Option<Credential> {
        let credentials = self.credentials.lock().expect("proxy lock poisoned");
        if credentials.is_empty() {
            return None;
        }
        let mut next = self.next_credential.lock().expect("proxy lock poisoned");
        let now = Instant::now();
        for offset in 0..credentials.len() {
            let index = (*next + offset) % credentials.len();
            let pooled = &credentials[index];
            if pooled.resting_until.is_none_or(|until| until <= now) {
                *next = (index + 1) % credentials.len();
                return Some(pooled.credential.clone());
            }
        }
        let index = *next % credentials.len();
        *next = (index + 1) % credentials.len();
        Some(credentials[index].credential.clone())
    }

    fn rest(&self, credential: &Credential) {
        let mut credentials = self.credentials.lock().expect("proxy lock poisoned");
        if let Some(pooled) = credentials
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
        let host =
            if (upstream.tls && upstream.port == 443) || (!upstream.tls && upstream.port == 80) {
                upstream.host.clone()
            } else {
                format!("{}:{}", upstream.host, upstream.port)
            };
        request = request.header(hyper::header::HOST, host);
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
        let stream = TcpStream::connect((upstream.host.as_str(), upstream.port))
            .await
            .map_err(|err| {
                format!(
                    "cannot connect to {}:{}: {err}",
                    upstream.host, upstream.port
                )
            })?;
        let _ = stream.set_nodelay(true);
        if upstream.tls {
            let name = rustls_pki_types::ServerName::try_from(upstream.host.clone())
                .map_err(|err| format!("`{}` is not a server name: {err}", upstream.host))?;
            let stream = self
                .tls
                .connect(name, stream)
                .await
                .map_err(|err| format!("TLS to {} failed: {err}", upstream.host))?;
            send(hyper_util::rt::TokioIo::new(stream), request).await
        } else {
            send(hyper_util::rt::TokioIo::new(stream), request).await
        }
    }
}

impl Drop for CredentialProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Sends one request on a connection of its own.
async fn send<T>(io: T, request: Request<Full<Bytes>>) -> Result<Response<Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|err| format!("the upstream did not speak HTTP: {err}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|err| format!("the upstream did not answer: {err}"))
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

    #[test]
    fn upstream_urls_are_read_with_their_defaults() {
        let anthropic = Upstream::parse("https://api.anthropic.com").unwrap();
        assert!(anthropic.tls);
        assert_eq!(
            (anthropic.host.as_str(), anthropic.port),
            ("api.anthropic.com", 443)
        );
        let local = Upstream::parse("http://127.0.0.1:8080/base/").unwrap();
        assert!(!local.tls);
        assert_eq!(local.port, 8080);
        assert_eq!(local.base_path, "/base");
        assert!(Upstream::parse("ftp://x").is_err());
    }

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

    #[tokio::test]
    async fn a_dropped_grant_is_revoked() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = CredentialProxy::start(
            listener,
            "127.0.0.1",
            "http://127.0.0.1:9",
            Vec::new(),
            Duration::from_secs(60),
        )
        .unwrap();
        let grant = proxy.grant("task t attempt 1");
        let token = grant.token.clone();
        assert!(proxy.grants.lock().unwrap().contains_key(&token));
        drop(grant);
        assert!(!proxy.grants.lock().unwrap().contains_key(&token));
    }
}
