//! Connecting to NATS. Credentials in the configured server list are taken out of the URLs and
//! given to the client as options, because the client writes the URLs it connects to into its
//! own debug log lines.

use std::time::Duration;

use auditbridge_config::{ExposeSecret as _, NatsAuth, nats_credentials, redact_url};

/// A NATS server list that could not be used, or a first connection that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server list is malformed (the message names the list, without its secrets).
    #[error("AUDITBRIDGE_NATS_URL: {0}")]
    ServerList(String),
    #[error("connecting to NATS at {servers}: {source}")]
    Connect {
        servers: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Connects to NATS, retrying in the background if it is not there yet; the client reconnects
/// by itself for as long as the process lives. `name` is the connection's name on the server
/// (`auditbridge-worker`, `auditbridge-serve`, ...).
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, ConnectError> {
    options(url)?
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!(message = "Disconnected from NATS; reconnecting.");
                }
                async_nats::Event::Connected => tracing::info!(message = "Connected to NATS."),
                other => tracing::debug!(event = %other, message = "NATS client event."),
            }
        })
        .connect(servers(url)?)
        .await
        .map_err(|source| ConnectError::Connect {
            servers: redact_url(url),
            source,
        })
}

/// Connect options carrying the credentials of a NATS server list; the servers to connect to
/// are [`servers`], the list without them.
pub fn options(url: &str) -> Result<async_nats::ConnectOptions, ConnectError> {
    let (_, auth) = nats_credentials(url).map_err(ConnectError::ServerList)?;
    let options = async_nats::ConnectOptions::new();
    Ok(match auth {
        Some(NatsAuth::UserPassword { user, password }) => {
            options.user_and_password(user, password.expose_secret().to_owned())
        }
        Some(NatsAuth::Token(token)) => options.token(token.expose_secret().to_owned()),
        None => options,
    })
}

/// The NATS server list without credentials (see [`options`]).
pub fn servers(url: &str) -> Result<String, ConnectError> {
    let (servers, _) = nats_credentials(url).map_err(ConnectError::ServerList)?;
    Ok(servers)
}
