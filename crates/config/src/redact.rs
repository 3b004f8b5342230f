//! Redaction rules of ingest (`[[redact]]` tables, `AUDITBRIDGE_REDACT` as a JSON array of the
//! same items) and of destinations (their `redact` parameter), read into
//! [`auditbridge_event::redact::Redactor`]s and checked here, at load: a rule that cannot be
//! used stops every command, naming it. Their `hmac` actions use `AUDITBRIDGE_REDACT_KEY`.

use auditbridge_event::redact::{Redactor, RedactorError, Rule, RuleSpec};
use secrecy::{ExposeSecret as _, SecretString};

use crate::ConfigError;
use crate::lists::{Item, Refusal, number_in, read_list, refuse, typed};

/// One rule, as an item of a list.
fn rule(value: &serde_json::Value) -> Result<Rule, Refusal> {
    let spec: RuleSpec = typed(value)?;
    Rule::parse(&spec).map_err(|e| refuse(e.field, e.message))
}

/// A rule set from its rules and the key; an `hmac` rule needs the key.
pub(crate) fn redactor(
    rules: Vec<Rule>,
    key: Option<&SecretString>,
) -> Result<Redactor, (usize, String)> {
    Redactor::new(rules, key.map(|k| k.expose_secret().as_bytes())).map_err(|e| match e {
        RedactorError::NoKey { index } => (
            index,
            "an hmac rule needs AUDITBRIDGE_REDACT_KEY (a secret of at least 32 characters, such as the output of `openssl rand -hex 32`)".to_owned(),
        ),
    })
}

/// Reads the ingest rules: the file's, then the environment's.
pub(crate) fn read(items: Vec<Item>, key: Option<&SecretString>) -> Result<Redactor, ConfigError> {
    let origins: Vec<_> = items.iter().map(|i| i.origin.clone()).collect();
    let rules = read_list("redaction rule", items, rule, &[])?;
    redactor(rules, key).map_err(|(index, message)| {
        // Called as read_list calls it: by its number where it was written.
        let mut position = Vec::new();
        let mut n = 0;
        for origin in &origins[..=index] {
            n = number_in(&mut position, origin);
        }
        ConfigError::Definition {
            what: "redaction rule",
            name: format!("#{n}"),
            setting: "action".into(),
            message,
            origin: origins[index].clone(),
        }
    })
}

/// Reads a destination's `redact` parameter (a list of rules).
pub(crate) fn read_param(
    values: &[serde_json::Value],
    key: Option<&SecretString>,
) -> Result<Redactor, Refusal> {
    let mut rules = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let r = rule(v)
            .map_err(|(setting, message)| (format!("params.redact[{i}].{setting}"), message))?;
        rules.push(r);
    }
    redactor(rules, key).map_err(|(i, message)| (format!("params.redact[{i}].action"), message))
}
