//! A plain HTTP/1.1 client and a WebSocket client for the driver's HTTP face, as scripts of
//! the original API use it: one connection a request, JSON in and out.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// An answer: its status, headers and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "status {}: the body is not JSON ({err}): {}",
                self.status,
                self.text()
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn content_type(&self) -> String {
        self.headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

/// Sends `method url` with `headers` and `body` (raw: tests send malformed JSON too).
pub async fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let uri: hyper::Uri = url.parse().expect("a URL");
    let authority = uri.authority().expect("a URL with a host").to_string();
    let stream = TcpStream::connect(&authority)
        .await
        .unwrap_or_else(|err| panic!("cannot connect to {authority}: {err}"));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("an HTTP/1.1 handshake");
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()));
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        builder = builder.header(hyper::header::HOST, &authority);
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("a request");
    let answer = tokio::time::timeout(Duration::from_secs(60), sender.send_request(request))
        .await
        .unwrap_or_else(|_| panic!("{method} {url} was not answered within 60 s"))
        .unwrap_or_else(|err| panic!("{method} {url}: {err}"));
    let status = answer.status().as_u16();
    let headers = answer.headers().clone();
    let body = answer
        .into_body()
        .collect()
        .await
        .expect("the body")
        .to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

pub async fn get(url: &str) -> Answer {
    request("GET", url, &[], "").await
}

pub async fn post_json(url: &str, body: &Value) -> Answer {
    request(
        "POST",
        url,
        &[("content-type", "application/json")],
        &body.to_string(),
    )
    .await
}

/// A WebSocket of the HTTP face.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the WebSocket at `url` (`ws://...`); the handshake's refusal is its HTTP status.
pub async fn websocket(url: &str) -> Result<Socket, u16> {
    match tokio_tungstenite::connect_async(url).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(answer)) => Err(answer.status().as_u16()),
        Err(err) => panic!("cannot open {url}: {err}"),
    }
}

/// The next JSON frame of `socket`, or `None` once it closed; at most `limit` away.
pub async fn next_frame(socket: &mut Socket, limit: Duration) -> Option<Value> {
    use futures_util::StreamExt;
    loop {
        let message = tokio::time::timeout(limit, socket.next())
            .await
            .expect("a frame in time");
        match message {
            Some(Ok(Message::Text(text))) => {
                return Some(serde_json::from_str(&text).expect("a JSON frame"));
            }
            Some(Ok(Message::Close(_))) | None => return None,
            Some(Ok(_)) => continue,
            Some(Err(err)) => panic!("the WebSocket broke: {err}"),
        }
    }
}
