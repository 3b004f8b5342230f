//! `auditbridge log keygen`: the log's signing key.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::ExitCode;

use auditbridge_tlog::SignerKey;

pub(crate) fn run(name: &str, out: &std::path::Path) -> ExitCode {
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
