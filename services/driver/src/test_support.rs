//! Helpers for the driver's unit tests.

use std::time::Duration;

/// Waits until `condition` holds, checking every few milliseconds, for at most 10 s.
pub async fn wait(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the condition did not hold within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A fresh store URL of each backend the tests run against: SQLite in `dir`, and a new
/// database on the test PostgreSQL (`CLAUDECLUSTER_TEST_POSTGRES_URL`, which
/// `scripts/setup.sh` starts). Without that variable the PostgreSQL case fails under CI, and is
/// left out with a note elsewhere.
pub async fn store_urls(dir: &std::path::Path) -> Vec<String> {
    let mut urls = vec![format!("sqlite://{}", dir.join("driver.db").display())];
    match std::env::var("CLAUDECLUSTER_TEST_POSTGRES_URL") {
        Ok(admin) => urls.push(fresh_postgres_database(&admin).await),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!(
                "CLAUDECLUSTER_TEST_POSTGRES_URL is not set: run scripts/setup.sh, which starts a test PostgreSQL"
            )
        }
        Err(_) => {
            eprintln!("note: CLAUDECLUSTER_TEST_POSTGRES_URL is not set; testing SQLite only")
        }
    }
    urls
}

/// Creates an empty database on the server at `admin` and returns its URL.
pub async fn fresh_postgres_database(admin: &str) -> String {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let name = format!("store_test_{}", uuid::Uuid::new_v4().simple());
    let mut connection = sqlx::AnyConnection::connect(admin)
        .await
        .unwrap_or_else(|err| panic!("cannot reach the test PostgreSQL at {admin}: {err}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut connection)
        .await
        .expect("create a test database");
    let base = admin.rsplit_once('/').map_or(admin, |(base, _)| base);
    format!("{base}/{name}")
}
