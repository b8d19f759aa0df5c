//! gRPC plumbing every ClaudeCluster service shares.
//!
//! [`serve`] runs a set of routes with what every service must offer besides its own API:
//! `grpc.health.v1.Health`, and server reflection in both v1 and v1alpha (grpcurl 1.8.6 and
//! Python's grpcio-reflection speak only v1alpha). [`channel`] makes client channels.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub mod cluster;
pub mod failover;
pub use failover::Failover;
pub mod tls;

pub use cluster::{ClusterChannel, ClusterIdentity, ClusterSecret};
pub use tonic_health;

/// Health of a service, as reported through `grpc.health.v1.Health`.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service_name: &'static str,
}

impl Health {
    /// Reports the service (and the server as a whole, the empty name) as serving or not.
    pub async fn set_serving(&self, serving: bool) {
        self.set_service_serving(serving).await;
        self.reporter
            .set_service_status("", serving_status(serving))
            .await;
    }

    /// Reports the service alone as serving or not; the server as a whole (the empty name,
    /// what liveness probes ask) stays as it is. A standby is alive but does not serve.
    pub async fn set_service_serving(&self, serving: bool) {
        self.reporter
            .set_service_status(self.service_name, serving_status(serving))
            .await;
    }
}

fn serving_status(serving: bool) -> ServingStatus {
    if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Routes holding health and reflection, to which a service adds its own.
pub async fn standard_routes(service_name: &'static str) -> (Routes, Health) {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health {
        reporter,
        service_name,
    };
    health.set_serving(true).await;
    // Each server advertises what it serves, not every service of the shared protos.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(claudecluster_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .with_service_name(service_name)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");
    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    (routes, health)
}

/// Binds `address`, explaining which setting named it when that fails.
pub async fn bind(address: &str, setting: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|err| {
        std::io::Error::new(
            err.kind(),
            format!("cannot listen on {address} (`{setting}`): {err}"),
        )
    })
}

/// Serves `routes` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    // Without TCP_NODELAY on every accepted connection a small answer can wait ~40 ms for a
    // delayed ACK; tonic sets it only on listeners it binds itself.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .trace_fn(claudecluster_telemetry::propagation::server_span)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// A channel to `address` (host:port or a full http:// URI) that connects on first use and
/// reconnects after failures.
pub fn channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    channel_watched(address, Duration::from_secs(30), Duration::from_secs(20))
}

/// A channel like [`channel`] whose connection is pinged every `interval` and given up when a
/// ping goes unanswered for `timeout`: a peer that stopped (SIGSTOP, a dead host) fails its
/// streams within `interval + timeout` instead of leaving them open for ever.
pub fn channel_watched(
    address: &str,
    interval: Duration,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    channel_with(address, None, interval, timeout)
}

/// A channel like [`channel_watched`], over TLS when `tls` is given.
pub fn channel_with(
    address: &str,
    tls: Option<&tls::Tls>,
    interval: Duration,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let uri = match (address.contains("://"), tls) {
        (true, _) => address.to_owned(),
        (false, Some(_)) => format!("https://{address}"),
        (false, None) => format!("http://{address}"),
    };
    let mut endpoint = Endpoint::from_shared(uri)?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.client())?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(interval)
        .keep_alive_timeout(timeout)
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// The address a listener is reachable at, with an unspecified IP (0.0.0.0) replaced by
/// loopback so that it can be advertised on one machine.
pub fn reachable_address(local: SocketAddr) -> String {
    let mut address = local;
    if address.ip().is_unspecified() {
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    address.to_string()
}

/// Presents an API key (`authorization: Bearer <key>`) on every call of a client; none when
/// the driver takes no keys.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// `None` for no key. A key that cannot be a header value is refused naming `from`.
    pub fn new(api_key: Option<&str>, from: &str) -> Result<Bearer, String> {
        match api_key.map(str::trim).filter(|key| !key.is_empty()) {
            None => Ok(Bearer(None)),
            Some(key) => format!("Bearer {key}")
                .parse()
                .map(|value| Bearer(Some(value)))
                .map_err(|_| format!("the API key in {from} must be printable ASCII")),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        claudecluster_telemetry::propagation::inject(request.metadata_mut());
        // A call that names its own key keeps it.
        if let Some(value) = &self.0
            && !request.metadata().contains_key("authorization")
        {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel to the driver (or to one of several, see [`failover`]) that presents an API key.
pub type ClientChannel = tonic::service::interceptor::InterceptedService<Failover, Bearer>;

/// A [`channel`] to the driver at `address` presenting `bearer`, over TLS when `tls` is given.
/// `address` may name several drivers separated by commas (a leader and its standbys): calls
/// go to the one that leads.
pub fn client_channel(
    address: &str,
    bearer: Bearer,
    tls: Option<&tls::Tls>,
) -> Result<ClientChannel, tonic::transport::Error> {
    let channels = address
        .split(',')
        .map(str::trim)
        .filter(|address| !address.is_empty())
        .map(|address| {
            channel_with(
                address,
                tls,
                Duration::from_secs(30),
                Duration::from_secs(20),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    if channels.is_empty() {
        // Parsing the empty address gives the error that names it.
        channel_with(
            address,
            tls,
            Duration::from_secs(30),
            Duration::from_secs(20),
        )?;
    }
    Ok(tonic::service::interceptor::InterceptedService::new(
        Failover::new(channels),
        bearer,
    ))
}
