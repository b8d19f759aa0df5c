//! Webhooks: notifications POSTed as JSON to the receivers of `driver.notifications.webhooks`.
//!
//! Each notification is signed (`X-ClaudeCluster-Signature: sha256=<hex HMAC-SHA256 of the
//! body under the webhook's secret>`) and carries its id (`X-ClaudeCluster-Delivery`), so that a
//! receiver can check it and drop a repeat. Delivery never blocks the cluster: notifications go
//! into a bounded queue per webhook, and one that is full drops the oldest, with a warning. A
//! refused or failed delivery is retried with back-off (1 s, 2 s, 4 s … up to a minute) for up
//! to [`ATTEMPTS`] attempts.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use claudecluster_config::{NotificationsConfig, WebhookConfig};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

/// The kinds of notification.
pub const TASK_FINISHED: &str = "task.finished";
pub const SESSION_REPLIED: &str = "session.replied";
pub const PERMISSION_DENIED: &str = "task.permission_denied";
pub const WORKER_UNHEALTHY: &str = "worker.unhealthy";
pub const BUDGET_REACHED: &str = "budget.reached";
pub const EVENTS: &[&str] = &[
    TASK_FINISHED,
    SESSION_REPLIED,
    PERMISSION_DENIED,
    WORKER_UNHEALTHY,
    BUDGET_REACHED,
];

/// Deliveries one webhook may have waiting; past it the oldest is dropped.
const QUEUE: usize = 1024;
const ATTEMPTS: u32 = 8;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long one delivery may take, connection included.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

pub const SIGNATURE_HEADER: &str = "x-claudecluster-signature";
pub const EVENT_HEADER: &str = "x-claudecluster-event";
pub const DELIVERY_HEADER: &str = "x-claudecluster-delivery";

#[derive(Default)]
pub struct Notifier {
    webhooks: Vec<Webhook>,
}

struct Webhook {
    events: Vec<String>,
    queue: mpsc::Sender<Delivery>,
}

struct Delivery {
    id: String,
    event: &'static str,
    body: Bytes,
}

impl Notifier {
    /// Checks the webhooks' settings and starts one sender each.
    pub fn start(config: &NotificationsConfig) -> Result<Arc<Notifier>, String> {
        let tls = tls_connector()?;
        let mut webhooks = Vec::new();
        for (index, webhook) in config.webhooks.iter().enumerate() {
            let key = format!("driver.notifications.webhooks[{index}]");
            let target = Target::parse(&webhook.url).map_err(|err| format!("{key}.url: {err}"))?;
            for event in &webhook.events.0 {
                if !EVENTS.contains(&event.as_str()) {
                    return Err(format!(
                        "{key}.events: `{event}` is not one of {}",
                        EVENTS.join(", ")
                    ));
                }
            }
            let (queue, deliveries) = mpsc::channel(QUEUE);
            tokio::spawn(deliver(target, webhook.clone(), deliveries, tls.clone()));
            webhooks.push(Webhook {
                events: webhook.events.0.clone(),
                queue,
            });
        }
        Ok(Arc::new(Notifier { webhooks }))
    }

    /// Queues `event` with `data` for every webhook that wants it; returns at once.
    pub fn notify(&self, event: &'static str, data: serde_json::Value) {
        if self.webhooks.is_empty() {
            return;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let time = claudecluster_telemetry::rfc3339(SystemTime::now());
        let body = Bytes::from(
            serde_json::json!({"id": id, "event": event, "time": time, "data": data}).to_string(),
        );
        for webhook in &self.webhooks {
            if !webhook.events.is_empty() && !webhook.events.iter().any(|wanted| wanted == event) {
                continue;
            }
            let delivery = Delivery {
                id: id.clone(),
                event,
                body: body.clone(),
            };
            if let Err(mpsc::error::TrySendError::Full(_)) = webhook.queue.try_send(delivery) {
                tracing::warn!(
                    event,
                    "a webhook's queue is full; dropping this notification"
                );
            }
        }
    }
}

/// The signature of `body` under `secret`, as the signature header carries it.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn deliver(
    target: Target,
    webhook: WebhookConfig,
    mut deliveries: mpsc::Receiver<Delivery>,
    tls: tokio_rustls::TlsConnector,
) {
    while let Some(delivery) = deliveries.recv().await {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let sent =
                tokio::time::timeout(DELIVERY_TIMEOUT, post(&target, &webhook, &delivery, &tls))
                    .await
                    .unwrap_or_else(|_| Err("no answer in time".to_owned()));
            match sent {
                Ok(()) => break,
                Err(reason) if attempt == ATTEMPTS => {
                    tracing::warn!(url = %target.display, event = delivery.event, %reason, attempts = ATTEMPTS, "giving up a webhook delivery");
                }
                Err(reason) => {
                    tracing::info!(url = %target.display, event = delivery.event, %reason, attempt, "webhook delivery failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

async fn post(
    target: &Target,
    webhook: &WebhookConfig,
    delivery: &Delivery,
    tls: &tokio_rustls::TlsConnector,
) -> Result<(), String> {
    let mut request = hyper::Request::post(target.path.as_str())
        .header(hyper::header::HOST, target.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "claudecluster")
        .header(EVENT_HEADER, delivery.event)
        .header(DELIVERY_HEADER, delivery.id.as_str());
    if let Some(secret) = &webhook.secret {
        request = request.header(SIGNATURE_HEADER, signature(secret, &delivery.body));
    }
    let request = request
        .body(Full::new(delivery.body.clone()))
        .map_err(|err| format!("cannot build the request: {err}"))?;
    let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|err| format!("cannot connect: {err}"))?;
    let status = if target.https {
        let name = rustls_pki_types::ServerName::try_from(target.host.clone())
            .map_err(|err| format!("bad host name: {err}"))?;
        let stream = tls
            .connect(name, stream)
            .await
            .map_err(|err| format!("TLS: {err}"))?;
        send(TokioIo::new(stream), request).await?
    } else {
        send(TokioIo::new(stream), request).await?
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}

async fn send<T>(io: T, request: hyper::Request<Full<Bytes>>) -> Result<hyper::StatusCode, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|err| format!("not HTTP: {err}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| format!("no answer: {err}"))?;
    let status = response.status();
    // Read to the end, so that the receiver sees its answer taken.
    let _ = response.into_body().collect().await;
    Ok(status)
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| format!("cannot set up TLS for webhooks: {err}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Where a webhook's URL points.
struct Target {
    https: bool,
    host: String,
    port: u16,
    authority: String,
    path: String,
    /// The URL without credentials or query, for logs.
    display: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let uri: hyper::Uri = url.parse().map_err(|err| format!("`{url}`: {err}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("`{url}` is not an http:// or https:// URL")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{url}` names no host"))?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not taken; use `secret`".to_owned());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|path| path.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        Ok(Target {
            https,
            display: format!(
                "{}://{}{}",
                uri.scheme_str().unwrap_or("http"),
                authority,
                uri.path()
            ),
            host,
            port,
            authority: authority.as_str().to_owned(),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn urls_are_read_with_their_defaults() {
        let target = Target::parse("https://hooks.example.com/in?x=1").unwrap();
        assert!(target.https);
        assert_eq!(
            (target.host.as_str(), target.port),
            ("hooks.example.com", 443)
        );
        assert_eq!(target.path, "/in?x=1");
        assert_eq!(target.display, "https://hooks.example.com/in");
        let plain = Target::parse("http://127.0.0.1:9000").unwrap();
        assert_eq!((plain.port, plain.path.as_str()), (9000, "/"));
        assert!(Target::parse("ftp://example.com/").is_err());
        assert!(Target::parse("https://user:pw@example.com/").is_err());
    }
}
