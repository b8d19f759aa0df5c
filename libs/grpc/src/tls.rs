//! TLS: the driver serves its clients over TLS; between driver, scheduler and workers it is
//! mutual TLS with a cluster CA, each service's role named in its certificate (a DNS name
//! `<role>.claudecluster.internal`), so that a worker can tell the driver from another worker.
//! `claudecluster certs init` makes a CA and a certificate for each role.

use std::path::{Path, PathBuf};

use claudecluster_config::TlsConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The domain under which certificates name roles.
pub const ROLE_DOMAIN: &str = "claudecluster.internal";

/// What a certificate says its holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Driver,
    Scheduler,
    Worker,
    /// An operator's CLI.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Driver, Role::Scheduler, Role::Worker, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Driver => "driver",
            Role::Scheduler => "scheduler",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }

    /// The DNS name a certificate of this role carries.
    pub fn dns_name(self) -> String {
        format!("{}.{ROLE_DOMAIN}", self.name())
    }
}

/// A service's TLS material: the cluster CA, and its own certificate and key.
#[derive(Clone)]
pub struct Tls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(***)")
    }
}

impl Tls {
    /// The files `config` names, or `None` when it names none; `section` is the config
    /// section (`driver`, …) errors name.
    pub fn load(config: &TlsConfig, section: &str) -> Result<Option<Tls>, String> {
        let (Some(ca), Some(cert), Some(key)) = (&config.ca, &config.cert, &config.key) else {
            if config.ca.is_some() || config.cert.is_some() || config.key.is_some() {
                return Err(format!(
                    "`{section}.tls` needs all of ca, cert and key (make them with `claudecluster certs init`)"
                ));
            }
            return Ok(None);
        };
        let read = |path: &PathBuf, key: &str| {
            std::fs::read(path).map_err(|err| {
                format!(
                    "cannot read {} (`{section}.tls.{key}`): {err}",
                    path.display()
                )
            })
        };
        Ok(Some(Tls {
            ca: read(ca, "ca")?,
            cert: read(cert, "cert")?,
            key: read(key, "key")?,
        }))
    }

    /// From PEM files, as a client's `--ca`, `--cert` and `--key` name them.
    pub fn from_files(ca: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Tls, String> {
        let read = |path: &Path, flag: &str| {
            std::fs::read(path)
                .map_err(|err| format!("cannot read {} ({flag}): {err}", path.display()))
        };
        Ok(Tls {
            ca: read(ca, "--ca")?,
            cert: cert
                .map(|path| read(path, "--cert"))
                .transpose()?
                .unwrap_or_default(),
            key: key
                .map(|path| read(path, "--key"))
                .transpose()?
                .unwrap_or_default(),
        })
    }

    fn identity(&self) -> Option<Identity> {
        (!self.cert.is_empty() && !self.key.is_empty())
            .then(|| Identity::from_pem(&self.cert, &self.key))
    }

    /// The server side: its certificate; peers must present one the cluster CA signed unless
    /// `clients_without_certificates` (the driver's API clients, who present API keys).
    pub fn server(&self, clients_without_certificates: bool) -> ServerTlsConfig {
        let mut config = ServerTlsConfig::new()
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(clients_without_certificates);
        if let Some(identity) = self.identity() {
            config = config.identity(identity);
        }
        config
    }

    /// The client side: trusts the cluster CA and presents its own certificate, if any.
    pub fn client(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca));
        if let Some(identity) = self.identity() {
            config = config.identity(identity);
        }
        config
    }
}

/// The role the peer's certificate names, when it presented one (the TLS handshake has
/// verified it against the cluster CA).
pub fn peer_role<T>(request: &Request<T>) -> Option<Role> {
    let certs = request.peer_certs()?;
    let leaf: &CertificateDer<'static> = certs.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    Role::ALL.into_iter().find(|role| {
        ServerName::try_from(role.dns_name())
            .ok()
            .is_some_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    })
}

/// Refuses a call over TLS whose peer's certificate does not name one of `roles`. Calls
/// without TLS are left to the cluster secret.
pub fn require_role<T>(request: &Request<T>, roles: &[Role]) -> Result<(), Status> {
    if !tls_in_use(request) {
        return Ok(());
    }
    match peer_role(request) {
        Some(role) if roles.contains(&role) => Ok(()),
        found => {
            tracing::warn!(
                target: "audit",
                action = "auth.refused",
                role = found.map_or("none", Role::name),
                "audit"
            );
            Err(Status::permission_denied(format!(
                "only {} may call this; the caller's certificate names {}",
                roles
                    .iter()
                    .map(|role| format!("the {}", role.name()))
                    .collect::<Vec<_>>()
                    .join(" or "),
                found.map_or("no role".to_owned(), |role| format!("the {}", role.name()))
            )))
        }
    }
}

/// Whether the call came over TLS.
fn tls_in_use<T>(request: &Request<T>) -> bool {
    request
        .extensions()
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .is_some()
}

/// How long a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From last year to three years from now.
    Standard,
    /// Ended years ago: for testing that such a certificate is refused.
    Expired,
}

impl Validity {
    fn apply(self, params: &mut rcgen::CertificateParams) {
        let year = current_year();
        let (from, to) = match self {
            Validity::Standard => (year - 1, year + 3),
            Validity::Expired => (year - 5, year - 3),
        };
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(to, 1, 1);
    }
}

fn current_year() -> i32 {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or_default();
    // Close enough for validity periods whole years long.
    1970 + (seconds / 31_556_952) as i32
}

/// A cluster CA, able to issue role certificates.
pub struct CertificateAuthority {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA's certificate and key, PEM.
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertificateAuthority {
    pub fn new() -> Result<CertificateAuthority, String> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let failed = |err: rcgen::Error| format!("cannot make the CA: {err}");
        let key = KeyPair::generate().map_err(failed)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "claudecluster cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Validity::Standard.apply(&mut params);
        params.not_after = rcgen::date_time_ymd(current_year() + 10, 1, 1);
        let cert = params.self_signed(&key).map_err(failed)?;
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            key_pem,
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// A certificate and key (PEM) for `role`, valid for localhost, the loopback addresses,
    /// `hosts` and the role's own name.
    pub fn issue(
        &self,
        role: Role,
        hosts: &[String],
        validity: Validity,
    ) -> Result<(String, String), String> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let failed =
            |err: rcgen::Error| format!("cannot make the {} certificate: {err}", role.name());
        let mut names = vec![
            role.dns_name(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        names.extend(hosts.iter().cloned());
        let mut params = CertificateParams::new(names).map_err(failed)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("claudecluster {}", role.name()));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity.apply(&mut params);
        let key = KeyPair::generate().map_err(failed)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(failed)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// What `claudecluster certs init` writes into `dir`: a CA (`ca.pem`, `ca.key`), and a
/// certificate and key for each role (`driver.pem`, `driver.key`, …), valid for `hosts`
/// besides localhost and the loopback addresses. Keys are mode 0600. Returns the files written.
pub fn make_certificates(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|err| format!("cannot make {}: {err}", dir.display()))?;
    let mut written = Vec::new();
    let mut write = |name: &str, text: &str, private: bool| -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        written.push(path);
        Ok(())
    };
    let ca = CertificateAuthority::new()?;
    write("ca.pem", &ca.cert_pem, false)?;
    write("ca.key", &ca.key_pem, true)?;
    for role in Role::ALL {
        let (cert, key) = ca.issue(role, hosts, Validity::Standard)?;
        write(&format!("{}.pem", role.name()), &cert, false)?;
        write(&format!("{}.key", role.name()), &key, true)?;
    }
    Ok(written)
}
