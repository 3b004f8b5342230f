//! How long stored events are kept: a default and per-tenant overrides, from the file's
//! `[[retention]]` tables (`tenant`, `keep`) and `AUDITBRIDGE_RETENTION` (a plain duration or
//! `forever` for the default, or a JSON array of such items), read into a [`Retention`] and
//! checked here, at load. The `keep` parser is also that of `AUDITBRIDGE_DEAD_LETTER_RETENTION`.

use std::time::Duration;

use serde::de::{self as serde_de, Unexpected};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::ConfigError;
use crate::de::{self, Text};
use crate::lists::{Item, Origin, Refusal, check_tenants, number_in, refuse, typed};

/// The longest `keep` other than `forever`: 100 years, as `humantime` counts them (`"100y"`).
/// A longer one is more likely a typo than a policy (`forever` says what it means), and
/// `now - keep` stays far inside the dates PostgreSQL and `time` hold.
pub(crate) const KEEP_MAX_SECS: u64 = 100 * 31_557_600;

/// How long events are kept: `None` is forever.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// Events of a tenant without an override are kept this long (`None`: forever, the
    /// default). Set by a `[[retention]]` item without `tenant`, or by a plain
    /// `AUDITBRIDGE_RETENTION`.
    pub default: Option<Duration>,
    /// Per-tenant overrides, one per tenant: the file's items, each replaced by an item of
    /// `AUDITBRIDGE_RETENTION` for the same tenant, then that variable's other tenants.
    pub tenants: Vec<TenantRetention>,
}

/// One tenant's override of the default retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRetention {
    /// A valid tenant name (the grammar of events).
    pub tenant: String,
    /// How long this tenant's events are kept; `None`: forever.
    pub keep: Option<Duration>,
}

impl Retention {
    /// How long `tenant`'s events are kept (`None`: forever): its override, else the default.
    pub fn keep_for(&self, tenant: &str) -> Option<Duration> {
        self.tenants
            .iter()
            .find(|t| t.tenant == tenant)
            .map_or(self.default, |t| t.keep)
    }
}

/// A `keep` value: `forever`, or a duration in whole seconds from 1s to 100y.
pub(crate) fn keep<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = Text::deserialize_from(d)?;
    if text.trim() == "forever" {
        return Ok(None);
    }
    de::whole_seconds(&text, 1, KEEP_MAX_SECS)
        .map(Some)
        .ok_or_else(|| {
            serde_de::Error::invalid_value(
                Unexpected::Str(&text),
                &format!("{}, or \"forever\"", de::seconds_expected(1, KEEP_MAX_SECS)).as_str(),
            )
        })
}

/// A `keep` value, or empty for unset (which is forever too, the default).
pub(crate) fn optional_keep<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = Text::deserialize_from(d)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    keep(serde_de::value::StrDeserializer::new(&text))
}

/// One `[[retention]]` table, or one item of `AUDITBRIDGE_RETENTION`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Definition {
    /// Absent: the item sets the default.
    #[serde(default)]
    tenant: Option<String>,
    #[serde(deserialize_with = "keep")]
    keep: Option<Duration>,
}

/// Reads the items of the file, then of the environment, into a [`Retention`]. Within one of
/// them a tenant (or the default) is given once; an item of the environment replaces the
/// file's for the same tenant (or the default), as a variable replaces a file's setting.
pub(crate) fn read(items: Vec<Item>) -> Result<Retention, ConfigError> {
    let mut retention = Retention::default();
    // Where the default and each tenant (in the order of `retention.tenants`) were set: the
    // origin and the item's position there.
    let mut default_at: Option<(Origin, usize)> = None;
    let mut tenant_at: Vec<(Origin, usize)> = Vec::new();
    let mut position: Vec<(Origin, usize)> = Vec::new();
    for item in items {
        // Numbered from 1 where it was written, as the other lists' unnamed items are.
        let n = number_in(&mut position, &item.origin);
        let name = match item.value.get("tenant") {
            None => format!("#{n} (default)"),
            Some(Value::String(t)) if auditbridge_event::validate_tenant(t).is_ok() => {
                format!("#{n} (tenant {t})")
            }
            Some(_) => format!("#{n}"),
        };
        let fail = |(setting, message): Refusal| ConfigError::Definition {
            what: "retention",
            name: name.clone(),
            setting,
            message,
            origin: item.origin.clone(),
        };
        let d: Definition = typed(&item.value).map_err(fail)?;
        let Some(tenant) = d.tenant else {
            if let Some((origin, first)) = &default_at
                && *origin == item.origin
            {
                return Err(fail(refuse(
                    "tenant",
                    format!(
                        "missing, as in #{first}: only one item may leave it out (that item \
                         sets the default)"
                    ),
                )));
            }
            retention.default = d.keep;
            default_at = Some((item.origin.clone(), n));
            continue;
        };
        check_tenants("tenant", std::slice::from_ref(&tenant)).map_err(fail)?;
        match retention.tenants.iter().position(|t| t.tenant == tenant) {
            Some(i) if tenant_at[i].0 == item.origin => {
                return Err(fail(refuse(
                    "tenant",
                    format!(
                        "{tenant} is also given by #{}: a tenant has one retention",
                        tenant_at[i].1
                    ),
                )));
            }
            Some(i) => {
                retention.tenants[i].keep = d.keep;
                tenant_at[i] = (item.origin.clone(), n);
            }
            None => {
                retention.tenants.push(TenantRetention {
                    tenant,
                    keep: d.keep,
                });
                tenant_at.push((item.origin.clone(), n));
            }
        }
    }
    Ok(retention)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use crate::{Config, Retention, TenantRetention};

    const DAY: Duration = Duration::from_secs(86_400);

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// A configuration file of its own for each test (they run in parallel).
    fn file(test: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("abcfg-retention-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{test}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn load(path: Option<&Path>, pairs: &[(&str, &str)]) -> Result<Config, String> {
        let mut vars = env(pairs);
        if let Some(path) = path {
            vars.push(("AUDITBRIDGE_CONFIG".into(), path.to_str().unwrap().into()));
        }
        Config::from_env(vars).map_err(|e| e.to_string())
    }

    fn tenant(tenant: &str, keep: Option<Duration>) -> TenantRetention {
        TenantRetention {
            tenant: tenant.into(),
            keep,
        }
    }

    #[test]
    fn by_default_everything_is_kept_forever_in_daily_partitions() {
        let c = load(None, &[]).unwrap();
        assert_eq!(c.partition_interval, DAY);
        assert_eq!(c.dead_letter_retention, None);
        assert_eq!(c.retention, Retention::default());
        assert_eq!(c.retention.default, None);
        assert!(c.retention.tenants.is_empty());
        assert_eq!(c.retention.keep_for("acme"), None);
        // The three variables are settings, not typos.
        let c = load(
            None,
            &[
                ("AUDITBRIDGE_PARTITION_INTERVAL", "1d"),
                ("AUDITBRIDGE_DEAD_LETTER_RETENTION", "forever"),
                ("AUDITBRIDGE_RETENTION", "forever"),
            ],
        )
        .unwrap();
        assert!(c.unknown_env().is_empty(), "{:?}", c.unknown_env());
    }

    #[test]
    fn a_plain_variable_sets_the_default() {
        let c = load(None, &[("AUDITBRIDGE_RETENTION", " 90d ")]).unwrap();
        assert_eq!(c.retention.default, Some(90 * DAY));
        assert!(c.retention.tenants.is_empty());
        assert_eq!(c.retention.keep_for("acme"), Some(90 * DAY));
        let c = load(None, &[("AUDITBRIDGE_RETENTION", "30s")]).unwrap();
        assert_eq!(c.retention.default, Some(Duration::from_secs(30)));
        let c = load(None, &[("AUDITBRIDGE_RETENTION", "100y")]).unwrap();
        assert_eq!(
            c.retention.default,
            Some(Duration::from_secs(3_155_760_000))
        );
        // Empty is unset.
        let c = load(None, &[("AUDITBRIDGE_RETENTION", "")]).unwrap();
        assert_eq!(c.retention, Retention::default());
    }

    /// `forever` in the variable replaces a default the file set.
    #[test]
    fn forever_in_the_variable_replaces_the_files_default() {
        let path = file(
            "forever",
            "[[retention]]\nkeep = \"365d\"\n\n[[retention]]\ntenant = \"acme\"\nkeep = \"30d\"\n",
        );
        let c = load(Some(&path), &[]).unwrap();
        assert_eq!(c.retention.default, Some(365 * DAY));
        let c = load(Some(&path), &[("AUDITBRIDGE_RETENTION", "forever")]).unwrap();
        assert_eq!(c.retention.default, None);
        assert_eq!(c.retention.tenants, [tenant("acme", Some(30 * DAY))]);
        assert_eq!(c.retention.keep_for("acme"), Some(30 * DAY));
        assert_eq!(c.retention.keep_for("globex"), None);
    }

    #[test]
    fn the_file_gives_a_default_and_overrides() {
        let path = file(
            "file",
            "[[retention]]\ntenant = \"acme\"\nkeep = \"7d\"\n\n\
             [[retention]]\nkeep = \"90d\"\n\n\
             [[retention]]\ntenant = \"globex\"\nkeep = \"forever\"\n\n\
             [[retention]]\ntenant = \"initech\"\nkeep = \"30s\"\n",
        );
        let c = load(Some(&path), &[]).unwrap();
        assert_eq!(
            c.retention,
            Retention {
                default: Some(90 * DAY),
                tenants: vec![
                    tenant("acme", Some(7 * DAY)),
                    tenant("globex", None),
                    tenant("initech", Some(Duration::from_secs(30))),
                ],
            }
        );
        assert_eq!(c.retention.keep_for("acme"), Some(7 * DAY));
        assert_eq!(c.retention.keep_for("globex"), None);
        assert_eq!(c.retention.keep_for("hooli"), Some(90 * DAY));
        // Not a table: refused by name, as the other lists are.
        let path = file("scalar", "retention = \"90d\"\n");
        let err = load(Some(&path), &[]).unwrap_err();
        assert!(
            err.contains("[[retention]]") && err.contains("scalar.toml"),
            "{err}"
        );
    }

    /// A JSON array extends the file's items; an item for a tenant (or the default) the file
    /// already gives replaces the file's.
    #[test]
    fn a_json_array_extends_the_file_and_replaces_its_tenants() {
        let path = file(
            "array",
            "[[retention]]\nkeep = \"365d\"\n\n\
             [[retention]]\ntenant = \"acme\"\nkeep = \"7d\"\n\n\
             [[retention]]\ntenant = \"globex\"\nkeep = \"30d\"\n",
        );
        let c = load(
            Some(&path),
            &[(
                "AUDITBRIDGE_RETENTION",
                r#"[{"tenant": "acme", "keep": "forever"}, {"tenant": "hooli", "keep": "1d"}]"#,
            )],
        )
        .unwrap();
        assert_eq!(
            c.retention,
            Retention {
                default: Some(365 * DAY),
                tenants: vec![
                    tenant("acme", None),
                    tenant("globex", Some(30 * DAY)),
                    tenant("hooli", Some(DAY)),
                ],
            }
        );
        let c = load(
            Some(&path),
            &[("AUDITBRIDGE_RETENTION", r#"[{"keep": "2y"}]"#)],
        )
        .unwrap();
        assert_eq!(
            c.retention.default,
            Some(Duration::from_secs(2 * 31_557_600))
        );
        assert_eq!(c.retention.tenants.len(), 2);
        // Without a file.
        let c = load(
            None,
            &[(
                "AUDITBRIDGE_RETENTION",
                r#"[{"tenant": "acme", "keep": "7d"}]"#,
            )],
        )
        .unwrap();
        assert_eq!(c.retention.default, None);
        assert_eq!(c.retention.keep_for("acme"), Some(7 * DAY));
        // Not an array.
        for value in [r#"{"keep": "7d"}"#, "[oops"] {
            let err = load(None, &[("AUDITBRIDGE_RETENTION", value)]).unwrap_err();
            assert!(
                err.contains("AUDITBRIDGE_RETENTION") && err.contains("JSON array"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_tenant_or_the_default_given_twice_in_one_place_is_refused() {
        let path = file(
            "twice",
            "[[retention]]\ntenant = \"acme\"\nkeep = \"7d\"\n\n\
             [[retention]]\ntenant = \"acme\"\nkeep = \"8d\"\n",
        );
        let err = load(Some(&path), &[]).unwrap_err();
        assert!(
            err.contains("retention #2 (tenant acme): tenant: acme is also given by #1")
                && err.contains("twice.toml"),
            "{err}"
        );
        let path = file(
            "two-defaults",
            "[[retention]]\nkeep = \"7d\"\n\n[[retention]]\nkeep = \"8d\"\n",
        );
        let err = load(Some(&path), &[]).unwrap_err();
        assert!(
            err.contains("retention #2 (default): tenant: missing, as in #1")
                && err.contains("two-defaults.toml"),
            "{err}"
        );
        let err = load(
            None,
            &[(
                "AUDITBRIDGE_RETENTION",
                r#"[{"tenant": "acme", "keep": "7d"}, {"tenant": "acme", "keep": "7d"}]"#,
            )],
        )
        .unwrap_err();
        assert!(
            err.contains("retention #2 (tenant acme): tenant:")
                && err.contains("from AUDITBRIDGE_RETENTION"),
            "{err}"
        );
    }

    /// Zero, a fraction of a second, more than 100 years and text that is no duration are
    /// refused, naming the item, the setting and where it was written.
    #[test]
    fn a_bad_keep_is_refused_by_name() {
        for keep in ["0s", "1500ms", "1.5s", "101y", "soon", "-1d", "30", ""] {
            let path = file(
                "bad-keep",
                &format!(
                    "[[retention]]\ntenant = \"acme\"\nkeep = \"1d\"\n\n\
                     [[retention]]\ntenant = \"globex\"\nkeep = \"{keep}\"\n"
                ),
            );
            let err = load(Some(&path), &[]).unwrap_err();
            assert!(
                err.contains("retention #2 (tenant globex): keep: ")
                    && err.contains("whole seconds")
                    && err.contains("from 1s to 100y, or \"forever\"")
                    && err.contains(&format!("{keep:?}"))
                    && err.contains("bad-keep.toml"),
                "{keep}: {err}"
            );
            let err = load(None, &[("AUDITBRIDGE_RETENTION", keep)]);
            if !keep.is_empty() {
                let err = err.unwrap_err();
                assert!(
                    err.contains("retention #1 (default): keep: ")
                        && err.contains("from AUDITBRIDGE_RETENTION"),
                    "{keep}: {err}"
                );
            }
        }
        // A number without a unit, and a missing keep.
        let path = file("bare-keep", "[[retention]]\nkeep = 30\n");
        let err = load(Some(&path), &[]).unwrap_err();
        assert!(err.contains("retention #1 (default): keep: "), "{err}");
        let path = file("no-keep", "[[retention]]\ntenant = \"acme\"\n");
        let err = load(Some(&path), &[]).unwrap_err();
        assert!(
            err.contains("retention #1 (tenant acme)") && err.contains("`keep`"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_tenant_or_an_unknown_key_is_refused_by_name() {
        for bad in ["Acme", "", "-acme", "a b", &"a".repeat(64)] {
            let path = file(
                "bad-tenant",
                &format!("[[retention]]\ntenant = \"{bad}\"\nkeep = \"1d\"\n"),
            );
            let err = load(Some(&path), &[]).unwrap_err();
            assert!(
                err.contains("retention #1: tenant: ") && err.contains("bad-tenant.toml"),
                "{bad}: {err}"
            );
        }
        let err = load(
            None,
            &[("AUDITBRIDGE_RETENTION", r#"[{"tenant": 7, "keep": "1d"}]"#)],
        )
        .unwrap_err();
        assert!(err.contains("retention #1: tenant: "), "{err}");
        let path = file(
            "unknown-key",
            "[[retention]]\ntenant = \"acme\"\nkeep = \"1d\"\nkeep_for = \"2d\"\n",
        );
        let err = load(Some(&path), &[]).unwrap_err();
        assert!(
            err.contains("retention #1 (tenant acme)")
                && err.contains("unknown field `keep_for`")
                && err.contains("unknown-key.toml"),
            "{err}"
        );
    }

    #[test]
    fn the_partition_interval_is_whole_seconds_from_1s_to_366d() {
        for (value, secs) in [
            ("1s", 1),
            ("1h", 3600),
            ("7d", 7 * 86_400),
            ("366d", 366 * 86_400),
        ] {
            let c = load(None, &[("AUDITBRIDGE_PARTITION_INTERVAL", value)]).unwrap();
            assert_eq!(c.partition_interval, Duration::from_secs(secs), "{value}");
        }
        for value in ["0s", "999ms", "1500ms", "367d", "2y", "daily", ""] {
            let err = load(None, &[("AUDITBRIDGE_PARTITION_INTERVAL", value)]).unwrap_err();
            assert!(
                err.contains("AUDITBRIDGE_PARTITION_INTERVAL")
                    && err.contains("whole seconds")
                    && err.contains("from 1s to 366d"),
                "{value}: {err}"
            );
        }
        let path = file("partition", "partition_interval = \"12h\"\n");
        let c = load(Some(&path), &[]).unwrap();
        assert_eq!(c.partition_interval, Duration::from_secs(12 * 3600));
        let c = load(Some(&path), &[("AUDITBRIDGE_PARTITION_INTERVAL", "1h")]).unwrap();
        assert_eq!(c.partition_interval, Duration::from_secs(3600));
        let path = file("partition-bad", "partition_interval = \"0s\"\n");
        let err = load(Some(&path), &[]).unwrap_err();
        assert!(
            err.contains("partition_interval") && err.contains("partition-bad.toml"),
            "{err}"
        );
    }

    #[test]
    fn dead_letter_retention_is_a_keep_value() {
        for (value, keep) in [
            ("forever", None),
            ("", None),
            ("1s", Some(Duration::from_secs(1))),
            ("30d", Some(30 * DAY)),
        ] {
            let c = load(None, &[("AUDITBRIDGE_DEAD_LETTER_RETENTION", value)]).unwrap();
            assert_eq!(c.dead_letter_retention, keep, "{value:?}");
        }
        for value in ["0s", "1500ms", "101y", "never"] {
            let err = load(None, &[("AUDITBRIDGE_DEAD_LETTER_RETENTION", value)]).unwrap_err();
            assert!(
                err.contains("AUDITBRIDGE_DEAD_LETTER_RETENTION")
                    && err.contains("whole seconds")
                    && err.contains("\"forever\""),
                "{value}: {err}"
            );
        }
        let path = file("dead-letters", "dead_letter_retention = \"14d\"\n");
        let c = load(Some(&path), &[]).unwrap();
        assert_eq!(c.dead_letter_retention, Some(14 * DAY));
        let c = load(
            Some(&path),
            &[("AUDITBRIDGE_DEAD_LETTER_RETENTION", "forever")],
        )
        .unwrap();
        assert_eq!(c.dead_letter_retention, None);
    }
}
