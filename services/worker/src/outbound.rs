//! Requests the worker itself sends over HTTP(S): to the Messages API for its agents (the
//! credential proxy), and to a forge's REST API (pull requests). One connection per request.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, Uri};
use tokio::net::TcpStream;

/// Where requests go: `http` or `https`, host, port, and a path prefix.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub base_path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
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
        Ok(Endpoint {
            tls,
            port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            host,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The `Host` header: the port only when it is not the scheme's own.
    pub fn host_header(&self) -> String {
        if (self.tls && self.port == 443) || (!self.tls && self.port == 80) {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// TLS with the web's public roots.
pub fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| format!("cannot set up TLS: {err}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Sends `request` to `endpoint` on a connection of its own.
pub async fn send(
    endpoint: &Endpoint,
    tls: &tokio_rustls::TlsConnector,
    request: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, String> {
    let stream = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|err| {
            format!(
                "cannot connect to {}:{}: {err}",
                endpoint.host, endpoint.port
            )
        })?;
    let _ = stream.set_nodelay(true);
    if endpoint.tls {
        let name = rustls_pki_types::ServerName::try_from(endpoint.host.clone())
            .map_err(|err| format!("`{}` is not a server name: {err}", endpoint.host))?;
        let stream = tls
            .connect(name, stream)
            .await
            .map_err(|err| format!("TLS to {} failed: {err}", endpoint.host))?;
        handshake_and_send(hyper_util::rt::TokioIo::new(stream), request).await
    } else {
        handshake_and_send(hyper_util::rt::TokioIo::new(stream), request).await
    }
}

async fn handshake_and_send<T>(
    io: T,
    request: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|err| format!("the server did not speak HTTP: {err}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|err| format!("the server did not answer: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_with_their_defaults() {
        let anthropic = Endpoint::parse("https://api.anthropic.com").unwrap();
        assert!(anthropic.tls);
        assert_eq!((anthropic.port, anthropic.base_path.as_str()), (443, ""));
        assert_eq!(anthropic.host_header(), "api.anthropic.com");
        let local = Endpoint::parse("http://127.0.0.1:8080/base/").unwrap();
        assert!(!local.tls);
        assert_eq!((local.port, local.base_path.as_str()), (8080, "/base"));
        assert_eq!(local.host_header(), "127.0.0.1:8080");
        assert!(Endpoint::parse("ftp://x").is_err());
    }
}
