//! Who may call the driver: API keys (from the configuration, and made with CreateApiKey),
//! their scopes and quotas, and the audit log of who did what.
//!
//! With no key configured and none in the store, the driver takes every caller as an admin
//! (and listens on loopback only, see the CLI). Once there is a key, every call must present
//! one as `authorization: Bearer <key>`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use claudecluster_config::{AuthConfig, QuotaConfig};
use claudecluster_proto::v1::{ApiKey, KeyQuotas};
use prost::Message;
use sha2::Digest;
use tokio::sync::mpsc;
use tonic::Request;

use crate::db::{AuditRow, Db, KeyRow, now_ms};
use crate::error::DriverError;

/// How long a stored key, or the fact that keys exist, is taken as read: revocations made on
/// another driver sharing the store take effect within this.
const FRESHNESS: Duration = Duration::from_secs(1);

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    TasksRead,
    TasksWrite,
    Sessions,
    /// Tasks and sessions whose agents ask for nothing (`bypassPermissions`) or may run any
    /// Bash command.
    Unrestricted,
    Admin,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::TasksRead => "tasks:read",
            Scope::TasksWrite => "tasks:write",
            Scope::Sessions => "sessions",
            Scope::Unrestricted => "unrestricted",
            Scope::Admin => "admin",
        }
    }
}

/// The quotas a key works within.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quotas {
    pub requests_per_second: f64,
    pub running_tasks: u32,
    pub open_sessions: u32,
    /// USD per UTC day and month; 0: no limit.
    pub budget_usd_per_day: f64,
    pub budget_usd_per_month: f64,
}

impl Quotas {
    fn from_config(config: &QuotaConfig) -> Quotas {
        Quotas {
            requests_per_second: config.requests_per_second,
            running_tasks: config.running_tasks,
            open_sessions: config.open_sessions,
            budget_usd_per_day: config.budget_usd_per_day,
            budget_usd_per_month: config.budget_usd_per_month,
        }
    }

    /// `asked`, with what it leaves at zero taken from `defaults`.
    fn or(asked: &KeyQuotas, defaults: Quotas) -> Quotas {
        fn set_or<T: PartialOrd + Default>(asked: T, default: T) -> T {
            if asked > T::default() { asked } else { default }
        }
        Quotas {
            requests_per_second: set_or(asked.requests_per_second, defaults.requests_per_second),
            running_tasks: set_or(asked.running_tasks, defaults.running_tasks),
            open_sessions: set_or(asked.open_sessions, defaults.open_sessions),
            budget_usd_per_day: set_or(asked.budget_usd_per_day, defaults.budget_usd_per_day),
            budget_usd_per_month: set_or(asked.budget_usd_per_month, defaults.budget_usd_per_month),
        }
    }

    pub fn to_proto(self) -> KeyQuotas {
        KeyQuotas {
            requests_per_second: self.requests_per_second,
            running_tasks: self.running_tasks,
            open_sessions: self.open_sessions,
            budget_usd_per_day: self.budget_usd_per_day,
            budget_usd_per_month: self.budget_usd_per_month,
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's id; empty when the driver takes no keys.
    pub key_id: String,
    scopes: Vec<String>,
    pub quotas: Option<Quotas>,
}

impl Caller {
    /// Anyone, on a driver that takes no keys: may do everything.
    fn anyone() -> Caller {
        Caller {
            key_id: String::new(),
            scopes: vec![Scope::Admin.name().to_owned()],
            quotas: None,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.scopes.iter().any(|scope| scope == Scope::Admin.name())
    }

    fn has(&self, scope: Scope) -> bool {
        self.is_admin() || self.scopes.iter().any(|held| held == scope.name())
    }

    /// Whether the caller may see and act on what `owner` made: its own, or anything for an
    /// admin.
    pub fn may_see(&self, owner: &str) -> bool {
        self.is_admin() || self.key_id == owner
    }
}

/// A key as the driver checks it.
#[derive(Debug, Clone)]
struct KnownKey {
    id: String,
    scopes: Vec<String>,
    quotas: Quotas,
    revoked: bool,
}

/// A token bucket: `rate` a second, bursts of as many.
struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct Auth {
    db: Arc<Db>,
    /// Keys of the configuration, by the SHA-256 of the key.
    configured: HashMap<String, KnownKey>,
    defaults: Quotas,
    /// Stored keys by hash (`None`: no such key), with when they were read.
    stored: Mutex<HashMap<String, (Instant, Option<KnownKey>)>>,
    /// Whether the store holds a key in force, and when that was read.
    stored_keys_exist: Mutex<Option<(Instant, bool)>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    audit: mpsc::UnboundedSender<Audited>,
}

/// What the audit writer is sent.
enum Audited {
    Record(AuditRow),
    /// Store what has gathered now, then say so: at shutdown.
    Flush(tokio::sync::oneshot::Sender<()>),
}

impl Auth {
    /// `stored_keys_exist`: whether the store held a key in force at start.
    pub fn new(db: Arc<Db>, config: &AuthConfig, stored_keys_exist: bool) -> Arc<Auth> {
        let defaults = Quotas::from_config(&config.quotas);
        let configured = config
            .api_keys
            .iter()
            .map(|key| {
                (
                    key.sha256.clone(),
                    KnownKey {
                        id: key.id.clone(),
                        scopes: key.scopes.0.clone(),
                        quotas: key.quotas.as_ref().map_or(defaults, Quotas::from_config),
                        revoked: false,
                    },
                )
            })
            .collect();
        let (audit, records) = mpsc::unbounded_channel();
        tokio::spawn(write_audit(db.clone(), records));
        Arc::new(Auth {
            db,
            configured,
            defaults,
            stored: Mutex::default(),
            stored_keys_exist: Mutex::new(Some((Instant::now(), stored_keys_exist))),
            buckets: Mutex::default(),
            audit,
        })
    }

    /// Stores the audit records made so far: at shutdown, once no call is served any more.
    pub async fn flush_audit(&self) {
        let (done, stored) = tokio::sync::oneshot::channel();
        if self.audit.send(Audited::Flush(done)).is_ok() {
            let _ = stored.await;
        }
    }

    /// Whether callers must present a key.
    async fn keys_required(&self) -> Result<bool, DriverError> {
        if !self.configured.is_empty() {
            return Ok(true);
        }
        let known = *self.stored_keys_exist.lock().expect("auth lock poisoned");
        if let Some((at, exist)) = known
            && at.elapsed() < FRESHNESS
        {
            return Ok(exist);
        }
        let exist = match (self.db.has_active_keys().await, known) {
            (Ok(exist), _) => exist,
            // A store that is away does not stop what is live from being served: what was
            // last read stands until it is back.
            (Err(err), Some((_, exist))) => {
                tracing::debug!(error = %err, "cannot read the stored keys; using what was read last");
                return Ok(exist);
            }
            (Err(err), None) => return Err(err.into()),
        };
        *self.stored_keys_exist.lock().expect("auth lock poisoned") = Some((Instant::now(), exist));
        Ok(exist)
    }

    async fn known(&self, hash: &str) -> Result<Option<KnownKey>, DriverError> {
        if let Some(key) = self.configured.get(hash) {
            return Ok(Some(key.clone()));
        }
        if let Some((at, key)) = self.stored.lock().expect("auth lock poisoned").get(hash)
            && at.elapsed() < FRESHNESS
        {
            return Ok(key.clone());
        }
        let key = match self.db.key_by_hash(hash).await {
            Ok(row) => row.map(|row| self.known_from_row(&row)),
            Err(err) => {
                // Known before the store went away: taken as it was.
                let last = self
                    .stored
                    .lock()
                    .expect("auth lock poisoned")
                    .get(hash)
                    .cloned();
                return match last {
                    Some((_, key)) => Ok(key),
                    None => Err(err.into()),
                };
            }
        };
        self.stored
            .lock()
            .expect("auth lock poisoned")
            .insert(hash.to_owned(), (Instant::now(), key.clone()));
        Ok(key)
    }

    fn known_from_row(&self, row: &KeyRow) -> KnownKey {
        let asked = KeyQuotas::decode(row.quotas.as_slice()).unwrap_or_default();
        KnownKey {
            id: row.id.clone(),
            scopes: row.scopes.clone(),
            quotas: Quotas::or(&asked, self.defaults),
            revoked: row.revoked_ms.is_some(),
        }
    }

    /// The caller of `request`, if it may use `scope`; every refusal is audited.
    pub async fn caller<T>(
        &self,
        request: &Request<T>,
        scope: Scope,
    ) -> Result<Caller, DriverError> {
        if !self.keys_required().await? {
            return Ok(Caller::anyone());
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|key| !key.is_empty());
        let Some(presented) = presented else {
            self.refused("", "no API key presented");
            return Err(DriverError::Unauthenticated(
                "this driver takes calls with an API key: send `authorization: Bearer <key>`"
                    .into(),
            ));
        };
        let key = match self.known(&sha256_hex(presented)).await? {
            Some(key) if !key.revoked => key,
            Some(key) => {
                self.refused(&key.id, "revoked key presented");
                return Err(DriverError::Unauthenticated(
                    "the API key is unknown or revoked".into(),
                ));
            }
            None => {
                self.refused("", "unknown key presented");
                return Err(DriverError::Unauthenticated(
                    "the API key is unknown or revoked".into(),
                ));
            }
        };
        let caller = Caller {
            key_id: key.id.clone(),
            scopes: key.scopes.clone(),
            quotas: Some(key.quotas),
        };
        if !caller.has(scope) {
            self.refused(&key.id, &format!("lacks the scope {}", scope.name()));
            return Err(DriverError::PermissionDenied(format!(
                "key `{}` lacks the scope `{}`",
                key.id,
                scope.name()
            )));
        }
        self.take_request(&key)?;
        Ok(caller)
    }

    /// Refuses `caller` unless it holds `scope` too; the refusal is audited.
    pub fn require(&self, caller: &Caller, scope: Scope) -> Result<(), DriverError> {
        if caller.has(scope) {
            return Ok(());
        }
        self.refused(&caller.key_id, &format!("lacks the scope {}", scope.name()));
        Err(DriverError::PermissionDenied(format!(
            "key `{}` lacks the scope `{}`",
            caller.key_id,
            scope.name()
        )))
    }

    /// Spends one request of the key's rate.
    fn take_request(&self, key: &KnownKey) -> Result<(), DriverError> {
        let rate = key.quotas.requests_per_second;
        let mut buckets = self.buckets.lock().expect("auth lock poisoned");
        let now = Instant::now();
        let bucket = buckets.entry(key.id.clone()).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / rate);
        Err(DriverError::QuotaExceeded(format!(
            "key `{}` is over its {rate} requests a second; try again in {} ms",
            key.id,
            wait.as_millis().max(1)
        )))
    }

    /// Records what `caller` did.
    pub fn audit(&self, caller: &Caller, action: &str, subject: &str, detail: &str) {
        tracing::info!(target: "audit", key = %caller.key_id, action, subject, detail, "audit");
        let _ = self.audit.send(Audited::Record(AuditRow {
            seq: 0,
            time_ms: now_ms(),
            key_id: caller.key_id.clone(),
            action: action.to_owned(),
            subject: subject.to_owned(),
            detail: detail.to_owned(),
        }));
    }

    fn refused(&self, key_id: &str, why: &str) {
        let caller = Caller {
            key_id: key_id.to_owned(),
            scopes: Vec::new(),
            quotas: None,
        };
        self.audit(&caller, "auth.refused", "", why);
    }

    /// Makes a key with a new random value; the value is returned, once.
    pub async fn create(
        &self,
        caller: &Caller,
        key_id: &str,
        scopes: Vec<String>,
        quotas: KeyQuotas,
    ) -> Result<(ApiKey, String), DriverError> {
        let valid_id = (1..=64).contains(&key_id.len())
            && key_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_id {
            return Err(DriverError::invalid(
                "key_id",
                "must be 1 to 64 letters, digits, '-' or '_'",
            ));
        }
        if scopes.is_empty() {
            return Err(DriverError::invalid(
                "scopes",
                format!(
                    "must list some of {}",
                    claudecluster_config::SCOPES.join(", ")
                ),
            ));
        }
        if let Some(unknown) = scopes
            .iter()
            .find(|scope| !claudecluster_config::SCOPES.contains(&scope.as_str()))
        {
            return Err(DriverError::invalid(
                "scopes",
                format!(
                    "`{}` is not one of {}",
                    unknown.chars().take(64).collect::<String>(),
                    claudecluster_config::SCOPES.join(", ")
                ),
            ));
        }
        if !(quotas.requests_per_second.is_finite() && quotas.requests_per_second >= 0.0) {
            return Err(DriverError::invalid(
                "quotas.requests_per_second",
                "must be zero (the default) or more",
            ));
        }
        for (field, value) in [
            ("quotas.budget_usd_per_day", quotas.budget_usd_per_day),
            ("quotas.budget_usd_per_month", quotas.budget_usd_per_month),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(DriverError::invalid(
                    field,
                    "must be zero (no limit) or more",
                ));
            }
        }
        if self.configured.values().any(|key| key.id == key_id) {
            return Err(DriverError::KeyExists(key_id.to_owned()));
        }
        let secret = format!(
            "cck_{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let row = KeyRow {
            id: key_id.to_owned(),
            sha256: sha256_hex(&secret),
            scopes,
            quotas: quotas.encode_to_vec(),
            created_by: caller.key_id.clone(),
            created_ms: now_ms(),
            revoked_ms: None,
        };
        if !self.db.insert_key(&row).await? {
            return Err(DriverError::KeyExists(key_id.to_owned()));
        }
        *self.stored_keys_exist.lock().expect("auth lock poisoned") = Some((Instant::now(), true));
        self.audit(caller, "key.create", key_id, &row.scopes.join(" "));
        Ok((self.public(&row), secret))
    }

    /// Revokes a stored key: it stops working here at once.
    pub async fn revoke(&self, caller: &Caller, key_id: &str) -> Result<ApiKey, DriverError> {
        if self.configured.values().any(|key| key.id == key_id) {
            return Err(DriverError::invalid(
                "key_id",
                format!(
                    "`{key_id}` is in the configuration (driver.auth.apiKeys); remove it there"
                ),
            ));
        }
        let row = self
            .db
            .revoke_key(key_id)
            .await?
            .ok_or_else(|| DriverError::KeyNotFound(key_id.chars().take(64).collect()))?;
        self.stored.lock().expect("auth lock poisoned").insert(
            row.sha256.clone(),
            (Instant::now(), Some(self.known_from_row(&row))),
        );
        // Read again at the next call: this may have been the last key in force.
        let stale = Instant::now()
            .checked_sub(FRESHNESS)
            .unwrap_or_else(Instant::now);
        *self.stored_keys_exist.lock().expect("auth lock poisoned") = Some((stale, true));
        self.audit(caller, "key.revoke", key_id, "");
        Ok(self.public(&row))
    }

    /// Every key, the configuration's first.
    pub async fn list(&self) -> Result<Vec<ApiKey>, DriverError> {
        let mut keys: Vec<ApiKey> = self
            .configured
            .values()
            .map(|key| ApiKey {
                key_id: key.id.clone(),
                scopes: key.scopes.clone(),
                source: "config".into(),
                quotas: Some(key.quotas.to_proto()),
                ..Default::default()
            })
            .collect();
        keys.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        for row in self.db.keys().await? {
            keys.push(self.public(&row));
        }
        Ok(keys)
    }

    fn public(&self, row: &KeyRow) -> ApiKey {
        let asked = KeyQuotas::decode(row.quotas.as_slice()).unwrap_or_default();
        ApiKey {
            key_id: row.id.clone(),
            scopes: row.scopes.clone(),
            source: "store".into(),
            create_time: Some(timestamp(row.created_ms)),
            revoke_time: row.revoked_ms.map(timestamp),
            quotas: Some(Quotas::or(&asked, self.defaults).to_proto()),
            created_by: row.created_by.clone(),
        }
    }
}

pub fn timestamp(ms: i64) -> claudecluster_proto::Timestamp {
    claudecluster_proto::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn sha256_hex(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Audit records written in one transaction at most.
const AUDIT_BATCH: usize = 512;
/// How long the first record of a batch waits for others. No call waits on its record, and a
/// driver busy with a thousand calls a second would otherwise pay a transaction for each.
const AUDIT_GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// Writes audit records as they come, a batch of what has gathered at a time, so that a busy
/// driver pays one transaction for many; a store that is away loses none of the log lines,
/// which were written first.
async fn write_audit(db: Arc<Db>, mut incoming: mpsc::UnboundedReceiver<Audited>) {
    let mut batch = Vec::with_capacity(AUDIT_BATCH);
    let mut flushes = Vec::new();
    // Takes a record into the batch, or a flush to answer once it is stored; true once a flush
    // is waiting.
    fn take(
        audited: Audited,
        batch: &mut Vec<AuditRow>,
        flushes: &mut Vec<tokio::sync::oneshot::Sender<()>>,
    ) -> bool {
        match audited {
            Audited::Record(record) => batch.push(record),
            Audited::Flush(done) => flushes.push(done),
        }
        !flushes.is_empty()
    }
    while let Some(first) = incoming.recv().await {
        if !take(first, &mut batch, &mut flushes) {
            tokio::time::sleep(AUDIT_GATHER).await;
        }
        while batch.len() < AUDIT_BATCH
            && let Ok(next) = incoming.try_recv()
        {
            take(next, &mut batch, &mut flushes);
        }
        if !batch.is_empty()
            && let Err(err) = db.append_audit(&batch).await
        {
            tracing::warn!(error = %err, records = batch.len(), "cannot store audit records");
        }
        batch.clear();
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Audit records gather for a moment before they are stored, and a flush stores them at
    /// once, in the order they were made.
    #[tokio::test]
    async fn audit_records_gather_and_a_flush_stores_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("driver.db").display());
        let db = Arc::new(Db::open(&url, 2).await.unwrap());
        let auth = Auth::new(db.clone(), &AuthConfig::default(), false);
        let caller = Caller {
            key_id: "alice".into(),
            scopes: Vec::new(),
            quotas: None,
        };
        for n in 0..600 {
            auth.audit(&caller, "task.submit", &format!("task-{n}"), "");
        }
        auth.flush_audit().await;
        let stored = db.audit_page(0, 1000).await.unwrap();
        let subjects: Vec<String> = stored.iter().map(|row| row.subject.clone()).collect();
        let made: Vec<String> = (0..600).map(|n| format!("task-{n}")).collect();
        assert_eq!(subjects, made);
        // Nothing waiting: a flush answers at once.
        tokio::time::timeout(Duration::from_secs(5), auth.flush_audit())
            .await
            .unwrap();
    }

    #[test]
    fn keys_are_known_by_their_sha256() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn an_admin_sees_everything_and_a_key_only_its_own() {
        let alice = Caller {
            key_id: "alice".into(),
            scopes: vec!["tasks:read".into()],
            quotas: None,
        };
        assert!(alice.may_see("alice"));
        assert!(!alice.may_see("bob"));
        assert!(!alice.has(Scope::TasksWrite));
        assert!(Caller::anyone().may_see("bob"));
        assert!(Caller::anyone().has(Scope::Sessions));
    }
}
