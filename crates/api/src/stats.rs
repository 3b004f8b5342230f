//! `GET /v1/stats`: counts by action (cut to a depth of the hierarchy) and by outcome, per time
//! bucket, over a window, for charts. Every bucket of the window is present (zeros included),
//! so a chart needs no gap-filling.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::AppState;
use crate::auth::{Principal, Scope};
use crate::error::ApiError;
use crate::params::{self, Endpoint};

/// Most buckets one answer may hold.
const MAX_BUCKETS: u64 = 2000;

pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/v1/stats", get(stats))
}

#[derive(Serialize, Default)]
struct Counts {
    total: i64,
    by_action: BTreeMap<String, i64>,
    by_outcome: BTreeMap<String, i64>,
}

impl Counts {
    fn add(&mut self, action: &str, outcome: &str, n: i64) {
        self.total += n;
        *self.by_action.entry(action.to_owned()).or_default() += n;
        *self.by_outcome.entry(outcome.to_owned()).or_default() += n;
    }
}

#[derive(Serialize)]
struct Bucket {
    start: String,
    #[serde(flatten)]
    counts: Counts,
}

#[derive(Serialize)]
struct Body {
    tenant: String,
    since: String,
    until: String,
    bucket_seconds: u64,
    depth: i64,
    #[serde(flatten)]
    totals: Counts,
    buckets: Vec<Bucket>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

async fn stats(
    State(state): State<AppState>,
    principal: Principal,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<axum::Json<Body>, ApiError> {
    principal.require(Scope::Read)?;
    let mut parsed = params::parse(Endpoint::Stats, &pairs, &principal)?;
    let bucket = parsed.bucket.unwrap_or(Duration::from_secs(3600));
    let depth = parsed.int("depth");
    // PostgreSQL keeps microseconds: bucket starts computed here must be the ones it computes,
    // or a count lands in the neighbouring bucket.
    let micros = |t: OffsetDateTime| {
        t.replace_nanosecond(t.nanosecond() / 1000 * 1000)
            .unwrap_or(t)
    };
    let until = micros(parsed.filter.until.unwrap_or_else(OffsetDateTime::now_utc));
    let since = micros(
        parsed
            .filter
            .since
            .unwrap_or(until - time::Duration::hours(24)),
    );
    if since >= until {
        return Err(ApiError::bad("since", "must be earlier than until"));
    }
    parsed.filter.since = Some(since);
    parsed.filter.until = Some(until);
    let window = (until - since).whole_seconds().max(1) as u64;
    let width = bucket.as_secs().max(1);
    let buckets = window.div_ceil(width);
    if buckets > MAX_BUCKETS {
        return Err(ApiError::bad(
            "bucket",
            format!(
                "{} buckets of {} in this window; at most {MAX_BUCKETS}: choose a wider bucket or a shorter window",
                buckets,
                humantime::format_duration(bucket)
            ),
        ));
    }
    let turn = state.budget.request(&principal.name).await?;
    let rows = state
        .store
        .stats(
            &parsed.filter,
            since,
            Duration::from_secs(width),
            depth as u32,
        )
        .await?;
    drop(turn);

    let mut totals = Counts::default();
    let mut by_bucket: Vec<Bucket> = (0..buckets)
        .map(|i| Bucket {
            start: rfc3339(since + time::Duration::seconds((i * width) as i64)),
            counts: Counts::default(),
        })
        .collect();
    for r in rows {
        totals.add(&r.action, &r.outcome, r.count);
        let index = ((r.bucket - since).whole_microseconds().max(0)
            / (i128::from(width) * 1_000_000)) as usize;
        if let Some(b) = by_bucket.get_mut(index) {
            b.counts.add(&r.action, &r.outcome, r.count);
        }
    }
    Ok(axum::Json(Body {
        tenant: parsed.filter.tenant.unwrap_or_default(),
        since: rfc3339(since),
        until: rfc3339(until),
        bucket_seconds: width,
        depth,
        totals,
        buckets: by_bucket,
    }))
}
