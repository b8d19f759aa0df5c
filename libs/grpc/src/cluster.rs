//! The cluster secret: how the driver, the scheduler and the workers know each other.
//!
//! Every call between them carries the secret in [`SECRET_HEADER`]; the scheduler's and the
//! workers' services refuse a call without it (`UNAUTHENTICATED`). Agents never get it: a
//! worker starts them with an environment of their own. Health and reflection stay open.

use std::path::Path;
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// The request header the secret travels in.
pub const SECRET_HEADER: &str = "x-claudecluster-cluster-secret";
/// The environment variable that sets the secret.
pub const SECRET_VARIABLE: &str = "CLAUDECLUSTER_CLUSTER_SECRET";
/// The file, under the data directory, holding the secret the services of one host share
/// when none is configured.
pub const SECRET_FILE_NAME: &str = "cluster-secret";

/// The shared secret, as a header value.
#[derive(Clone)]
pub struct ClusterSecret(Arc<MetadataValue<Ascii>>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(***)")
    }
}

impl ClusterSecret {
    /// The secret, from (in order) `from_env` (the value of [`SECRET_VARIABLE`]), the file
    /// `configured_file` (`cluster.secretFile`), or [`SECRET_FILE_NAME`] in `data_dir`, which
    /// is made (mode 0600) with a new random secret when it does not exist.
    pub fn resolve(
        from_env: Option<String>,
        configured_file: Option<&Path>,
        data_dir: &Path,
    ) -> Result<ClusterSecret, String> {
        if let Some(value) = from_env.filter(|value| !value.trim().is_empty()) {
            return Self::from_text(&value).map_err(|why| format!("{SECRET_VARIABLE} {why}"));
        }
        if let Some(path) = configured_file {
            let text = std::fs::read_to_string(path).map_err(|err| {
                format!(
                    "cannot read the cluster secret from {} (`cluster.secretFile`): {err}",
                    path.display()
                )
            })?;
            return Self::from_text(&text).map_err(|why| {
                format!(
                    "the cluster secret in {} (`cluster.secretFile`) {why}",
                    path.display()
                )
            });
        }
        let path = data_dir.join(SECRET_FILE_NAME);
        let text = read_or_create(&path).map_err(|err| {
            format!(
                "cannot read or make the cluster secret {}: {err} (set {SECRET_VARIABLE} or `cluster.secretFile`)",
                path.display()
            )
        })?;
        Self::from_text(&text)
            .map_err(|why| format!("the cluster secret in {} {why}", path.display()))
    }

    fn from_text(text: &str) -> Result<ClusterSecret, &'static str> {
        let text = text.trim();
        if text.len() < 16 {
            return Err("is shorter than 16 characters");
        }
        let value =
            MetadataValue::try_from(text).map_err(|_| "must be printable ASCII without spaces")?;
        Ok(ClusterSecret(Arc::new(value)))
    }

    /// Whether `request` carries the secret; compared in constant time.
    fn presented_by<T>(&self, request: &Request<T>) -> bool {
        let Some(presented) = request.metadata().get(SECRET_HEADER) else {
            return false;
        };
        let (expected, presented) = (self.0.as_bytes(), presented.as_bytes());
        expected.len() == presented.len()
            && expected
                .iter()
                .zip(presented)
                .fold(0u8, |differ, (a, b)| differ | (a ^ b))
                == 0
    }
}

/// The secret file's contents: read, or made afresh. Two services starting at once make it
/// once: the file is created exclusively, and whoever loses the race reads the winner's.
fn read_or_create(path: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    // Written whole under a temporary name, then linked in place: a reader never sees half.
    let partial = path.with_extension(format!("partial-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()?;
    let linked = std::fs::hard_link(&partial, path);
    let _ = std::fs::remove_file(&partial);
    match linked {
        Ok(()) => Ok(secret),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::read_to_string(path)
        }
        Err(err) => Err(err),
    }
}

/// Adds the secret to every call of a client.
#[derive(Clone, Debug)]
pub struct PresentSecret(pub ClusterSecret);

impl Interceptor for PresentSecret {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(SECRET_HEADER, (*self.0.0).clone());
        claudecluster_telemetry::propagation::inject(request.metadata_mut());
        Ok(request)
    }
}

/// Refuses every call that does not carry the secret and, over TLS, whose certificate names
/// none of `roles` (empty: any role of the cluster).
#[derive(Clone, Debug)]
pub struct RequireSecret(pub ClusterSecret, pub &'static [crate::tls::Role]);

impl Interceptor for RequireSecret {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if !self.0.presented_by(&request) {
            tracing::warn!(target: "audit", action = "auth.refused", detail = "no cluster secret presented", "audit");
            return Err(Status::unauthenticated(
                "this service takes calls only from the cluster's own services, which present the cluster secret",
            ));
        }
        if !self.1.is_empty() {
            crate::tls::require_role(&request, self.1)?;
        }
        Ok(request)
    }
}

/// What a service presents to the others, and requires of them: the cluster secret, and with
/// TLS its certificate (mutual TLS with the cluster CA).
#[derive(Clone, Debug)]
pub struct ClusterIdentity {
    pub secret: ClusterSecret,
    pub tls: Option<crate::tls::Tls>,
}

impl ClusterIdentity {
    /// The server side of a service the others call. A certificate a peer presents must be
    /// the cluster CA's; one that presents none still reaches health and reflection (for
    /// probes), and is refused by the service's own API, which asks for a role.
    pub fn server_tls(&self) -> Option<tonic::transport::ServerTlsConfig> {
        self.tls.as_ref().map(|tls| tls.server(true))
    }
}

/// A channel to another service of the cluster: every call presents the secret.
pub type ClusterChannel = InterceptedService<Channel, PresentSecret>;

/// A [`crate::channel_watched`] channel that presents `identity`.
pub fn cluster_channel_watched(
    address: &str,
    identity: &ClusterIdentity,
    interval: std::time::Duration,
    timeout: std::time::Duration,
) -> Result<ClusterChannel, tonic::transport::Error> {
    let channel = crate::channel_with(address, identity.tls.as_ref(), interval, timeout)?;
    Ok(InterceptedService::new(
        channel,
        PresentSecret(identity.secret.clone()),
    ))
}

/// A [`crate::channel`] that presents `identity`.
pub fn cluster_channel(
    address: &str,
    identity: &ClusterIdentity,
) -> Result<ClusterChannel, tonic::transport::Error> {
    cluster_channel_watched(
        address,
        identity,
        std::time::Duration::from_secs(30),
        std::time::Duration::from_secs(20),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_of_one_host_share_the_secret_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = ClusterSecret::resolve(None, None, dir.path()).unwrap();
        let second = ClusterSecret::resolve(None, None, dir.path()).unwrap();
        assert_eq!(first.0, second.0);
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE_NAME))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }

    #[test]
    fn the_variable_wins_and_a_short_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let from_env =
            ClusterSecret::resolve(Some("0123456789abcdef0123".into()), None, dir.path()).unwrap();
        assert_eq!(from_env.0.to_str().unwrap(), "0123456789abcdef0123");
        assert!(!dir.path().join(SECRET_FILE_NAME).exists());
        let short = ClusterSecret::resolve(Some("short".into()), None, dir.path()).unwrap_err();
        assert_eq!(
            short,
            "CLAUDECLUSTER_CLUSTER_SECRET is shorter than 16 characters"
        );
    }

    #[test]
    fn only_the_exact_secret_passes() {
        let secret = ClusterSecret::from_text("0123456789abcdef0123").unwrap();
        let mut require = RequireSecret(secret.clone(), &[]);
        let presented = PresentSecret(secret).call(Request::new(())).unwrap();
        assert!(require.call(presented).is_ok());
        let wrong = PresentSecret(ClusterSecret::from_text("0123456789abcdef0124").unwrap())
            .call(Request::new(()))
            .unwrap();
        assert_eq!(
            require.call(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            require.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
