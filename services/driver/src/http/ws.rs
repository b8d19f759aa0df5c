//! The WebSockets: a task's progress (its event log, replayed and followed) and the cluster's
//! stats. Each checks its caller and its subject before the upgrade, so a refusal is a plain
//! HTTP status (401, 404, ...) rather than a socket that closes at once.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use claudecluster_proto::v1::driver_service_server::DriverService as _;
use claudecluster_proto::v1::*;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, frame::coding::CloseCode};
use utoipa::IntoParams;

use super::shapes::{self, ErrorBody, Frame, Outcome};
use super::{ApiError, HttpFace, Key, Query};

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Answers a WebSocket handshake and runs `serve` on the socket once upgraded.
fn upgrade<F, Fut>(mut request: Request, serve: F) -> Result<Response, ApiError>
where
    F: FnOnce(Socket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let headers = request.headers();
    let asks_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    let version_13 = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|value| value == "13");
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "this is a WebSocket: connect with a WebSocket client",
        ));
    };
    if !asks_upgrade || !version_13 {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "this is a WebSocket (version 13): connect with a WebSocket client",
        ));
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrading = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrading.await {
            Ok(upgraded) => {
                let socket =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                serve(socket).await;
            }
            Err(err) => tracing::debug!(error = %err, "a WebSocket upgrade failed"),
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("an accept key is base64"),
    );
    Ok(response)
}

fn frame(kind: &str, data: impl serde::Serialize) -> Message {
    let frame = Frame {
        kind: kind.to_owned(),
        data: serde_json::to_value(data).unwrap_or_default(),
    };
    Message::text(serde_json::to_string(&frame).unwrap_or_default())
}

fn error_frame(status: tonic::Status) -> Message {
    let error = ApiError::from(status);
    frame(
        "error",
        ErrorBody {
            error: error
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_owned(),
            message: error.message,
        },
    )
}

async fn close(socket: &mut Socket) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    // Waits for the client's close, or its going away.
    while let Some(Ok(message)) = socket.next().await {
        if message.is_close() {
            break;
        }
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct SocketQuery {
    /// The API key, for clients that cannot set headers on a WebSocket (browsers).
    key: Option<String>,
    /// Replay only events after this sequence number (to resume).
    after: Option<u64>,
}

#[utoipa::path(get, path = "/ws/tasks/{taskId}/progress", tag = "websockets",
    description = "A WebSocket. Frames are JSON `{type, data}`: `progress` for each event of the task's log (replayed from the start or after `after`, then live; `data` is an Event), then `completed` or `failed` (`data` is an Outcome; a cancelled task ends with `failed`, status `cancelled`), then the socket closes. `error` when the driver goes away: reconnect with `after` set to the last sequence seen.",
    params(("taskId" = String, Path, description = "the task's id"), SocketQuery),
    responses((status = 101, description = "switching to the WebSocket", body = Frame),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 426, body = ErrorBody)))]
pub(super) async fn task_progress(
    State(face): State<Arc<HttpFace>>,
    Path(task_id): Path<String>,
    Query(query): Query<SocketQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    let key = Key::from_headers(request.headers()).or_query(query.key.as_deref());
    let task = super::routes::resolve(&face, &key, &task_id).await?;
    let opened = face.request(
        &key,
        StreamTaskEventsRequest {
            task_id: task.task_id.clone(),
            after_sequence: query.after.unwrap_or(0),
        },
    )?;
    let mut events = face.api.stream_task_events(opened).await?.into_inner();
    upgrade(request, move |mut socket| async move {
        loop {
            tokio::select! {
                next = events.next() => match next {
                    Some(Ok(answer)) => {
                        let Some(event) = answer.event else { continue };
                        let ended = shapes::ends_task(&event);
                        let mut progress = shapes::event_json(&event);
                        progress.progress = Some(if ended.is_some() { 100 } else { 0 });
                        progress.current_step = Some(shapes::step_of(&progress));
                        if socket.send(frame("progress", progress)).await.is_err() {
                            return;
                        }
                        if let Some(status) = ended {
                            let outcome = outcome(&face, &key, &task.task_id, status).await;
                            let kind = if status == TaskStatus::Completed { "completed" } else { "failed" };
                            let _ = socket.send(frame(kind, outcome)).await;
                            break;
                        }
                    }
                    Some(Err(status)) => {
                        let _ = socket.send(error_frame(status)).await;
                        break;
                    }
                    None => break,
                },
                incoming = socket.next() => match incoming {
                    // The client only listens; it leaving ends the stream.
                    Some(Ok(message)) if !message.is_close() => {}
                    _ => return,
                },
            }
        }
        close(&mut socket).await;
    })
}

/// What the `completed` or `failed` frame says of a task that ended with `status`.
async fn outcome(face: &HttpFace, key: &Key, task_id: &str, status: TaskStatus) -> Outcome {
    let task = match face.request(
        key,
        GetTaskRequest {
            task_id: task_id.to_owned(),
        },
    ) {
        Ok(request) => face
            .api
            .get_task(request)
            .await
            .ok()
            .and_then(|answer| answer.into_inner().task),
        Err(_) => None,
    };
    let result = task.as_ref().and_then(shapes::task_result);
    Outcome {
        task_id: task
            .as_ref()
            .map_or_else(|| task_id.to_owned(), shapes::public_id),
        status: status.label().to_owned(),
        error: result.as_ref().and_then(|result| result.error.clone()),
        result,
    }
}

#[utoipa::path(get, path = "/ws/stats", tag = "websockets",
    description = "A WebSocket. Sends `{type: \"stats\", data: Stats}` at once and then every `driver.http.statsInterval` (2 s by default); `error` frames when the stats cannot be had for a while.",
    params(SocketQuery),
    responses((status = 101, description = "switching to the WebSocket", body = Frame),
        (status = 401, body = ErrorBody), (status = 426, body = ErrorBody)))]
pub(super) async fn stats(
    State(face): State<Arc<HttpFace>>,
    Query(query): Query<SocketQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    let key = Key::from_headers(request.headers()).or_query(query.key.as_deref());
    let first = super::routes::cluster_stats(&face, &key).await?;
    upgrade(request, move |mut socket| async move {
        if socket.send(frame("stats", first)).await.is_err() {
            return;
        }
        let mut ticker = tokio::time::interval(face.stats_interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let message = match super::routes::cluster_stats(&face, &key).await {
                        Ok(stats) => frame("stats", stats),
                        Err(err) => frame("error", ErrorBody {
                            error: err.status.canonical_reason().unwrap_or("Error").to_owned(),
                            message: err.message,
                        }),
                    };
                    if socket.send(message).await.is_err() {
                        return;
                    }
                }
                incoming = socket.next() => match incoming {
                    Some(Ok(message)) if !message.is_close() => {}
                    _ => return,
                },
                _ = face.stop.cancelled() => break,
            }
        }
        close(&mut socket).await;
    })
}
