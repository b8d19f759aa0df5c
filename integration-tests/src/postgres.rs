//! A PostgreSQL server of a test's own (its data directory, a free loopback port), started as
//! the `postgres` user because PostgreSQL refuses to run as root, so that the test may stop
//! and start it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory of PostgreSQL's programs: `PG_BIN` (set by `scripts/setup.sh`) or the newest
/// installed version.
fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .filter(|dir| dir.join("initdb").exists())
        .expect("PostgreSQL is missing: run scripts/setup.sh (it installs Debian's postgresql)")
}

/// Runs a PostgreSQL program as the `postgres` user when this process is root.
fn as_postgres(program: &Path) -> Command {
    let root = std::fs::metadata("/proc/self")
        .map(|meta| std::os::unix::fs::MetadataExt::uid(&meta) == 0)
        .unwrap_or(false);
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

pub struct TestPostgres {
    data: tempfile::TempDir,
    pub port: u16,
}

impl TestPostgres {
    /// Creates a cluster in a new directory and starts it.
    pub fn start() -> Self {
        // Under /var/tmp: the `postgres` user cannot enter root's private temporary dirs.
        let data = tempfile::Builder::new()
            .prefix("claudecluster-test-pg-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let _ = Command::new("chown")
            .arg("postgres")
            .arg(data.path())
            .status();
        let initdb = as_postgres(&pg_bin().join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(data.path().join("pgdata"))
            .output()
            .expect("run initdb");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = TestPostgres { data, port };
        server.resume();
        server
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) {
        let output = as_postgres(&pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(self.data.path().join("pgdata"))
            .args(args)
            .output()
            .expect("run pg_ctl");
        assert!(
            output.status.success(),
            "pg_ctl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs one SQL statement with psql and returns what it printed, unaligned.
    pub fn sql(&self, statement: &str) -> String {
        let output = as_postgres(&pg_bin().join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-tAc", statement])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Stops the server at once (`-m immediate`: as if it crashed).
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn resume(&self) {
        let options = format!("-h 127.0.0.1 -p {} -k /tmp -c fsync=off", self.port);
        let log = self.data.path().join("server.log");
        self.pg_ctl(&["-w", "-l", log.to_str().unwrap(), "-o", &options, "start"]);
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(self.data.path().join("pgdata"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}
