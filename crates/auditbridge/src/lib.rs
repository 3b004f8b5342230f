//! The `auditbridge` command. Each subcommand lives in its own module; this one parses the
//! command line, loads the configuration, and maps failures to an exit code and one clear
//! message.

mod dead_letters;
mod destinations;
mod log;
mod poll;
mod publish;
mod retention;
mod status;
mod tail_file;

use std::process::ExitCode;

use anyhow::Context as _;
use auditbridge_config::Config;
use auditbridge_runtime::telemetry;
use auditbridge_worker::Worker;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Carries audit events from NATS JetStream into an immutable, deduplicated trail in
/// PostgreSQL. Configuration: AUDITBRIDGE_* variables and the TOML file named by
/// AUDITBRIDGE_CONFIG (see README).
#[derive(Debug, Parser)]
#[command(name = "auditbridge", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the database if it is missing, apply the migrations, create the
    /// least-privilege roles and apply their grants. Connects with
    /// AUDITBRIDGE_MIGRATE_DATABASE_URL (default: AUDITBRIDGE_DATABASE_URL), as a superuser or
    /// the owner role.
    Migrate {
        /// Do not create roles, transfer ownership or grant: where roles and grants are
        /// managed elsewhere (crates/store/sql/grants.sql lists what they need).
        #[arg(long)]
        no_roles: bool,
    },
    /// Consume, validate and persist events; provisions the stream and consumer if missing.
    Worker,
    /// Publish events: synthetic ones with --generate, or JSON lines from standard input.
    Publish(publish::Args),
    /// Show the consumer's pending counts, stored events and dead letters.
    Status(status::Args),
    /// Measure end-to-end throughput and latency next to the raw limits of this machine.
    Bench(auditbridge_bench::Args),
    /// Follow JSONL files (the `file` sources of the configuration) and publish their lines.
    TailFile(tail_file::Args),
    /// Pull audit logs from other systems' APIs (the `api` sources of the configuration).
    Poll(poll::Args),
    /// Destinations: rewind one, list and redeliver the events it could not take.
    #[command(subcommand)]
    Destinations(destinations::DestinationsCommand),
    /// Serve the query API (search, pages, live tail, stats, a small page) on
    /// AUDITBRIDGE_API_ADDR.
    Serve,
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Maintain the outbox order (relays and live tails).
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// The tenants' verifiable logs: signing key, bundles, offline verification, audit.
    #[command(subcommand)]
    Log(log::LogCommand),
    /// Legal holds: a held range of a tenant's events is never expired.
    #[command(subcommand)]
    Hold(retention::HoldCommand),
    /// Retention: expire what is due now, or say what would go.
    #[command(subcommand)]
    Retention(retention::RetentionCommand),
    /// What ingest refused: list and show dead letters.
    #[command(subcommand)]
    DeadLetters(dead_letters::DeadLettersCommand),
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// After the trail was moved to another cluster (pg_dump / pg_restore): start a new
    /// outbox generation so that relays and live tails go on after every stored event.
    /// Does nothing when the order is intact; safe while workers run (it holds inserts for
    /// a moment).
    Rebase,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new random token and the configuration entry that holds its hash. The token is
    /// shown once; the configuration keeps only its SHA-256.
    New {
        /// A name for the token (shown in logs instead of the token).
        #[arg(long)]
        name: String,
        /// The tenant it may read (and write, with the ingest scope).
        #[arg(long, conflicts_with = "admin", required_unless_present = "admin")]
        tenant: Option<String>,
        /// May read every tenant.
        #[arg(long)]
        admin: bool,
        /// Comma-separated scopes: read, ingest.
        #[arg(long, default_value = "read", value_delimiter = ',')]
        scopes: Vec<String>,
    },
}

fn parse_timestamp(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("expected an RFC 3339 timestamp such as 2026-11-22T10:00:00Z ({e})"))
}

/// Entry point of the binary (also used by the end-to-end test crate's copy of it).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Need no configuration: a key is made before a worker is configured to use it, and a
    // bundle is verified where there is no database.
    if matches!(&cli.command, Command::Log(c) if c.is_offline()) {
        let Command::Log(command) = cli.command else {
            unreachable!("matched above")
        };
        return log::run_offline(command);
    }
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = telemetry::init_logging(&config.log, config.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    for var in config.unknown_env() {
        tracing::warn!(variable = %var, message = "Unknown AUDITBRIDGE_* variable ignored (a typo?).");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command, config));
    // Blocking work still running (a file read, a DNS lookup of a reconnect) must not hold the
    // exit beyond the stop's deadline.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate { no_roles } => {
            let url = config.migrate_database_url.expose();
            let roles = if no_roles {
                auditbridge_store::Roles::Skip
            } else {
                auditbridge_store::Roles::Manage
            };
            let policy = auditbridge_worker::retention::policy_of(&config);
            let done = auditbridge_store::migrate_with(url, roles, Some(&policy))
                .await
                .with_context(|| format!("migrating {}", config.migrate_database_url))?;
            let name = url.rsplit('/').next().unwrap_or("");
            let name = name.split('?').next().unwrap_or("");
            if done.created_database {
                println!("created database {name}");
            }
            println!(
                "database {name} is at migration {}",
                auditbridge_store::MIGRATOR
                    .iter()
                    .map(|m| m.version)
                    .max()
                    .unwrap_or(0)
            );
            if no_roles {
                println!("roles and grants left as they are (--no-roles)");
            } else {
                for role in &done.created_roles {
                    println!(
                        "created role {role} (LOGIN, no password; see README, \"Database roles\")"
                    );
                }
                println!(
                    "grants applied: {} owns the schema; workers connect as {}, serve as {}",
                    auditbridge_store::roles::OWNER,
                    auditbridge_store::roles::WRITER,
                    auditbridge_store::roles::READER
                );
            }
            println!("{}", retention::describe(&policy));
            let store = auditbridge_store::Store::connect_lazy(url, 1)?;
            let health = store.outbox_health().await;
            store.close().await;
            match health {
                Ok(h) if h.needs_rebase() => eprintln!("warning: {}", h.advice()),
                Ok(_) => {}
                Err(e) => eprintln!("warning: cannot check the outbox order: {e}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker => {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            let worker = Worker::build(config).await?;
            tracing::info!(metrics = %worker.metrics_addr(), message = "Worker starting.");
            worker.run(shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish(args) => publish::run(args, &config).await,
        Command::Status(args) => status::run(args, &config).await,
        Command::Bench(args) => auditbridge_bench::run(args, &config).await,
        Command::TailFile(args) => tail_file::run(args, &config).await,
        Command::Poll(args) => poll::run(args, &config).await,
        Command::Serve => {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            let server = auditbridge_api::Server::build(config).await?;
            tracing::info!(addr = %server.local_addr(), message = "API server listening.");
            server.run(shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::New {
            name,
            tenant,
            admin,
            scopes,
        }) => {
            let token = auditbridge_api::auth::generate_token();
            let mut entry = serde_json::json!({
                "name": name,
                "sha256": auditbridge_api::auth::hash_token(&token),
                "scopes": scopes,
            });
            match tenant {
                Some(t) => entry["tenant"] = t.into(),
                None => entry["admin"] = admin.into(),
            }
            // Checked with the same rules the server applies at start-up.
            let item = [("AUDITBRIDGE_API_TOKENS".to_owned(), format!("[{entry}]"))];
            if let Err(e) = Config::from_env(item) {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
            println!("token (shown once, give it to the client): {token}");
            println!("AUDITBRIDGE_API_TOKENS item: {entry}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Log(command) => Ok(log::run(command, &config).await),
        Command::Hold(command) => retention::hold(command, &config).await,
        Command::Retention(command) => retention::retention(command, &config).await,
        Command::DeadLetters(command) => dead_letters::run(command, &config).await,
        Command::Outbox(OutboxCommand::Rebase) => {
            let store =
                auditbridge_store::Store::connect_lazy(config.migrate_database_url.expose(), 1)?;
            let done = store.rebase_outbox().await.context("rebasing the outbox")?;
            store.close().await;
            match done {
                auditbridge_store::outbox::Rebase::NotNeeded => {
                    println!("the outbox order is intact: nothing to do");
                }
                auditbridge_store::outbox::Rebase::Rebased {
                    generation,
                    first_seq,
                    reason,
                } => {
                    println!(
                        "outbox generation {generation} starts at seq {first_seq}: relays and live tails go on after every stored event ({reason})"
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Destinations(command) => destinations::run(command, &config).await,
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!(message = "Cannot install signal handlers.");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(message = "SIGTERM: stopping."),
        _ = int.recv() => tracing::info!(message = "SIGINT: stopping."),
    }
    token.cancel();
}
