//! The driver's HTTP face: the original ClaudeCluster's REST and WebSocket API (port 3000), a
//! few additions of ours, its OpenAPI document, and the web console.
//!
//! Every handler calls the [`DriverService`](crate::service::DriverService)'s gRPC methods with
//! a `tonic::Request` carrying the caller's key, so keys, scopes, quotas, validation and the
//! audit log are the gRPC ones; what this layer adds is the original JSON shapes and one
//! mapping of gRPC status codes to HTTP statuses ([`ApiError`]).

mod console;
mod openapi;
mod routes;
mod shapes;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::service::DriverService;

/// What the handlers share.
pub(crate) struct HttpFace {
    /// Whether the face listens on loopback only: then only loopback names may call it.
    pub loopback: bool,
    pub api: Arc<DriverService>,
    /// For the health probes, which answer without a key.
    pub dispatcher: Arc<Dispatcher>,
    /// Whether this driver leads on its store; a standby refuses the API (503) as gRPC does.
    pub leading: Arc<AtomicBool>,
    pub stop: CancellationToken,
    pub started: Instant,
    pub stats_interval: Duration,
}

/// Serves the HTTP face on `listener` until `stop`.
pub(crate) fn serve(listener: TcpListener, face: Arc<HttpFace>) -> JoinHandle<()> {
    let stop = face.stop.clone();
    let app = routes::router(face);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(err) = served {
            tracing::warn!(error = %err, "the HTTP face stopped");
        }
    })
}

/// Refuses what a web page of another site could make a browser send: a request whose
/// `Origin` is not the driver's own (cross-site request forgery, and WebSockets opened from
/// another site, which browsers allow), and, on loopback, a `Host` that is not a loopback name
/// (DNS rebinding). Without keys on loopback, the default, either would let any page the
/// user visits run agents.
pub(crate) async fn same_origin(
    axum::extract::State(face): axum::extract::State<Arc<HttpFace>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = request.headers();
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if face.loopback && !is_loopback_host(&host) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "this HTTP face listens on loopback: call it as 127.0.0.1, [::1] or localhost, not `{}`",
                host.chars().take(64).collect::<String>()
            ),
        )
        .into_response();
    }
    if let Some(origin) = headers.get(axum::http::header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default().to_ascii_lowercase();
        let authority = origin
            .split_once("://")
            .map(|(_, authority)| authority.trim_end_matches('/'));
        if authority != Some(host.as_str()) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "requests from pages of another origin are refused",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Whether `host` (a `Host` header: name or address, and port) names this machine's loopback.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Binds the HTTP face's address (`driver.http.listen`).
pub(crate) async fn bind(address: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = claudecluster_grpc::bind(address, "driver.http.listen").await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Everything the HTTP face refuses: a status and a message, as `{error, message}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
}

/// The one mapping of the service's gRPC codes to HTTP statuses.
impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let http = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            // A task that has not ended cannot be deleted, a key exists already: the
            // resource's state conflicts with the request.
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Ok | Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(http, status.message())
    }
}

impl From<crate::DriverError> for ApiError {
    fn from(error: crate::DriverError) -> Self {
        ApiError::from(tonic::Status::from(error))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = shapes::ErrorBody {
            error: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

/// The API key a request presents: `Authorization: Bearer <key>`, or `X-API-Key: <key>`;
/// WebSockets may also send `?key=<key>`, since browsers cannot set their headers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Key(Option<String>);

impl Key {
    pub fn from_headers(headers: &HeaderMap) -> Key {
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let api_key = headers
            .get("x-api-key")
            .and_then(|value| value.to_str().ok())
            .map(|key| format!("Bearer {}", key.trim()));
        Key(bearer.or(api_key))
    }

    /// The headers' key, or else the one in the query.
    pub fn or_query(self, query: Option<&str>) -> Key {
        match (self.0, query.map(str::trim).filter(|key| !key.is_empty())) {
            (Some(header), _) => Key(Some(header)),
            (None, Some(key)) => Key(Some(format!("Bearer {key}"))),
            (None, None) => Key(None),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Key {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Key::from_headers(&parts.headers))
    }
}

impl HttpFace {
    /// A gRPC request of `message` presenting `key`, as a client of the DriverService would
    /// send it; refused while this driver is a standby.
    pub fn request<T>(&self, key: &Key, message: T) -> Result<tonic::Request<T>, ApiError> {
        if !self.leading.load(Ordering::Acquire) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this driver is a standby: another driver leads on its store; call that one",
            ));
        }
        let mut request = tonic::Request::new(message);
        if let Some(value) = &key.0 {
            let value = value.parse().map_err(|_| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "the API key holds characters no key has",
                )
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// A JSON body; one that does not parse is 400 with serde's word on where, whatever its
/// content type (scripts often post JSON without saying so).
pub(crate) struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request("the request has no JSON body"));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|err| ApiError::bad_request(format!("the body is not valid JSON here: {err}")))
    }
}

/// Query parameters; ones that do not parse are 400.
pub(crate) struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(query)| Query(query))
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_hosts_are_told_apart_from_names_that_could_point_anywhere() {
        for host in [
            "127.0.0.1:3000",
            "localhost:3000",
            "[::1]:3000",
            "127.0.0.1",
            "localhost",
        ] {
            assert!(super::is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:3000",
            "10.0.0.1:3000",
            "",
            "[::2]:1",
            "localhost.evil.example",
        ] {
            assert!(!super::is_loopback_host(host), "{host}");
        }
    }
}
