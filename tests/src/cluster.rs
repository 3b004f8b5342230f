//! A private PostgreSQL cluster for one test: `initdb` in a temporary directory and a server
//! on a free port, run as the `postgres` OS user when the test runs as root (initdb refuses
//! root). Used to move a database to a *fresh* cluster (`pg_dump` / `pg_restore`), whose
//! transaction ids start low again. Stopped (`pg_ctl stop -m immediate`) and removed when
//! dropped, also after a failed assertion.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Where Debian puts PostgreSQL 15's programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Cluster {
    dir: PathBuf,
    pub port: u16,
}

/// Runs one of PostgreSQL's programs, as `postgres` when we are root.
fn pg(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let path = Path::new(PG_BIN).join(program);
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut cmd = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    let out = cmd
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Cluster {
    /// `initdb` (trust, user `postgres`) and start a server on a free loopback port.
    pub fn start() -> anyhow::Result<Cluster> {
        let port = crate::free_addr()?.port();
        let dir =
            std::env::temp_dir().join(format!("ab-cluster-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir)?;
        // Owned by postgres, so initdb (run as postgres) can write it.
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status();
        let cluster = Cluster { dir, port };
        let data = cluster.dir.join("data");
        let data_s = data.to_string_lossy().into_owned();
        pg(
            "initdb",
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        let opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            cluster.dir.display()
        );
        let log = cluster
            .dir
            .join("server.log")
            .to_string_lossy()
            .into_owned();
        pg(
            "pg_ctl",
            &[
                "-D", &data_s, "-o", &opts, "-l", &log, "-w", "-t", "60", "start",
            ],
        )?;
        Ok(cluster)
    }

    /// A URL for `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Copies `from` (a database URL) into a new database `name` on this cluster with
    /// `pg_dump -Fc` and `pg_restore`, as an operator moving a trail would.
    pub fn restore_from(&self, from: &str, name: &str) -> anyhow::Result<String> {
        let dump = self.dir.join(format!("{name}.dump"));
        let dump_s = dump.to_string_lossy().into_owned();
        pg("pg_dump", &["-Fc", "-f", &dump_s, "-d", from])?;
        pg(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                name,
            ],
        )?;
        let url = self.url(name);
        pg(
            "pg_restore",
            // Roles are cluster-global and the new cluster has none of ours yet: restore
            // without owners and grants; `auditbridge migrate` creates the roles and applies
            // the grants afterwards (README, "Moving the database to another cluster").
            &[
                "--no-owner",
                "--no-privileges",
                "--exit-on-error",
                "-d",
                &url,
                &dump_s,
            ],
        )?;
        Ok(url)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data").to_string_lossy().into_owned();
        let _ = pg("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
