//! A client channel over several drivers (`--driver a:50051,b:50051`): calls go to the one that
//! answered last; a call that one refuses as a standby (`UNAVAILABLE` before any work) or
//! that cannot reach it at all goes to the next, so a client follows the leading driver
//! through a failover by itself. A call is sent again only when it certainly did nothing:
//! refused by a standby's gate, or its connection refused. Streams that break mid-way are
//! resumed by the client after the last event it saw, as after any restart.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Debug)]
pub struct Failover {
    channels: Arc<[Channel]>,
    /// The driver that answered last.
    current: Arc<AtomicUsize>,
}

impl Failover {
    pub fn new(channels: Vec<Channel>) -> Failover {
        assert!(!channels.is_empty(), "a failover channel needs a driver");
        Failover {
            channels: channels.into(),
            current: Arc::default(),
        }
    }
}

/// `UNAVAILABLE` in a response's headers: a trailers-only answer, refused before any work.
fn refused_at_once(response: &http::Response<Body>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|status| status == "14")
}

/// Whether the call never reached a server: its connection was refused or could not be made.
fn unreached(error: &tonic::transport::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotConnected
            )
        {
            return true;
        }
        source = error.source();
    }
    false
}

impl Service<http::Request<Body>> for Failover {
    type Response = http::Response<Body>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call waits for its own channel to be ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let channels = self.channels.clone();
        let current = self.current.clone();
        Box::pin(async move {
            let first = current.load(Ordering::Relaxed) % channels.len();
            if channels.len() == 1 {
                let mut channel = channels[0].clone();
                return Ok(channel.ready().await?.call(request).await?);
            }
            // The driver's requests are single messages: kept, so that one can be sent again.
            let (parts, body) = request.into_parts();
            let body: Bytes = body.collect().await?.to_bytes();
            let mut last = None;
            for step in 0..channels.len() {
                let index = (first + step) % channels.len();
                let mut attempt = http::Request::builder()
                    .method(parts.method.clone())
                    .uri(parts.uri.clone())
                    .version(parts.version)
                    .body(Body::new(http_body_util::Full::new(body.clone())))?;
                *attempt.headers_mut() = parts.headers.clone();
                let mut channel = channels[index].clone();
                let answered = match channel.ready().await {
                    Ok(channel) => channel.call(attempt).await,
                    Err(err) => Err(err),
                };
                match answered {
                    Ok(response) if !refused_at_once(&response) => {
                        current.store(index, Ordering::Relaxed);
                        return Ok(response);
                    }
                    Ok(response) => last = Some(Ok(response)),
                    Err(err) if unreached(&err) => last = Some(Err(err.into())),
                    Err(err) => {
                        // It may have reached the driver: not sent again.
                        current.store((index + 1) % channels.len(), Ordering::Relaxed);
                        return Err(err.into());
                    }
                }
            }
            last.expect("at least one driver was tried")
        })
    }
}
