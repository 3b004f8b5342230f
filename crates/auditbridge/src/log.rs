//! `auditbridge log …`: the tenants' verifiable logs. `keygen` makes the log's signing key.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use auditbridge_tlog::SignerKey;

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
}

pub(crate) fn run(command: LogCommand) -> ExitCode {
    match command {
        LogCommand::Keygen { name, out } => keygen(&name, &out),
    }
}

fn keygen(name: &str, out: &std::path::Path) -> ExitCode {
    let key = match SignerKey::generate(name) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: --name: {e}");
            return ExitCode::from(2);
        }
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .and_then(|mut file| {
            file.write_all(format!("{}\n", key.to_private_text()).as_bytes())?;
            file.sync_all()
        });
    match written {
        Ok(()) => {
            println!("{}", key.verifier());
            eprintln!(
                "private key written to {} (mode 0600): set AUDITBRIDGE_LOG_KEY_FILE to it on \
                 the workers; give the verifier key above to auditors",
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            eprintln!(
                "error: --out {}: the file exists; a key is never overwritten (move it away \
                 first, or choose another path)",
                out.display()
            );
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: --out {}: cannot write the key: {e}", out.display());
            ExitCode::from(3)
        }
    }
}
