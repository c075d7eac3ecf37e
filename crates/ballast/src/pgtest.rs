//! A throwaway PostgreSQL cluster for tests: `initdb` and `pg_ctl` (PostgreSQL's server
//! binaries on the PATH) in a temp dir, on a free loopback port, stopped and removed on
//! drop. PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres`
//! user on a directory it owns. Used by the unit tests and, through the `test-support`
//! feature, by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PgCluster {
    dir: tempfile::TempDir,
    data: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

/// Whether this process runs as root (the owner of `/proc/self`).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `cmd args…`, as the `postgres` user when `as_postgres`.
fn command(as_postgres: bool, program: &str) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn chown_to_postgres(path: &Path) -> Result<(), String> {
    run({
        let mut c = Command::new("chown");
        c.args(["-R", "postgres:postgres"]).arg(path);
        c
    })
}

/// A temp dir for a cluster, owned by the user the server runs as.
fn cluster_dir(prefix: &str, as_postgres: bool) -> Result<tempfile::TempDir, String> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| e.to_string())?;
    if as_postgres {
        chown_to_postgres(dir.path())?;
    }
    Ok(dir)
}

fn free_port() -> Result<u16, String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port())
}

/// A PostgreSQL program from the same installation as the `initdb` on the PATH (Debian
/// puts only wrappers of some of them on the PATH).
fn beside_initdb(program: &str) -> String {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("initdb"))
            .find(|p| p.is_file())
    });
    found
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(|d| d.join(program)))
        .filter(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| program.to_string())
}

fn start_server(as_postgres: bool, dir: &Path, data: &Path, port: u16) -> Result<(), String> {
    let mut start = command(as_postgres, "pg_ctl");
    start
        .arg("-D")
        .arg(data)
        .arg("-l")
        .arg(dir.join("postgres.log"))
        .args(["-w", "-t", "60", "-o"])
        .arg(format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            dir.display()
        ))
        .arg("start");
    run(start)
}

impl PgCluster {
    /// Starts a cluster with user `ballast` trusted on loopback; panics (with
    /// PostgreSQL's own output) if it cannot.
    pub fn start() -> PgCluster {
        PgCluster::try_start().unwrap_or_else(|e| panic!("starting a test PostgreSQL: {e}"))
    }

    fn try_start() -> Result<PgCluster, String> {
        let as_postgres = is_root();
        let dir = cluster_dir("ballast-pg-", as_postgres)?;
        let data = dir.path().join("data");
        let mut initdb = command(as_postgres, "initdb");
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "ballast",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(initdb)?;
        let port = free_port()?;
        start_server(as_postgres, dir.path(), &data, port)?;
        Ok(PgCluster {
            dir,
            data,
            port,
            as_postgres,
        })
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`), started on its own free
    /// loopback port. Make it synchronous with [`PgCluster::require_sync_standby`].
    pub fn start_standby(primary: &PgCluster) -> PgCluster {
        PgCluster::try_start_standby(primary)
            .unwrap_or_else(|e| panic!("starting a test standby: {e}"))
    }

    fn try_start_standby(primary: &PgCluster) -> Result<PgCluster, String> {
        let as_postgres = primary.as_postgres;
        let dir = cluster_dir("ballast-pg-standby-", as_postgres)?;
        let data = dir.path().join("data");
        let mut backup = command(as_postgres, &beside_initdb("pg_basebackup"));
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "ballast",
                "-X",
                "stream",
                "-R",
                "--checkpoint=fast",
                "-p",
            ])
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(&data);
        run(backup)?;
        let port = free_port()?;
        start_server(as_postgres, dir.path(), &data, port)?;
        Ok(PgCluster {
            dir,
            data,
            port,
            as_postgres,
        })
    }

    /// Commits wait until a standby has the WAL (`synchronous_standby_names = '*'`).
    pub async fn require_sync_standby(&self) {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL: {e}"));
        let task = tokio::spawn(conn);
        client
            .batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            .await
            .unwrap_or_else(|e| panic!("synchronous_standby_names: {e}"));
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap_or_else(|e| panic!("reload: {e}"));
        // Until the standby reports itself synchronous.
        for _ in 0..200 {
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                    &[],
                )
                .await
                .unwrap_or_else(|e| panic!("pg_stat_replication: {e}"));
            if row.get::<_, i64>(0) > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        drop(client);
        let _ = task.await;
    }

    /// Stops the server at once, as a crash would (`pg_ctl -m immediate`): connections
    /// drop, new ones are refused.
    pub fn stop(&self) {
        let mut stop = command(self.as_postgres, "pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        run(stop).unwrap_or_else(|e| panic!("stopping the test PostgreSQL: {e}"));
    }

    /// Starts it again after [`PgCluster::stop`], on the same port and data.
    pub fn restart(&self) {
        start_server(self.as_postgres, self.dir.path(), &self.data, self.port)
            .unwrap_or_else(|e| panic!("restarting the test PostgreSQL: {e}"));
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waiting for it).
    pub fn promote(&self) {
        let mut promote = command(self.as_postgres, "pg_ctl");
        promote.arg("-D").arg(&self.data).args(["-w", "promote"]);
        run(promote).unwrap_or_else(|e| panic!("promoting the standby: {e}"));
    }

    /// A URL for database `db` (see [`PgCluster::create_db`]).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://ballast@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db` (through the `postgres` database).
    pub async fn create_db(&self, db: &str) {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to the test PostgreSQL: {e}"));
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {db}: {e}"));
        drop(client);
        let _ = task.await;
    }

    /// `create_db` for callers without a runtime (integration tests): on a runtime of
    /// its own for the one statement.
    pub fn create_db_blocking(&self, db: &str) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("a runtime for CREATE DATABASE: {e}"))
            .block_on(self.create_db(db));
    }

    /// The server's processes: the postmaster (first line of `postmaster.pid`) and its
    /// children (the backends and the background workers), from `/proc`.
    fn processes(&self) -> Vec<u32> {
        let Some(postmaster) = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse::<u32>().ok())
        else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // `pid (comm) state ppid …`: the fields after the last ')'.
            let parent = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1.to_string();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if parent == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    fn signal_all(&self, signal: &str) {
        for pid in self.processes() {
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    /// Freezes the whole server (SIGSTOP to the postmaster and every backend): the
    /// connections stay open and nothing answers, as with a database host that hangs.
    pub fn freeze(&self) {
        self.signal_all("-STOP");
    }

    /// Lets a frozen server run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal_all("-CONT");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.thaw();
        let mut stop = command(self.as_postgres, "pg_ctl");
        stop.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = stop.output();
    }
}
