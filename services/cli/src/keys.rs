//! `claudecluster keys` and `claudecluster audit`: the driver's API keys and its audit log.

use std::process::ExitCode;

use clap::Subcommand;
use claudecluster_proto::v1::*;

use crate::client::{DriverArgs, connect, status_error};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Make a key in the driver's store (admin); prints the key once.
    Create {
        /// 1 to 64 letters, digits, '-' or '_'.
        key_id: String,
        /// tasks:read, tasks:write, sessions or admin (repeatable).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Requests a second (default: `driver.auth.quotas`).
        #[arg(long)]
        requests_per_second: Option<f64>,
        /// Tasks not yet ended at once.
        #[arg(long)]
        running_tasks: Option<u32>,
        /// Sessions open at once.
        #[arg(long)]
        open_sessions: Option<u32>,
        /// USD the key may spend per UTC day.
        #[arg(long)]
        budget_usd_per_day: Option<f64>,
        /// USD the key may spend per UTC month.
        #[arg(long)]
        budget_usd_per_month: Option<f64>,
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// Every key, without its value (admin).
    List {
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// Revoke a stored key: it stops working at once (admin).
    Revoke {
        key_id: String,
        #[command(flatten)]
        driver: DriverArgs,
    },
    /// Make a key for `driver.auth.apiKeys` without a driver: prints the key and its SHA-256.
    New,
}

pub async fn keys(command: KeysCommand) -> Result<ExitCode, String> {
    match command {
        KeysCommand::Create {
            key_id,
            scopes,
            requests_per_second,
            running_tasks,
            open_sessions,
            budget_usd_per_day,
            budget_usd_per_month,
            driver,
        } => {
            let request = CreateApiKeyRequest {
                key_id,
                scopes,
                quotas: Some(KeyQuotas {
                    requests_per_second: requests_per_second.unwrap_or_default(),
                    running_tasks: running_tasks.unwrap_or_default(),
                    open_sessions: open_sessions.unwrap_or_default(),
                    budget_usd_per_day: budget_usd_per_day.unwrap_or_default(),
                    budget_usd_per_month: budget_usd_per_month.unwrap_or_default(),
                }),
            };
            let response = connect(&driver)?
                .create_api_key(request)
                .await
                .map_err(status_error)?
                .into_inner();
            let key = response.key.unwrap_or_default();
            eprintln!(
                "key `{}` ({}): shown once, keep it safe",
                key.key_id,
                key.scopes.join(" ")
            );
            println!("{}", response.secret);
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::List { driver } => {
            let keys = connect(&driver)?
                .list_api_keys(ListApiKeysRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .keys;
            println!("{:<24} {:<7} {:<8} SCOPES", "KEY", "SOURCE", "STATE");
            for key in keys {
                let state = if key.revoke_time.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<24} {:<7} {:<8} {}",
                    key.key_id,
                    key.source,
                    state,
                    key.scopes.join(" ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Revoke { key_id, driver } => {
            let key = connect(&driver)?
                .revoke_api_key(RevokeApiKeyRequest { key_id })
                .await
                .map_err(status_error)?
                .into_inner()
                .key
                .unwrap_or_default();
            println!("{}: revoked", key.key_id);
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::New => {
            let key = format!(
                "cck_{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            println!("key:    {key}");
            println!("sha256: {}", sha256_hex(&key));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The audit log, oldest first (admin).
pub async fn audit(driver: DriverArgs) -> Result<ExitCode, String> {
    let mut client = connect(&driver)?;
    let mut page_token = String::new();
    loop {
        let page = client
            .list_audit_records(ListAuditRecordsRequest {
                page_size: 1000,
                page_token,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        for record in page.records {
            let key = if record.key_id.is_empty() {
                "-"
            } else {
                &record.key_id
            };
            println!(
                "{} {} {} {} {}",
                record.sequence, key, record.action, record.subject, record.detail
            );
        }
        if page.next_page_token.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        page_token = page.next_page_token;
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}
