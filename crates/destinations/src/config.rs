//! Destination definitions, as `auditbridge_config` reads and checks them at load (re-exported
//! here, where the sinks and the relay have always found them). This module's tests hold the
//! promise that configuration makes for this crate: every definition that loads builds its
//! sink, by the parsers the sinks use.

pub use auditbridge_config::destinations::{
    DestinationConfig, Filter, HttpAuth, HttpFormat, HttpParams, Kind, OnUndeliverable, RabbitMode,
    RabbitParams, Start,
};

#[cfg(test)]
mod tests {
    use auditbridge_config::{Config, ExposeSecret as _};

    use super::*;

    fn load(json: &str) -> Vec<DestinationConfig> {
        let vars = [("AUDITBRIDGE_DESTINATIONS".to_owned(), json.to_owned())];
        Config::from_env(vars)
            .unwrap_or_else(|e| panic!("{json}: {e}"))
            .destinations
    }

    /// Whatever loads must build: every definition the validation accepts gives a sink, and the
    /// sinks' own parsers agree with the checks made at load on every URL and header value.
    #[test]
    fn accepted_definitions_build_their_sinks() {
        let all = load(
            r#"[
            {"name": "a", "type": "http", "params": {"url": "https://h.example:8443/x?k=v",
             "headers": {"X-Api-Key": "key with spaces\tand tab", "X-Utf8": "caf\u00e9"},
             "bearer_token": "tok"}},
            {"name": "b", "type": "rabbitmq", "params": {"url": "amqps://u:p@h:5671/vh", "exchange": "e"}},
            {"name": "c", "type": "rabbitmq", "params": {"url": "amqp://h/%2f?heartbeat=10&frame_max=131072&auth_mechanism=external", "exchange": "e"}},
            {"name": "d", "type": "http", "params": {"url": "http://[::1]:9/in",
             "basic_auth": {"username": "u", "password": "p\u00e9"}, "secret": "s"}}
        ]"#,
        );
        for d in &all {
            crate::Sink::new(d).unwrap_or_else(|e| panic!("{}: {e}", d.name));
            if let Kind::RabbitMq(r) = &d.kind {
                r.url
                    .expose()
                    .parse::<lapin::uri::AMQPUri>()
                    .unwrap_or_else(|e| panic!("{}: {e}", d.name));
            }
        }
        // What lapin's parser refuses, the load refuses too.
        for url in [
            "amqp://h:notaport/%2f",
            "amqp://h/%2f?heartbeat=abc",
            "amqp://h/%2f?channel_max=70000",
            "amqp://h/%2f?auth_mechanism=magic",
            "amqp://h/%ff",
        ] {
            assert!(url.parse::<lapin::uri::AMQPUri>().is_err(), "{url}");
            let json = format!(
                r#"[{{"name": "x", "type": "rabbitmq", "params": {{"url": "{url}", "exchange": "e"}}}}]"#
            );
            let vars = [("AUDITBRIDGE_DESTINATIONS".to_owned(), json)];
            let err = Config::from_env(vars).unwrap_err().to_string();
            assert!(err.contains("destination x: params.url"), "{url}: {err}");
        }
        // Header values: the load's rule is the http crate's.
        for value in ["ab\u{1}c", "ab\u{7f}", "tab\tok", "caf\u{e9}", "\u{1f600}"] {
            let accepted = reqwest::header::HeaderValue::from_str(value).is_ok();
            let json = serde_json::json!([{"name": "x", "type": "http", "params": {
                "url": "http://a", "headers": {"X-Key": value}}}])
            .to_string();
            let vars = [("AUDITBRIDGE_DESTINATIONS".to_owned(), json)];
            let loaded = Config::from_env(vars);
            assert_eq!(loaded.is_ok(), accepted, "{value:?}");
            if let Ok(c) = loaded {
                crate::Sink::new(&c.destinations[0]).unwrap();
            }
        }
        let Kind::Http(h) = &all[0].kind else {
            panic!("http")
        };
        assert_eq!(h.headers["X-Utf8"].expose_secret(), "caf\u{e9}");
    }
}
