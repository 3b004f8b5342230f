//! `auditbridge log …`: the tenants' verifiable logs. `keygen` makes the log's signing key;
//! `export` writes a tenant's bundle and `verify` checks one offline; `audit` replays every
//! log in the database against its signed checkpoints.
//!
//! `verify` and `audit` exit 0 when everything checks, 1 when they found tampering (each
//! finding names the tenant, the index and, where known, the event), 2 on a usage or
//! configuration error, 3 when the bundle or the database could not be read.

mod audit;
mod bundle;
mod keygen;
mod receipts;
mod replay;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use auditbridge_config::Config;
use auditbridge_tlog::VerifierKey;

/// Tampering found.
const TAMPERED: u8 = 1;
/// A usage or configuration error.
const USAGE: u8 = 2;
/// The bundle or the database could not be read.
const UNREADABLE: u8 = 3;

/// Log entries read from the database per query (`export`, `audit`).
const BATCH: usize = 5_000;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum LogCommand {
    /// Make the log's Ed25519 signing key: write the private key (signed-note format, mode
    /// 0600) to --out, for AUDITBRIDGE_LOG_KEY_FILE, and print the verifier key to give to
    /// auditors. Refuses to overwrite a file.
    Keygen {
        /// The log's name: the key name of its signatures and the start of every
        /// checkpoint's origin line (`<name>/<tenant>`), such as audit.example.com/log.
        #[arg(long)]
        name: String,
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a tenant's bundle to --out (a new or empty directory): its events in log order,
    /// exactly the bytes of their leaves, one per line; the newest signed checkpoint, which
    /// they reproduce; the verifier key; and the log's leaf hashes and commit order, which
    /// let `verify` name what differs.
    Export {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        out: PathBuf,
        /// The log's verifier key (default: derived from AUDITBRIDGE_LOG_KEY_FILE).
        #[arg(long)]
        key: Option<String>,
    },
    /// Check a bundle offline, with no database: its checkpoint is signed by --key and its
    /// events reproduce it. The key inside the bundle proves nothing: give the one you were
    /// given by the log's operator.
    Verify {
        /// The bundle's directory.
        dir: PathBuf,
        /// The verifier key you trust (`<name>+<hash>+<base64>`).
        #[arg(long)]
        key: String,
    },
    /// Replay every tenant's log (or --tenant's) from the database: each event against its
    /// leaf, the commit order, the stored subtrees and every signed checkpoint; with
    /// --checkpoint, also against a checkpoint kept elsewhere (a log cut back below it, or
    /// rewritten, fails).
    Audit {
        #[arg(long)]
        tenant: Option<String>,
        /// A signed checkpoint note kept outside the database (from GET /v1/log/checkpoint,
        /// a destination, or an earlier bundle).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// The log's verifier key (default: derived from AUDITBRIDGE_LOG_KEY_FILE).
        #[arg(long)]
        key: Option<String>,
    },
}

impl LogCommand {
    /// Whether the command runs without the configuration (no database, no NATS).
    pub(crate) fn is_offline(&self) -> bool {
        matches!(self, LogCommand::Keygen { .. } | LogCommand::Verify { .. })
    }
}

/// Runs `keygen` and `verify`, which need no configuration.
pub(crate) fn run_offline(command: LogCommand) -> ExitCode {
    match command {
        LogCommand::Keygen { name, out } => keygen::run(&name, &out),
        LogCommand::Verify { dir, key } => match parse_key(&key, "--key") {
            Ok(key) => bundle::verify(&dir, &key),
            Err(code) => code,
        },
        LogCommand::Export { .. } | LogCommand::Audit { .. } => {
            unreachable!("export and audit run with the configuration")
        }
    }
}

/// Runs `export` and `audit`.
pub(crate) async fn run(command: LogCommand, config: &Config) -> ExitCode {
    match command {
        LogCommand::Export { tenant, out, key } => match log_key(key.as_deref(), config) {
            Ok(key) => bundle::export(config, &tenant, &out, &key).await,
            Err(code) => code,
        },
        LogCommand::Audit {
            tenant,
            checkpoint,
            key,
        } => match log_key(key.as_deref(), config) {
            Ok(key) => audit::run(config, tenant.as_deref(), checkpoint.as_deref(), &key).await,
            Err(code) => code,
        },
        LogCommand::Keygen { .. } | LogCommand::Verify { .. } => run_offline(command),
    }
}

/// The database of AUDITBRIDGE_DATABASE_URL (connected on first use: an unreachable one
/// fails the first query, exit 3); a URL it cannot use is a configuration error.
fn connect(config: &Config) -> Result<auditbridge_store::Store, ExitCode> {
    auditbridge_store::Store::connect_lazy(config.database_url.expose(), 2).map_err(|e| {
        eprintln!("error: AUDITBRIDGE_DATABASE_URL: {e}");
        ExitCode::from(USAGE)
    })
}

fn parse_key(text: &str, what: &str) -> Result<VerifierKey, ExitCode> {
    text.trim().parse().map_err(|e| {
        eprintln!("error: {what}: {e} (expected a verifier key <name>+<hash>+<base64>)");
        ExitCode::from(USAGE)
    })
}

/// The verifier key: `--key`, or the one of the signing key in AUDITBRIDGE_LOG_KEY_FILE.
fn log_key(given: Option<&str>, config: &Config) -> Result<VerifierKey, ExitCode> {
    if let Some(text) = given {
        return parse_key(text, "--key");
    }
    match &config.log_key_file {
        Some(path) => auditbridge_worker::read_log_key(path)
            .map(|k| k.verifier())
            .map_err(|e| {
                eprintln!("error: {e:#}");
                ExitCode::from(USAGE)
            }),
        None => {
            eprintln!(
                "error: no verifier key: pass --key <name>+<hash>+<base64>, or set \
                 AUDITBRIDGE_LOG_KEY_FILE to the log's signing key"
            );
            Err(ExitCode::from(USAGE))
        }
    }
}

/// The tenant a checkpoint of this log is of: its origin is `<key name>/<tenant>`.
fn origin_tenant<'o>(origin: &'o str, key: &VerifierKey) -> Option<&'o str> {
    origin
        .strip_prefix(key.name())
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|t| !t.is_empty())
}

/// A Unix time as RFC 3339, for messages.
fn unix_time(seconds: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(seconds as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{seconds} (Unix time)"))
}

fn read_text(path: &Path) -> Result<String, ExitCode> {
    std::fs::read_to_string(path).map_err(|e| {
        eprintln!("error: cannot read {}: {e}", path.display());
        ExitCode::from(UNREADABLE)
    })
}
