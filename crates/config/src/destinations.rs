//! Destination definitions (`[[destinations]]`, `AUDITBRIDGE_DESTINATIONS`): `{"name", "type",
//! "params"}`, read into typed settings and checked here, at load. Every check the sinks' own
//! parsers would make (the URL, header names and values, AMQP short strings and URIs) is made
//! here by the same rules, so a definition that loads is one its sink can be built from; the
//! destinations crate tests that every accepted definition builds.

use std::collections::BTreeMap;
use std::time::Duration;

use auditbridge_event::Outcome;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::SecretUrl;
use crate::de::{self, positive_duration};
use crate::lists::{Refusal, check_name, check_range, check_tenants, refuse, typed_definition};

/// A validated destination.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    pub name: String,
    pub kind: Kind,
    pub filter: Filter,
    pub start: Start,
    /// When set, backlog older than this is skipped (loudly, and counted).
    pub max_backlog_age: Option<Duration>,
    /// Most events handed to the sink at once.
    pub batch_size: usize,
    /// Backoff between failed attempts: exponential with jitter from `retry_min` to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// What the relay does with an event this destination can never take.
    pub on_undeliverable: OnUndeliverable,
    /// Redaction rules (`params.redact`) applied to each event before the sink sees it.
    pub redact: auditbridge_event::redact::Redactor,
    /// The schema events are sent in (`params.schema`), after redaction.
    pub schema: Schema,
    /// `params.ocsf_map`: which actions are of which OCSF class, before the defaults.
    pub ocsf_map: Vec<OcsfMapping>,
}

/// A destination's type and its own parameters: `{"type": "rabbitmq", "params": {..}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", content = "params", deny_unknown_fields)]
pub enum Kind {
    #[serde(rename = "rabbitmq")]
    RabbitMq(RabbitParams),
    #[serde(rename = "http")]
    Http(HttpParams),
}

impl Kind {
    pub fn type_name(&self) -> &'static str {
        match self {
            Kind::RabbitMq(_) => "rabbitmq",
            Kind::Http(_) => "http",
        }
    }

    /// Whether the destination also takes the log's checkpoints (`"checkpoints": true`).
    pub fn checkpoints(&self) -> bool {
        match self {
            Kind::RabbitMq(p) => p.checkpoints,
            Kind::Http(p) => p.checkpoints,
        }
    }
}

/// The schema events are sent in (`params.schema`): ours, or one a SIEM already parses
/// (README, "Formats").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schema {
    /// The event as stored.
    #[default]
    Native,
    /// DMTF CADF 1.0, as OpenStack's pycadf writes it.
    Cadf,
    /// OCSF (the release [`OCSF_VERSION`]).
    Ocsf,
    /// Elastic Common Schema ([`ECS_VERSION`]).
    Ecs,
    /// Splunk's HTTP Event Collector envelope (HTTP only).
    SplunkHec,
}

impl Schema {
    pub fn as_str(self) -> &'static str {
        match self {
            Schema::Native => "native",
            Schema::Cadf => "cadf",
            Schema::Ocsf => "ocsf",
            Schema::Ecs => "ecs",
            Schema::SplunkHec => "splunk_hec",
        }
    }
}

/// The OCSF release the `ocsf` schema writes.
pub const OCSF_VERSION: &str = "1.8.0";
/// The ECS release the `ecs` schema writes.
pub const ECS_VERSION: &str = "9.4.0";

/// The OCSF classes actions may map to.
pub const OCSF_CLASSES: [u32; 3] = [3001, 3002, 6003];

/// One entry of `params.ocsf_map`: actions matching `actions` (a pattern, `*` for any
/// characters) are of this OCSF class, with this activity (default: by the action's verb).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OcsfMapping {
    pub actions: String,
    pub class_uid: u32,
    #[serde(default)]
    pub activity_id: Option<u8>,
}

/// What the relay does with an event the destination cannot take: one whose message cannot be
/// built (an AMQP routing key over 255 bytes), that the broker returns as unroutable or closes
/// the channel over (406 PRECONDITION_FAILED: over its `max_message_size`), or that the
/// receiver refuses alone (a permanent HTTP 4xx) while it takes the events around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUndeliverable {
    /// Keep it in the destination's dead letters (`destination_dead_letters`), count it, and
    /// go on with the next events (the default).
    #[default]
    DeadLetter,
    /// Stop there: the destination is failing and its cursor waits until someone fixes the
    /// event's route or the receiver.
    Block,
}

/// Which events a destination receives. An empty list means "all".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub tenants: Vec<String>,
    /// Action prefixes on token boundaries: `document` matches `document` and
    /// `document.update`, not `documents.x`.
    pub actions: Vec<String>,
    pub outcomes: Vec<Outcome>,
}

impl Filter {
    /// Whether the filter lets `tenant` through (what applies to its log's checkpoints).
    pub fn takes_tenant(&self, tenant: &str) -> bool {
        self.tenants.is_empty() || self.tenants.iter().any(|t| t == tenant)
    }

    pub fn matches(&self, tenant: &str, action: &str, outcome: &str) -> bool {
        self.takes_tenant(tenant)
            && (self.actions.is_empty()
                || self.actions.iter().any(|p| {
                    action == p
                        || (action.len() > p.len()
                            && action.starts_with(p.as_str())
                            && action.as_bytes()[p.len()] == b'.')
                }))
            && (self.outcomes.is_empty() || self.outcomes.iter().any(|o| o.as_str() == outcome))
    }
}

/// Where a new destination starts.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum Start {
    /// Events stored from the destination's creation on (the default).
    #[default]
    Now,
    /// Every stored event.
    Earliest,
    /// Events stored at or after this time.
    At(OffsetDateTime),
}

impl TryFrom<String> for Start {
    type Error = String;

    fn try_from(text: String) -> Result<Start, String> {
        match text.as_str() {
            "now" => Ok(Start::Now),
            "earliest" => Ok(Start::Earliest),
            ts => OffsetDateTime::parse(ts, &Rfc3339)
                .map(Start::At)
                .map_err(|_| {
                    format!("expected \"now\", \"earliest\" or an RFC 3339 timestamp, got {ts:?}")
                }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RabbitMode {
    /// One message per event.
    #[default]
    Event,
    /// One NDJSON message per run of consecutive events sharing routing key and tenant, cut
    /// at `max_batch_bytes`.
    Batch,
}

/// The `rabbitmq` destination's own parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitParams {
    /// `amqp://user:pass@host:port/vhost`.
    #[serde(deserialize_with = "amqp_url")]
    pub url: SecretUrl,
    pub exchange: String,
    /// Template with `{tenant}`, `{action}`, `{outcome}`, `{source}`; default
    /// `{tenant}.{action}`.
    #[serde(default = "RabbitParams::default_routing_key")]
    pub routing_key: String,
    #[serde(default = "yes")]
    pub mandatory: bool,
    #[serde(default)]
    pub mode: RabbitMode,
    /// A publish not confirmed within this time counts as failed (and is resent).
    #[serde(
        default = "RabbitParams::default_confirm_timeout",
        deserialize_with = "positive_duration::deserialize"
    )]
    pub confirm_timeout: Duration,
    /// Most unconfirmed messages at once.
    #[serde(default = "RabbitParams::default_max_in_flight")]
    pub max_in_flight: usize,
    /// Batch mode: most body bytes in one message. A message holds at least one event, so one
    /// larger than this still goes, alone.
    #[serde(default = "RabbitParams::default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Also forward each tenant's new log checkpoints, one message each, routing key
    /// `_log.<tenant>` (README, "The verifiable log").
    #[serde(default)]
    pub checkpoints: bool,
}

fn yes() -> bool {
    true
}

/// The largest `max_batch_bytes` for RabbitMQ: 16 MiB, the broker's own default
/// `max_message_size` since RabbitMQ 4.0 (128 MiB before). A bound above the broker's limit
/// builds batches that the broker refuses; the relay then splits them, but every split costs
/// a reconnect and a resend.
pub const RABBIT_MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// The placeholders a routing-key template may use.
pub const ROUTING_KEY_PLACEHOLDERS: [&str; 4] = ["tenant", "action", "outcome", "source"];

impl RabbitParams {
    fn default_routing_key() -> String {
        "{tenant}.{action}".into()
    }

    fn default_confirm_timeout() -> Duration {
        Duration::from_secs(10)
    }

    fn default_max_in_flight() -> usize {
        1000
    }

    /// 1 MiB, as for HTTP requests.
    fn default_max_batch_bytes() -> usize {
        1024 * 1024
    }

    fn check(&self) -> Result<(), Refusal> {
        // AMQP short strings: at most 255 bytes.
        if self.exchange.len() > 255 {
            return Err(refuse("params.exchange", "expected at most 255 bytes"));
        }
        let fixed = check_template(&self.routing_key)?;
        // The template's fixed part alone must fit a routing key; the placeholders are
        // checked per event (an event whose key is too long is undeliverable).
        if fixed > 255 {
            return Err(refuse(
                "params.routing_key",
                "the template's text outside placeholders is over 255 bytes, the AMQP limit",
            ));
        }
        check_range("params.max_in_flight", self.max_in_flight, 1..=100_000)?;
        check_range(
            "params.max_batch_bytes",
            self.max_batch_bytes,
            1024..=RABBIT_MAX_BATCH_BYTES,
        )
        .map_err(|(setting, message)| {
            (
                setting,
                format!("{message} (16 MiB is RabbitMQ 4's default max_message_size)"),
            )
        })?;
        Ok(())
    }
}

/// Checks a routing-key template: every `{` closed, every placeholder known. Returns the
/// length of its text outside placeholders.
fn check_template(template: &str) -> Result<usize, Refusal> {
    let mut rest = template;
    let mut fixed = 0;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(refuse(
                "params.routing_key",
                format!("unclosed '{{' in {template:?}"),
            ));
        };
        let key = &rest[open + 1..open + close];
        if !ROUTING_KEY_PLACEHOLDERS.contains(&key) {
            return Err(refuse(
                "params.routing_key",
                format!(
                    "unknown placeholder {{{key}}}; known: {{tenant}}, {{action}}, {{outcome}}, {{source}}"
                ),
            ));
        }
        fixed += open;
        rest = &rest[open + close + 1..];
    }
    Ok(fixed + rest.len())
}

/// An AMQP URI by the rules of the parser the sink's connect uses (`amq-protocol-uri`): a
/// URL with scheme `amqp` or `amqps` and a host, user info, host and vhost that
/// percent-decode to UTF-8, and numeric query parameters that fit their types.
fn amqp_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecretUrl, D::Error> {
    let text = de::Text::deserialize_from(d)?;
    let url =
        SecretUrl::parse(&text, &["amqp", "amqps"], false).map_err(serde::de::Error::custom)?;
    let fail = |why: &str| serde::de::Error::custom(format!("not a valid AMQP URI ({why}): {url}"));
    let parsed = url::Url::parse(url.expose()).map_err(|_| fail("unparseable"))?;
    if parsed.cannot_be_a_base() {
        return Err(fail("no authority"));
    }
    let utf8 = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .is_ok()
    };
    if !utf8(parsed.username())
        || !parsed.password().is_none_or(utf8)
        || !parsed.host_str().is_none_or(utf8)
        || !utf8(parsed.path().get(1..).unwrap_or("/"))
    {
        return Err(fail("user info, host or vhost is not UTF-8 once decoded"));
    }
    for (key, value) in parsed.query_pairs() {
        let ok = match key.as_ref() {
            "frame_max" => value.parse::<u32>().is_ok(),
            "channel_max" | "heartbeat" => value.parse::<u16>().is_ok(),
            "connection_timeout" => value.parse::<u64>().is_ok(),
            "auth_mechanism" => [
                "plain",
                "amqplain",
                "external",
                "rabbit-cr-demo",
                "anonymous",
            ]
            .contains(&value.to_ascii_lowercase().as_str()),
            _ => true,
        };
        if !ok {
            return Err(fail(&format!("query parameter {key}")));
        }
    }
    Ok(url)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpFormat {
    #[default]
    Ndjson,
    JsonArray,
}

#[derive(Debug, Clone)]
pub enum HttpAuth {
    Bearer(SecretString),
    /// `Authorization: Splunk <token>` (`hec_token`, for `schema = "splunk_hec"`).
    Splunk(SecretString),
    Basic {
        username: String,
        password: SecretString,
    },
}

/// The `http` destination's own parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpParams {
    #[serde(deserialize_with = "http_url")]
    pub url: SecretUrl,
    #[serde(default)]
    pub format: HttpFormat,
    #[serde(default = "HttpParams::default_max_batch_events")]
    pub max_batch_events: usize,
    #[serde(default = "HttpParams::default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Extra request headers; their values may be API keys.
    #[serde(default, deserialize_with = "de::secret_map")]
    pub headers: BTreeMap<String, SecretString>,
    #[serde(default, deserialize_with = "de::optional_secret")]
    bearer_token: Option<SecretString>,
    #[serde(default, deserialize_with = "optional_basic_auth")]
    basic_auth: Option<BasicAuth>,
    /// Set from `bearer_token` or `basic_auth` when the definition is read.
    #[serde(skip)]
    pub auth: Option<HttpAuth>,
    #[serde(
        default = "HttpParams::default_timeout",
        deserialize_with = "positive_duration::deserialize"
    )]
    pub timeout: Duration,
    /// When set, requests carry an HMAC-SHA256 signature of `timestamp + "." + body`.
    #[serde(default, deserialize_with = "de::optional_secret")]
    pub secret: Option<SecretString>,
    /// Also forward each tenant's new log checkpoints, one request each with the body
    /// `{"type": "checkpoint", "tenant": …, "note": …}` (README, "The verifiable log").
    #[serde(default)]
    pub checkpoints: bool,
    /// `schema = "splunk_hec"`: the collector's token, sent as `Authorization: Splunk <token>`.
    #[serde(default, deserialize_with = "de::optional_secret")]
    pub hec_token: Option<SecretString>,
    /// `splunk_hec`: the envelope's `index` (default: the token's).
    #[serde(default)]
    pub hec_index: Option<String>,
    /// `splunk_hec`: the envelope's `sourcetype`.
    #[serde(default = "HttpParams::default_hec_sourcetype")]
    pub hec_sourcetype: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BasicAuth {
    pub(crate) username: String,
    #[serde(deserialize_with = "de::secret")]
    pub(crate) password: SecretString,
}

impl de::Hidden for BasicAuth {
    const EXPECTED: &'static str = "{\"username\", \"password\"}";
}

fn optional_basic_auth<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<BasicAuth>, D::Error> {
    de::hidden::<_, BasicAuth>(d).map(Some)
}

/// An `http://` or `https://` URL with a host, by the parser the sink uses (reqwest's `Url` is
/// the `url` crate's).
pub(crate) fn http_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SecretUrl, D::Error> {
    let text = de::Text::deserialize_from(d)?;
    SecretUrl::parse(&text, &["http", "https"], false).map_err(serde::de::Error::custom)
}

/// Extra request headers (`params.headers`): the name by our own (narrower) rule than the
/// http crate's; the value is not quoted in the refusal: it may be an API key.
pub(crate) fn check_headers(headers: &BTreeMap<String, SecretString>) -> Result<(), Refusal> {
    for (k, v) in headers {
        let ok = !k.is_empty()
            && k.len() <= 256
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            && header_value_ok(v.expose_secret());
        if !ok {
            return Err(refuse(
                format!("params.headers.{k}"),
                "expected a header name of at most 256 letters, digits, '-' or '_' and a value without control characters",
            ));
        }
    }
    Ok(())
}

/// A header value as the `http` crate takes it (`HeaderValue::from_str`): visible ASCII,
/// spaces, tabs and bytes above 127; no other control characters.
fn header_value_ok(value: &str) -> bool {
    value.bytes().all(|b| (b >= 32 && b != 127) || b == b'\t')
}

impl HttpParams {
    /// The defaults of every parameter but the URL, and no credentials: for code that builds
    /// its own (the fixtures and tests).
    pub fn new(url: SecretUrl) -> HttpParams {
        HttpParams {
            url,
            format: HttpFormat::default(),
            max_batch_events: HttpParams::default_max_batch_events(),
            max_batch_bytes: HttpParams::default_max_batch_bytes(),
            headers: BTreeMap::new(),
            bearer_token: None,
            basic_auth: None,
            auth: None,
            timeout: HttpParams::default_timeout(),
            secret: None,
            checkpoints: false,
            hec_token: None,
            hec_index: None,
            hec_sourcetype: HttpParams::default_hec_sourcetype(),
        }
    }

    fn default_max_batch_events() -> usize {
        500
    }

    fn default_max_batch_bytes() -> usize {
        1024 * 1024
    }

    fn default_timeout() -> Duration {
        Duration::from_secs(10)
    }

    fn default_hec_sourcetype() -> String {
        "auditbridge:event".into()
    }

    fn check(&mut self) -> Result<(), Refusal> {
        if let Some(token) = &self.bearer_token
            && !header_value_ok(&format!("Bearer {}", token.expose_secret()))
        {
            return Err(refuse(
                "params.bearer_token",
                "expected no control characters (it is sent in the Authorization header)",
            ));
        }
        if let Some(token) = &self.hec_token
            && (token.expose_secret().is_empty()
                || !header_value_ok(&format!("Splunk {}", token.expose_secret())))
        {
            return Err(refuse(
                "params.hec_token",
                "expected a token with no control characters (it is sent in the Authorization header)",
            ));
        }
        for (setting, value) in [
            ("params.hec_index", self.hec_index.as_deref()),
            ("params.hec_sourcetype", Some(self.hec_sourcetype.as_str())),
        ] {
            if let Some(v) = value
                && (v.is_empty() || v.len() > 256 || v.chars().any(char::is_control))
            {
                return Err(refuse(
                    setting,
                    "expected 1 to 256 characters, no control characters",
                ));
            }
        }
        self.auth = match (self.bearer_token.take(), self.basic_auth.take()) {
            (Some(_), Some(_)) => {
                return Err(refuse(
                    "params.bearer_token",
                    "set either bearer_token or basic_auth, not both",
                ));
            }
            (Some(t), None) => Some(HttpAuth::Bearer(t)),
            (None, Some(b)) => Some(HttpAuth::Basic {
                username: b.username,
                password: b.password,
            }),
            (None, None) => self.hec_token.clone().map(HttpAuth::Splunk),
        };
        if self.hec_token.is_some() && !matches!(self.auth, Some(HttpAuth::Splunk(_))) {
            return Err(refuse(
                "params.hec_token",
                "set either hec_token or bearer_token/basic_auth, not both",
            ));
        }
        check_headers(&self.headers)?;
        if self
            .secret
            .as_ref()
            .is_some_and(|s| s.expose_secret().is_empty())
        {
            return Err(refuse("params.secret", "must not be empty when set"));
        }
        check_range(
            "params.max_batch_events",
            self.max_batch_events,
            1..=100_000,
        )?;
        if self.max_batch_bytes < 1024 {
            return Err(refuse("params.max_batch_bytes", "expected at least 1024"));
        }
        Ok(())
    }
}

/// Parameters every destination type takes, beside the type's own in `params`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Common {
    #[serde(default)]
    filter: RawFilter,
    #[serde(default)]
    start: Start,
    #[serde(default, deserialize_with = "positive_duration::option::deserialize")]
    max_backlog_age: Option<Duration>,
    #[serde(default)]
    batch_size: Option<usize>,
    #[serde(
        default = "Common::default_retry_min",
        deserialize_with = "positive_duration::deserialize"
    )]
    retry_min: Duration,
    #[serde(
        default = "Common::default_retry_max",
        deserialize_with = "positive_duration::deserialize"
    )]
    retry_max: Duration,
    #[serde(default)]
    on_undeliverable: OnUndeliverable,
    /// Redaction rules applied to what this destination is sent (the trail keeps the event
    /// whole).
    #[serde(default)]
    redact: Vec<Value>,
    #[serde(default)]
    schema: Schema,
    #[serde(default)]
    ocsf_map: Vec<OcsfMapping>,
}

impl Common {
    fn default_retry_min() -> Duration {
        Duration::from_millis(200)
    }

    fn default_retry_max() -> Duration {
        Duration::from_secs(300)
    }
}

const COMMON_KEYS: [&str; 10] = [
    "filter",
    "start",
    "max_backlog_age",
    "batch_size",
    "retry_min",
    "retry_max",
    "on_undeliverable",
    "redact",
    "schema",
    "ocsf_map",
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    actions: Vec<String>,
    #[serde(default)]
    outcomes: Vec<String>,
}

/// The shape [`typed_definition`] reads a definition in.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Definition {
    name: String,
    common: Common,
    kind: Kind,
}

/// Reads and checks one definition.
pub(crate) fn read(
    value: &Value,
    redact_key: Option<&SecretString>,
) -> Result<DestinationConfig, Refusal> {
    let Definition { name, common, kind } = typed_definition(value, &COMMON_KEYS)?;
    let redact = crate::redact::read_param(&common.redact, redact_key)?;
    check_name(&name)?;
    let mut kind = kind;
    match &mut kind {
        Kind::RabbitMq(r) => r.check()?,
        Kind::Http(h) => h.check()?,
    }
    check_schema(&common, &kind)?;
    let filter = common.filter;
    check_tenants("params.filter.tenants", &filter.tenants)?;
    for a in &filter.actions {
        auditbridge_event::validate_action(a)
            .map_err(|e| refuse("params.filter.actions", e.to_string()))?;
    }
    let outcomes = filter
        .outcomes
        .iter()
        .map(|o| {
            o.parse::<Outcome>()
                .map_err(|e| refuse("params.filter.outcomes", e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // RabbitMQ: one confirm window per batch, so the broker always has a full window to work
    // on; HTTP: the request size limits cut batches anyway.
    let default_batch = match &kind {
        Kind::RabbitMq(r) => r.max_in_flight.min(10_000),
        Kind::Http(h) => h.max_batch_events.min(10_000),
    };
    let batch_size = check_range(
        "params.batch_size",
        common.batch_size.unwrap_or(default_batch),
        1..=10_000,
    )?;
    if common.retry_min > common.retry_max {
        return Err(refuse("params.retry_min", "must not exceed retry_max"));
    }
    Ok(DestinationConfig {
        name,
        kind,
        filter: Filter {
            tenants: filter.tenants,
            actions: filter.actions,
            outcomes,
        },
        start: common.start,
        max_backlog_age: common.max_backlog_age,
        batch_size,
        retry_min: common.retry_min,
        retry_max: common.retry_max,
        on_undeliverable: common.on_undeliverable,
        redact,
        schema: common.schema,
        ocsf_map: common.ocsf_map,
    })
}

/// Checks `params.schema` and what goes with it.
fn check_schema(common: &Common, kind: &Kind) -> Result<(), Refusal> {
    let hec = matches!(kind, Kind::Http(h) if matches!(h.auth, Some(HttpAuth::Splunk(_))));
    match (common.schema, kind) {
        (Schema::SplunkHec, Kind::RabbitMq(_)) => {
            return Err(refuse(
                "params.schema",
                "splunk_hec is HTTP's (the HEC event envelope); use native, cadf, ocsf or ecs",
            ));
        }
        (Schema::SplunkHec, Kind::Http(h)) => {
            if !hec {
                return Err(refuse(
                    "params.hec_token",
                    "splunk_hec needs the collector's token (sent as Authorization: Splunk <token>)",
                ));
            }
            if h.format != HttpFormat::Ndjson {
                return Err(refuse(
                    "params.format",
                    "splunk_hec sends HEC's own framing (one event object after another)",
                ));
            }
        }
        _ if hec => {
            return Err(refuse(
                "params.hec_token",
                "only with \"schema\": \"splunk_hec\"",
            ));
        }
        _ => {}
    }
    if !common.ocsf_map.is_empty() && common.schema != Schema::Ocsf {
        return Err(refuse("params.ocsf_map", "only with \"schema\": \"ocsf\""));
    }
    for (i, m) in common.ocsf_map.iter().enumerate() {
        if !OCSF_CLASSES.contains(&m.class_uid) {
            return Err(refuse(
                format!("params.ocsf_map[{i}].class_uid"),
                format!(
                    "{} is not a class this schema writes: 3001 (Account Change), 3002 (Authentication) or 6003 (API Activity)",
                    m.class_uid
                ),
            ));
        }
        if m.actions.is_empty() || m.actions.len() > 191 {
            return Err(refuse(
                format!("params.ocsf_map[{i}].actions"),
                "expected a pattern of 1 to 191 characters",
            ));
        }
        if let Some(a) = m.activity_id {
            let max = match m.class_uid {
                3001 => 14,
                3002 => 7,
                _ => 4,
            };
            if !(a <= max || a == 99) {
                return Err(refuse(
                    format!("params.ocsf_map[{i}].activity_id"),
                    format!(
                        "expected 0 to {max}, or 99 (Other), for class {}",
                        m.class_uid
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::{Config, ConfigError};

    /// Definitions, loaded as `AUDITBRIDGE_DESTINATIONS`.
    fn parse_destinations(list: &[Value]) -> Result<Vec<DestinationConfig>, ConfigError> {
        let vars = [(
            "AUDITBRIDGE_DESTINATIONS".to_owned(),
            Value::from(list.to_vec()).to_string(),
        )];
        Config::from_env(vars).map(|c| c.destinations)
    }

    /// One definition, loaded as a list of one.
    fn one(v: Value) -> Result<DestinationConfig, ConfigError> {
        parse_destinations(&[v]).map(|mut d| d.remove(0))
    }

    #[test]
    fn errors_name_the_destination_and_the_setting() {
        let cases = [
            (
                json!({"name": "x", "type": "kafka", "params": {}}),
                "destination x: type",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "ftp://a"}}),
                "destination x: params.url",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "formt": "x"}}),
                "unknown field `formt`",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "format": "xml"}}),
                "params.format",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "amqp://a", "exchange": "e", "routing_key": "{tenat}"}}),
                "params.routing_key",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "amqp://a", "exchange": "e", "mode": "bulk"}}),
                "params.mode",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "http://a", "exchange": "e"}}),
                "params.url",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "start": "yesterday"}}),
                "params.start",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "max_backlog_age": "soon"}}),
                "params.max_backlog_age",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "filter": {"tenants": ["ACME"]}}}),
                "params.filter.tenants",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "filter": {"outcomes": ["ok"]}}}),
                "params.filter.outcomes",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "filter": {"actions": ["Doc"]}}}),
                "params.filter.actions",
            ),
            (
                json!({"name": "Bad Name", "type": "http", "params": {"url": "http://a"}}),
                "name",
            ),
            (
                json!({"type": "http", "params": {"url": "http://a"}}),
                "destination #1",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "on_undeliverable": "drop"}}),
                "destination x: params.on_undeliverable",
            ),
            // What the sinks' own parsers refuse is refused here, at load, by the same parsers.
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://exa mple/in"}}),
                "destination x: params.url",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a:99999/in"}}),
                "destination x: params.url",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "headers": {"X-Key": "ab\u{1}c"}}}),
                "destination x: params.headers.X-Key",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "headers": {"X-Key": "ab\u{7f}"}}}),
                "destination x: params.headers.X-Key",
            ),
            (
                json!({"name": "x", "type": "http", "params": {"url": "http://a", "bearer_token": "t\u{0}k"}}),
                "destination x: params.bearer_token",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "amqp://h:notaport/%2f", "exchange": "e"}}),
                "destination x: params.url",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "amqp://a", "exchange": "e".repeat(256)}}),
                "destination x: params.exchange",
            ),
            (
                json!({"name": "x", "type": "rabbitmq", "params": {"url": "amqp://a", "exchange": "e", "routing_key": format!("{}.{{tenant}}", "k".repeat(256))}}),
                "destination x: params.routing_key",
            ),
        ];
        for (value, want) in cases {
            let e = one(value.clone()).unwrap_err().to_string();
            assert!(e.contains(want), "{value}: {e}");
        }
        let dup = parse_destinations(&[
            json!({"name": "x", "type": "http", "params": {"url": "http://a"}}),
            json!({"name": "x", "type": "http", "params": {"url": "http://b"}}),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            dup.contains("destination x: name") && dup.contains("unique"),
            "{dup}"
        );
    }

    #[test]
    fn action_filters_match_on_token_boundaries() {
        let f = Filter {
            actions: vec!["document".into()],
            ..Default::default()
        };
        assert!(f.matches("t", "document", "success"));
        assert!(f.matches("t", "document.update", "success"));
        assert!(f.matches("t", "document.share.revoke", "success"));
        assert!(!f.matches("t", "documents.x", "success"));
        assert!(!f.matches("t", "doc", "success"));
        let f = Filter {
            tenants: vec!["acme".into()],
            outcomes: vec![Outcome::Denied],
            ..Default::default()
        };
        assert!(f.matches("acme", "x", "denied"));
        assert!(!f.matches("acme", "x", "success"));
        assert!(!f.matches("globex", "x", "denied"));
        assert!(Filter::default().matches("any", "thing", "unknown"));
    }

    #[test]
    fn debug_output_never_shows_credentials() {
        let all = parse_destinations(&[
            json!({"name": "a", "type": "http", "params": {"url": "http://h/x", "bearer_token": "tok-SECRET",
                   "secret": "hmac-SECRET", "headers": {"X-Api-Key": "key-SECRET"}}}),
            json!({"name": "b", "type": "http", "params": {"url": "http://h/x",
                   "basic_auth": {"username": "u", "password": "pw-SECRET"}}}),
            json!({"name": "c", "type": "rabbitmq", "params": {"url": "amqp://u:amqp-SECRET@h:5672/%2f", "exchange": "e"}}),
        ])
        .unwrap();
        let text = format!("{all:?}");
        assert!(!text.contains("SECRET"), "{text}");
    }

    #[test]
    fn a_full_rabbitmq_definition_parses() {
        let d = one(json!({"name": "bus", "type": "rabbitmq", "params": {
            "url": "amqp://guest:guest@127.0.0.1:5672/%2f", "exchange": "audit",
            "routing_key": "audit.{tenant}.{action}", "mode": "batch", "mandatory": false,
            "filter": {"tenants": ["acme"], "actions": ["document"], "outcomes": ["denied"]},
            "start": "earliest", "max_backlog_age": "1h", "batch_size": 100,
            "max_batch_bytes": 65536
        }}))
        .unwrap();
        assert_eq!(d.name, "bus");
        assert_eq!(d.start, Start::Earliest);
        assert_eq!(d.max_backlog_age, Some(Duration::from_secs(3600)));
        assert_eq!(d.batch_size, 100);
        assert_eq!(d.retry_max, Duration::from_secs(300));
        let Kind::RabbitMq(r) = d.kind else { panic!() };
        assert_eq!(r.mode, RabbitMode::Batch);
        assert!(!r.mandatory);
        assert_eq!(r.routing_key, "audit.{tenant}.{action}");
        assert_eq!(r.max_batch_bytes, 65536);
    }

    #[test]
    fn rabbitmq_defaults_and_the_batch_byte_bounds() {
        let with = |extra: Value| {
            let mut params =
                json!({"url": "amqp://guest:guest@127.0.0.1:5672/%2f", "exchange": "audit"});
            params
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            one(json!({"name": "bus", "type": "rabbitmq", "params": params}))
        };
        let d = with(json!({})).unwrap();
        let Kind::RabbitMq(r) = d.kind else { panic!() };
        assert_eq!(r.mode, RabbitMode::Event);
        assert!(r.mandatory);
        assert_eq!(r.routing_key, "{tenant}.{action}");
        assert_eq!(r.max_in_flight, 1000);
        assert_eq!(r.max_batch_bytes, 1024 * 1024);
        assert_eq!(d.batch_size, 1000);

        // Both ends of the range load; one byte past either does not, and says why.
        for ok in [1024, 16 * 1024 * 1024] {
            let d = with(json!({"mode": "batch", "max_batch_bytes": ok})).unwrap();
            let Kind::RabbitMq(r) = d.kind else { panic!() };
            assert_eq!(r.max_batch_bytes, ok);
        }
        for bad in [0, 1023, 16 * 1024 * 1024 + 1] {
            let e = with(json!({"mode": "batch", "max_batch_bytes": bad}))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("destination bus: params.max_batch_bytes: expected 1024 to 16777216")
                    && e.contains(&format!("got {bad}")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_rejected_url_is_shown_without_its_password() {
        let e = one(json!({"name": "x", "type": "rabbitmq", "params": {
            "url": "amqp://u:pw-SECRET@h:notaport/%2f", "exchange": "e"}}))
        .unwrap_err()
        .to_string();
        assert!(e.contains("params.url") && !e.contains("pw-SECRET"), "{e}");
    }

    #[test]
    fn http_defaults() {
        let d = one(
            json!({"name": "siem", "type": "http", "params": {"url": "http://127.0.0.1:9/in"}}),
        )
        .unwrap();
        assert_eq!(d.start, Start::Now);
        assert_eq!(d.max_backlog_age, None);
        let Kind::Http(h) = d.kind else { panic!() };
        assert_eq!(h.format, HttpFormat::Ndjson);
        assert_eq!(h.max_batch_events, 500);
        assert_eq!(h.timeout, Duration::from_secs(10));
        assert!(h.auth.is_none());
        assert_eq!(d.on_undeliverable, OnUndeliverable::DeadLetter);
        let d = one(json!({"name": "siem", "type": "http", "params": {
            "url": "http://127.0.0.1:9/in", "on_undeliverable": "block"}}))
        .unwrap();
        assert_eq!(d.on_undeliverable, OnUndeliverable::Block);
    }
}
