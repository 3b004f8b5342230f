//! Realistic synthetic traffic for `auditbridge publish --generate` and benchmarks.
//!
//! Realistic means shaped like production audit trails, because the shape is what the
//! pipeline's costs depend on: a few big tenants and a long tail (Zipf-like weights), reads and
//! logins far more common than role grants, mostly successes, users who keep their address and
//! browser, and events of about 600 bytes of JSON (the size the design's limits were measured
//! with). Addresses come from the documentation ranges (RFC 5737, RFC 3849) and e-mail
//! addresses from `example.com`, so nothing generated points at a real party.
//!
//! Every choice comes from the seed, so two generators with the same seed and tenant count
//! produce the same stream, except for `id` (a fresh UUIDv7) and `occurred_at` (now).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

use crate::model::{Actor, Event, Outcome, Target};

/// Named like real companies; beyond these, `tenant-NN`.
const TENANT_NAMES: &[&str] = &[
    "acme",
    "globex",
    "initech",
    "umbrella",
    "hooli",
    "soylent",
    "stark",
    "wayne",
    "wonka",
    "cyberdyne",
    "tyrell",
    "aperture",
    "vandelay",
    "pied-piper",
    "dunder-mifflin",
    "massive-dynamic",
    "oscorp",
    "nakatomi",
    "gringotts",
    "monarch",
];

/// Users per tenant, then service accounts per tenant.
const USERS_PER_TENANT: usize = 24;
const SERVICES: &[(&str, &str)] = &[
    ("billing-sync", "3.2.0"),
    ("ci-deployer", "1.14.2"),
    ("backup-agent", "7.0.1"),
    ("scim-provisioner", "2.5.3"),
];

const FIRST_NAMES: &[&str] = &[
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Donald",
    "Margaret",
    "Ken",
    "Radia",
    "Linus",
    "Frances",
    "John",
    "Katherine",
    "Dennis",
    "Hedy",
    "Niklaus",
    "Sophie",
    "Tim",
    "Joan",
    "Bjarne",
];
const LAST_NAMES: &[&str] = &[
    "Lovelace",
    "Hopper",
    "Turing",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Hamilton",
    "Thompson",
    "Perlman",
    "Torvalds",
    "Allen",
    "McCarthy",
    "Johnson",
    "Ritchie",
    "Lamarr",
    "Wirth",
    "Wilson",
    "Berners-Lee",
    "Clarke",
    "Stroustrup",
];

const BROWSERS: &[&str] = &[
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "curl/8.7.1",
    "python-requests/2.32.3",
];

/// What an action touches, which decides its target and its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Login,
    Logout,
    Credential,
    Document,
    DocumentChange,
    Share,
    Export,
    Invoice,
    Refund,
    Role,
    Invite,
    ApiKey,
    Project,
    Member,
    Object,
    Settings,
}

/// How often an action fails or is refused.
#[derive(Debug, Clone, Copy)]
enum Risk {
    /// Mistyped passwords, expired codes: logins fail more often than anything else.
    Authentication,
    /// Privileged operations are refused more often.
    Privileged,
    Routine,
}

struct ActionSpec {
    action: &'static str,
    weight: f64,
    source: &'static str,
    kind: Kind,
    risk: Risk,
}

const fn spec(
    action: &'static str,
    weight: f64,
    source: &'static str,
    kind: Kind,
    risk: Risk,
) -> ActionSpec {
    ActionSpec {
        action,
        weight,
        source,
        kind,
        risk,
    }
}

/// The actions, how common each is, the service that reports it, what it touches.
#[rustfmt::skip]
const ACTIONS: &[ActionSpec] = &[
    spec("user.login",               16.0, "auth-service",    Kind::Login,          Risk::Authentication),
    spec("user.logout",              7.0,  "auth-service",    Kind::Logout,         Risk::Routine),
    spec("user.password.change",     0.8,  "auth-service",    Kind::Credential,     Risk::Authentication),
    spec("user.password.reset",      0.5,  "auth-service",    Kind::Credential,     Risk::Authentication),
    spec("user.mfa.enable",          0.6,  "auth-service",    Kind::Credential,     Risk::Authentication),
    spec("document.create",          6.0,  "docs-api",        Kind::Document,       Risk::Routine),
    spec("document.read",            22.0, "docs-api",        Kind::Document,       Risk::Routine),
    spec("document.update",          12.0, "docs-api",        Kind::DocumentChange, Risk::Routine),
    spec("document.delete",          1.5,  "docs-api",        Kind::Document,       Risk::Routine),
    spec("document.share",           3.0,  "docs-api",        Kind::Share,          Risk::Routine),
    spec("document.share.revoke",    0.8,  "docs-api",        Kind::Share,          Risk::Routine),
    spec("document.export",          1.0,  "docs-api",        Kind::Export,         Risk::Routine),
    spec("billing.invoice.create",   1.5,  "billing-service", Kind::Invoice,        Risk::Routine),
    spec("billing.invoice.send",     1.0,  "billing-service", Kind::Invoice,        Risk::Routine),
    spec("billing.payment.refund",   0.3,  "billing-service", Kind::Refund,         Risk::Privileged),
    spec("admin.role.grant",         0.6,  "iam-service",     Kind::Role,           Risk::Privileged),
    spec("admin.role.revoke",        0.4,  "iam-service",     Kind::Role,           Risk::Privileged),
    spec("admin.user.invite",        0.8,  "iam-service",     Kind::Invite,         Risk::Privileged),
    spec("admin.user.suspend",       0.15, "iam-service",     Kind::Role,           Risk::Privileged),
    spec("api_key.create",           0.5,  "iam-service",     Kind::ApiKey,         Risk::Privileged),
    spec("api_key.revoke",           0.3,  "iam-service",     Kind::ApiKey,         Risk::Privileged),
    spec("project.create",           0.8,  "projects-api",    Kind::Project,        Risk::Routine),
    spec("project.member.add",       1.2,  "projects-api",    Kind::Member,         Risk::Privileged),
    spec("project.member.remove",    0.4,  "projects-api",    Kind::Member,         Risk::Privileged),
    spec("storage.object.upload",    4.0,  "storage-gateway", Kind::Object,         Risk::Routine),
    spec("storage.object.download",  8.0,  "storage-gateway", Kind::Object,         Risk::Routine),
    spec("settings.update",          1.0,  "settings-api",    Kind::Settings,       Risk::Privileged),
];

const DOCUMENTS: &[&str] = &[
    "Q3 plan",
    "Board deck 2026-11",
    "Incident review: checkout latency",
    "Pricing model v4",
    "Security policy",
    "Hiring plan 2027",
    "Onboarding checklist",
    "Roadmap H1",
    "Customer interview notes",
    "Vendor contract draft",
];
const PROJECTS: &[&str] = &["apollo", "atlas", "phoenix", "hermes", "orion", "zephyr"];
const ROLES: &[&str] = &["viewer", "editor", "admin", "billing_manager", "auditor"];
const FOLDERS: &[&str] = &["/finance", "/engineering", "/legal", "/people", "/shared"];
const CLIENT_APPS: &[&str] = &["web", "web", "web", "desktop", "mobile", "cli"];
const REGIONS: &[&str] = &["eu-west-1", "eu-central-1", "us-east-1", "us-west-2"];
const COUNTRIES: &[&str] = &["DE", "FR", "GB", "US", "NL", "SE", "JP", "BR"];

/// One member of a tenant's actor pool; users keep their address and browser.
#[derive(Debug, Clone)]
struct Persona {
    id: String,
    kind: &'static str,
    name: String,
    email: Option<String>,
    ip: IpAddr,
    user_agent: String,
}

/// Realistic synthetic traffic for `auditbridge publish --generate` and benchmarks.
#[derive(Debug)]
pub struct Generator {
    rng: StdRng,
    tenants: Vec<String>,
    tenant_weights: WeightedIndex<f64>,
    /// Per tenant: users first, then service accounts.
    personas: Vec<Vec<Persona>>,
    user_weights: WeightedIndex<f64>,
    action_weights: WeightedIndex<f64>,
}

impl Generator {
    /// `tenants` distinct tenants, with deterministic choices from `seed` (ids are still fresh
    /// UUIDv7s).
    ///
    /// # Panics
    ///
    /// If `tenants` is 0.
    pub fn new(seed: u64, tenants: usize) -> Self {
        assert!(tenants >= 1, "a generator needs at least one tenant");
        let mut rng = StdRng::seed_from_u64(seed);
        let tenants: Vec<String> = (0..tenants)
            .map(|i| match TENANT_NAMES.get(i) {
                Some(name) => (*name).to_owned(),
                None => format!("tenant-{:02}", i + 1),
            })
            .collect();
        let personas = tenants
            .iter()
            .map(|tenant| personas(&mut rng, tenant))
            .collect();
        Generator {
            rng,
            tenant_weights: zipf(tenants.len()),
            tenants,
            personas,
            user_weights: zipf(USERS_PER_TENANT),
            action_weights: WeightedIndex::new(ACTIONS.iter().map(|a| a.weight))
                .expect("action weights are positive"),
        }
    }

    /// The tenant names, most active first.
    pub fn tenants(&self) -> &[String] {
        &self.tenants
    }

    /// The next event, `occurred_at` now (UTC, to the millisecond, as most producers send it).
    pub fn next_event(&mut self) -> Event {
        let now = time::OffsetDateTime::now_utc();
        let occurred_at = now.replace_millisecond(now.millisecond()).unwrap_or(now);

        let t = self.tenant_weights.sample(&mut self.rng);
        let spec = &ACTIONS[self.action_weights.sample(&mut self.rng)];
        let pool = &self.personas[t];
        let users = &pool[..USERS_PER_TENANT];
        // Service accounts act too, but never log in or change their own credentials.
        let actor = match spec.kind {
            Kind::Login | Kind::Logout | Kind::Credential => {
                &users[self.user_weights.sample(&mut self.rng)]
            }
            _ if self.rng.random_bool(0.12) => {
                &pool[self.rng.random_range(USERS_PER_TENANT..pool.len())]
            }
            _ => &users[self.user_weights.sample(&mut self.rng)],
        };
        let other = &users[self.rng.random_range(0..users.len())];

        let rng = &mut self.rng;
        let outcome = outcome(rng, spec.risk);
        let ip = if rng.random_bool(0.9) {
            actor.ip
        } else {
            random_ip(rng)
        };
        let (target, mut metadata) = details(rng, spec.kind, actor, other);
        metadata.insert("trace_id".into(), json!(hex(rng, 32)));
        metadata.insert("region".into(), json!(pick(rng, REGIONS)));
        if actor.kind == "user" {
            metadata.insert(
                "client".into(),
                json!({
                    "app": pick(rng, CLIENT_APPS),
                    "version": format!("2026.{}.{}", rng.random_range(1..=11), rng.random_range(0..20)),
                }),
            );
        }
        let reason = reason(rng, spec.kind, outcome);
        let request_id = rng
            .random_bool(0.95)
            .then(|| format!("req-{}", hex(rng, 16)));

        Event {
            id: uuid::Uuid::now_v7(),
            tenant: self.tenants[t].clone(),
            occurred_at,
            action: spec.action.to_owned(),
            outcome,
            actor: Actor {
                id: actor.id.clone(),
                kind: Some(actor.kind.to_owned()),
                name: Some(actor.name.clone()),
                ip: Some(ip.to_string()),
                user_agent: Some(actor.user_agent.clone()),
            },
            target,
            source: spec.source.to_owned(),
            reason,
            request_id,
            metadata: Some(metadata),
        }
    }
}

/// Weights 1, 1/2, 1/3, …: a few heavy hitters and a long tail.
fn zipf(n: usize) -> WeightedIndex<f64> {
    WeightedIndex::new((1..=n).map(|rank| 1.0 / rank as f64)).expect("n >= 1")
}

fn personas(rng: &mut StdRng, tenant: &str) -> Vec<Persona> {
    let mut pool: Vec<Persona> = (0..USERS_PER_TENANT)
        .map(|_| {
            let first = pick(rng, FIRST_NAMES);
            let last = pick(rng, LAST_NAMES);
            Persona {
                id: format!("u-{}", rng.random_range(1000..100_000)),
                kind: "user",
                name: format!("{first} {last}"),
                email: Some(format!(
                    "{}.{}@{tenant}.example.com",
                    first.to_lowercase(),
                    last.to_lowercase()
                )),
                ip: random_ip(rng),
                user_agent: pick(rng, BROWSERS).to_owned(),
            }
        })
        .collect();
    pool.extend(SERVICES.iter().map(|(name, version)| Persona {
        id: format!("svc-{name}"),
        kind: "service",
        name: (*name).to_owned(),
        email: None,
        // Services call from the internal range.
        ip: IpAddr::V4(Ipv4Addr::new(198, 51, 100, rng.random_range(1..255))),
        user_agent: format!("{name}/{version}"),
    }));
    pool
}

/// An address from the documentation ranges: 203.0.113.0/24, 198.51.100.0/24, 2001:db8::/32.
fn random_ip(rng: &mut StdRng) -> IpAddr {
    match rng.random_range(0..10) {
        0..=5 => IpAddr::V4(Ipv4Addr::new(203, 0, 113, rng.random_range(1..255))),
        6 => IpAddr::V4(Ipv4Addr::new(198, 51, 100, rng.random_range(1..255))),
        _ => IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0x0db8,
            rng.random(),
            rng.random(),
            0,
            0,
            0,
            rng.random_range(1..0xffff),
        )),
    }
}

fn outcome(rng: &mut StdRng, risk: Risk) -> Outcome {
    // Per mille of success, failure, denied; the rest is unknown. Routine actions carry most
    // of the traffic, so the whole stream comes out near 93/4/2/1.
    let (success, failure, denied) = match risk {
        Risk::Authentication => (880, 95, 15),
        Risk::Privileged => (900, 30, 60),
        Risk::Routine => (940, 32, 18),
    };
    let roll = rng.random_range(0..1000);
    if roll < success {
        Outcome::Success
    } else if roll < success + failure {
        Outcome::Failure
    } else if roll < success + failure + denied {
        Outcome::Denied
    } else {
        Outcome::Unknown
    }
}

fn reason(rng: &mut StdRng, kind: Kind, outcome: Outcome) -> Option<String> {
    let reasons: &[&str] = match (outcome, kind) {
        (Outcome::Failure, Kind::Login) => &[
            "invalid password",
            "unknown user",
            "mfa code expired",
            "account locked after 5 failed attempts",
        ],
        (Outcome::Failure, Kind::Credential) => &[
            "password does not meet the policy",
            "reset token expired",
            "mfa code invalid",
        ],
        (Outcome::Failure, _) => &[
            "validation failed",
            "conflict: resource was modified concurrently",
            "quota exceeded",
            "upstream service returned 503",
        ],
        (Outcome::Denied, _) => &[
            "missing permission for this resource",
            "role viewer cannot perform this action",
            "ip address not in the tenant allow-list",
            "sso required by tenant policy",
        ],
        (Outcome::Unknown, _) => &[
            "upstream timeout after 30s",
            "connection reset before the response",
        ],
        (Outcome::Success, Kind::DocumentChange | Kind::Settings | Kind::Role | Kind::Refund)
            if rng.random_bool(0.4) =>
        {
            &[
                "requested by the account owner",
                "quarterly access review",
                "customer support ticket",
                "edited title",
                "policy update",
            ]
        }
        (Outcome::Success, _) => return None,
    };
    Some(pick(rng, reasons).to_owned())
}

/// The target and the action-specific metadata of one event.
fn details(
    rng: &mut StdRng,
    kind: Kind,
    actor: &Persona,
    other: &Persona,
) -> (Option<Target>, Map<String, Value>) {
    let doc_id = format!("doc-{}", rng.random_range(1000..99_999));
    let document = Target {
        id: Some(doc_id),
        kind: Some("document".into()),
        name: Some(pick(rng, DOCUMENTS).to_owned()),
    };
    let user = |p: &Persona| Target {
        id: Some(p.id.clone()),
        kind: Some("user".into()),
        name: Some(p.name.clone()),
    };
    let project_name = pick(rng, PROJECTS);
    let project = Target {
        id: Some(format!("prj-{}", rng.random_range(100..9_999))),
        kind: Some("project".into()),
        name: Some((*project_name).to_owned()),
    };
    let session = format!("sess-{}", hex(rng, 20));

    let (target, metadata) = match kind {
        Kind::Login => (
            None,
            json!({
                "method": pick(rng, &["password", "sso", "sso", "passkey", "magic_link"]),
                "mfa": rng.random_bool(0.7),
                "session_id": session,
                "geo": {"country": pick(rng, COUNTRIES), "asn": rng.random_range(1000..65_000)},
            }),
        ),
        Kind::Logout => (
            None,
            json!({
                "session_id": session,
                "session_age_s": rng.random_range(60..86_400),
                "trigger": pick(rng, &["user", "user", "idle_timeout", "admin"]),
            }),
        ),
        Kind::Credential => (
            Some(user(actor)),
            json!({
                "method": pick(rng, &["self_service", "email_link", "admin_forced"]),
                "sessions_revoked": rng.random_range(0..4),
                "factor": pick(rng, &["totp", "webauthn", "sms"]),
            }),
        ),
        Kind::Document => (
            Some(document),
            json!({
                "folder": pick(rng, FOLDERS),
                "size_bytes": rng.random_range(2_000..4_000_000),
                "version": rng.random_range(1..60),
            }),
        ),
        Kind::DocumentChange => {
            let name = document.name.clone().unwrap_or_default();
            (
                Some(document),
                json!({
                    "changes": {"title": [name, format!("{name} (rev {})", rng.random_range(2..9))]},
                    "version": rng.random_range(2..60),
                    "folder": pick(rng, FOLDERS),
                }),
            )
        }
        Kind::Share => (
            Some(document),
            json!({
                "recipient": {"id": other.id, "type": "user"},
                "permission": pick(rng, &["view", "comment", "edit"]),
                "link_expires_days": rng.random_range(1..90),
            }),
        ),
        Kind::Export => (
            Some(document),
            json!({
                "format": pick(rng, &["pdf", "docx", "markdown"]),
                "size_bytes": rng.random_range(10_000..9_000_000),
                "watermarked": rng.random_bool(0.5),
            }),
        ),
        Kind::Invoice => {
            let number = rng.random_range(1..99_999);
            (
                Some(Target {
                    id: Some(format!("inv-2026-{number:05}")),
                    kind: Some("invoice".into()),
                    name: Some(format!("INV-2026-{number:05}")),
                }),
                json!({
                    "amount_cents": rng.random_range(1_000..2_500_000),
                    "currency": pick(rng, &["EUR", "USD", "GBP"]),
                    "line_items": rng.random_range(1..25),
                }),
            )
        }
        Kind::Refund => (
            Some(Target {
                id: Some(format!("pay_{}", hex(rng, 14))),
                kind: Some("payment".into()),
                name: None,
            }),
            json!({
                "amount_cents": rng.random_range(500..250_000),
                "currency": pick(rng, &["EUR", "USD", "GBP"]),
                "partial": rng.random_bool(0.3),
            }),
        ),
        Kind::Role => (
            Some(user(other)),
            json!({
                "role": pick(rng, ROLES),
                "scope": format!("project:{project_name}"),
                "expires_at": null,
            }),
        ),
        Kind::Invite => (
            Some(user(other)),
            json!({
                "email": other.email,
                "role": pick(rng, ROLES),
                "invitation_expires_days": 7,
            }),
        ),
        Kind::ApiKey => (
            Some(Target {
                id: Some(format!("key_{}", hex(rng, 12))),
                kind: Some("api_key".into()),
                name: Some(
                    pick(rng, &["ci-deploy", "terraform", "metrics-export", "zapier"]).to_owned(),
                ),
            }),
            json!({
                "scopes": ["documents:read", "projects:write"],
                "expires_in_days": pick(rng, &[30, 90, 365]),
            }),
        ),
        Kind::Project => (
            Some(project),
            json!({
                "visibility": pick(rng, &["private", "team", "organization"]),
                "template": pick(rng, &["blank", "scrum", "kanban"]),
            }),
        ),
        Kind::Member => (
            Some(project),
            json!({
                "member": {"id": other.id, "name": other.name},
                "role": pick(rng, ROLES),
            }),
        ),
        Kind::Object => {
            let file = pick(
                rng,
                &["report.csv", "backup.tar.gz", "logo.png", "contract.pdf"],
            );
            let key = format!(
                "{}/2026-{:02}/{file}",
                project_name,
                rng.random_range(1..=11)
            );
            (
                Some(Target {
                    id: Some(format!("obj-{}", hex(rng, 12))),
                    kind: Some("object".into()),
                    name: Some(key),
                }),
                json!({
                    "bucket": format!("{}-files", project_name),
                    "size_bytes": rng.random_range(1_000..500_000_000),
                    "content_type": "application/octet-stream",
                }),
            )
        }
        Kind::Settings => (
            Some(Target {
                id: Some("org-settings".into()),
                kind: Some("settings".into()),
                name: Some("Organization settings".into()),
            }),
            json!({
                "changes": {"session_timeout_minutes": [60, pick(rng, &[15, 30, 120])]},
                "section": "security",
            }),
        ),
    };
    let Value::Object(metadata) = metadata else {
        unreachable!("every metadata literal above is an object")
    };
    (target, metadata)
}

/// One of `items`, uniformly.
fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

fn hex(rng: &mut StdRng, digits: usize) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    (0..digits)
        .map(|_| char::from(DIGITS[rng.random_range(0..16)]))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;
    use crate::{DEFAULT_MAX_EVENT_BYTES, decode};

    fn generate(seed: u64, tenants: usize, n: usize) -> Vec<Event> {
        let mut generator = Generator::new(seed, tenants);
        (0..n).map(|_| generator.next_event()).collect()
    }

    #[test]
    fn a_thousand_events_all_validate_and_decode_back() {
        for event in generate(1, 7, 1000) {
            event.validate().unwrap();
            let bytes = serde_json::to_vec(&event).unwrap();
            assert_eq!(decode(&bytes, DEFAULT_MAX_EVENT_BYTES).unwrap(), event);
            event
                .check_subject("audit", &event.subject("audit"))
                .unwrap();
        }
    }

    #[test]
    fn events_average_about_600_bytes() {
        let events = generate(2, 10, 1000);
        let total: usize = events
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap().len())
            .sum();
        let average = total / events.len();
        assert!((500..=700).contains(&average), "average {average} bytes");
    }

    #[test]
    fn actions_are_varied() {
        let actions: HashSet<String> = generate(3, 5, 1000).into_iter().map(|e| e.action).collect();
        assert!(actions.len() >= 10, "{actions:?}");
    }

    #[test]
    fn every_outcome_appears_and_success_dominates() {
        let events = generate(4, 5, 1000);
        let mut counts: HashMap<Outcome, usize> = HashMap::new();
        for event in &events {
            *counts.entry(event.outcome).or_default() += 1;
        }
        for outcome in Outcome::ALL {
            assert!(counts.get(&outcome).copied().unwrap_or(0) > 0, "{counts:?}");
        }
        let success = counts[&Outcome::Success];
        assert!((880..=970).contains(&success), "{counts:?}");
    }

    #[test]
    fn tenants_are_skewed() {
        let events = generate(5, 5, 1000);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for event in &events {
            *counts.entry(event.tenant.as_str()).or_default() += 1;
        }
        assert_eq!(counts.len(), 5, "{counts:?}");
        let most = counts.values().max().unwrap();
        let least = counts.values().min().unwrap();
        assert!(*most > 2 * least, "{counts:?}");
        assert_eq!(
            counts.get("acme").copied(),
            Some(*most),
            "the first tenant is the busiest"
        );
    }

    #[test]
    fn tenant_names_are_valid_and_distinct() {
        let generator = Generator::new(0, 45);
        let tenants = generator.tenants();
        assert_eq!(tenants.len(), 45);
        assert_eq!(&tenants[..3], ["acme", "globex", "initech"]);
        assert_eq!(
            tenants[TENANT_NAMES.len()],
            format!("tenant-{}", TENANT_NAMES.len() + 1)
        );
        assert_eq!(tenants.iter().collect::<HashSet<_>>().len(), 45);
        for tenant in tenants {
            crate::validate_tenant(tenant).unwrap();
        }
        assert_eq!(Generator::new(0, 1).tenants(), ["acme"]);
    }

    #[test]
    fn same_seed_same_choices_fresh_ids() {
        let a = generate(42, 3, 50);
        let b = generate(42, 3, 50);
        let c = generate(43, 3, 50);
        let shape = |events: &[Event]| -> Vec<(String, String, String, Option<String>)> {
            events
                .iter()
                .map(|e| {
                    (
                        e.tenant.clone(),
                        e.action.clone(),
                        e.actor.id.clone(),
                        e.request_id.clone(),
                    )
                })
                .collect()
        };
        assert_eq!(shape(&a), shape(&b));
        assert_ne!(shape(&a), shape(&c));
        let ids: HashSet<uuid::Uuid> = a.iter().chain(&b).map(|e| e.id).collect();
        assert_eq!(ids.len(), 100);
        assert!(a.iter().all(|e| e.id.get_version_num() == 7));
    }

    #[test]
    fn addresses_come_from_documentation_ranges() {
        for event in generate(6, 4, 500) {
            let ip: IpAddr = event.actor.ip.unwrap().parse().unwrap();
            let documentation = match ip {
                IpAddr::V4(v4) => {
                    let [a, b, c, _] = v4.octets();
                    (a, b, c) == (203, 0, 113) || (a, b, c) == (198, 51, 100)
                }
                IpAddr::V6(v6) => v6.segments()[..2] == [0x2001, 0x0db8],
            };
            assert!(documentation, "{ip}");
        }
    }

    #[test]
    fn occurred_at_is_now_in_utc() {
        let before = time::OffsetDateTime::now_utc() - time::Duration::milliseconds(1);
        let event = Generator::new(7, 2).next_event();
        let after = time::OffsetDateTime::now_utc();
        assert!(before <= event.occurred_at && event.occurred_at <= after);
        assert!(event.occurred_at.offset().is_utc());
    }

    #[test]
    #[should_panic(expected = "at least one tenant")]
    fn zero_tenants_is_a_bug() {
        Generator::new(0, 0);
    }
}
