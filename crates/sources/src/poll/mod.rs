//! Pulling audit logs from another system's API (`type = "api"` sources, `auditbridge
//! poll`): page by page, with a cursor that never skips and never repeats into the trail.
//!
//! **One poller per source.** Every poller running takes part; the one holding the source's
//! lease in PostgreSQL (`api_sources`, renewed every few seconds) polls, the others wait to
//! take over. Every write under the lease is fenced by it (`Store::commit_api_page`).
//!
//! **The cursor moves only past what is accounted for.** A page is fetched at the saved
//! cursor ([`cursor::plan`]); its items are mapped ([`Mapping::apply_value`]) and checked
//! against the tenant allow-list; the mappable ones are published and every one of them
//! acknowledged by JetStream; then, in one transaction, the items no mapping took are kept in
//! `api_source_rejects` and the cursor moves ([`cursor::advance`]). A crash anywhere before
//! the commit fetches the same page again: its events carry the same derived ids (source,
//! tenant, the remote event's own id) and are stored once. A `window` source also remembers
//! the ids it published whose remote time lies in the overlap (`api_source_seen`), so an
//! event fetched again in the next window, also with content the remote side changed since,
//! is not published again.
//!
//! **Limits.** 429 and 503 wait for `Retry-After` (or the rate limit's reset); the rate-limit
//! headers slow polling down before the limit is reached; 401/403 mark the source failing in
//! `status` and retry slowly; everything else backs off exponentially with jitter. None of
//! them moves the cursor.

pub mod cursor;
pub mod http;
pub mod page;

use std::time::{Duration, Instant};

use auditbridge_config::api_source::{ApiParams, CursorStyle};
use auditbridge_event::Uuid;
use auditbridge_runtime::telemetry as m;
use auditbridge_store::api_sources::{NewReject, PageCommit};
use auditbridge_store::{Store, StoreError};
use backon::BackoffBuilder as _;
use reqwest::Url;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::mapping::{Mapping, RefusalKind, check_tenant};
use crate::publish::{Outgoing, Sink};

/// How long a lease lasts without renewal; renewed every third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// A rejected item larger than this is kept as its size and hash.
const MAX_REJECT_BYTES: usize = 1024 * 1024;

/// A URL as logs and errors show it: no credentials, no query values.
pub(crate) fn shown_url(url: &Url) -> String {
    auditbridge_config::redact_url(url.as_str())
}

pub(crate) fn shown_url_text(url: &str) -> String {
    auditbridge_config::redact_url(url)
}

/// An `api` source that cannot run at all (its stored state does not fit the configuration).
#[derive(Debug, thiserror::Error)]
#[error("api source {source_name}: {detail}")]
pub struct PollError {
    pub source_name: String,
    pub detail: String,
}

/// Why one poll did not account for a page. Never moves the cursor.
#[derive(Debug)]
struct Failure {
    kind: &'static str,
    detail: String,
    /// Wait this long (a `Retry-After`), else back off.
    wait: Option<Duration>,
    failing: bool,
}

impl Failure {
    fn new(kind: &'static str, detail: impl Into<String>) -> Failure {
        Failure {
            kind,
            detail: detail.into(),
            wait: None,
            failing: false,
        }
    }
}

impl From<http::FetchError> for Failure {
    fn from(e: http::FetchError) -> Failure {
        let wait = match &e {
            http::FetchError::RateLimited { after, .. } => *after,
            _ => None,
        };
        Failure {
            kind: e.kind(),
            failing: matches!(e, http::FetchError::Auth { .. }),
            detail: e.to_string(),
            wait,
        }
    }
}

/// What one accounted-for page did.
struct Polled {
    cursor: Option<Value>,
    caught_up: bool,
    slow_down: Option<Duration>,
}

enum Outcome {
    Polled(Polled),
    Failed(Failure),
    LeaseLost,
}

/// One `api` source's poller.
pub struct Poller<S> {
    name: String,
    params: ApiParams,
    mapping: Mapping,
    client: http::ApiClient,
    origin: Url,
    sink: S,
    store: Store,
    holder: String,
    prefix: String,
    max_event_bytes: usize,
}

impl<S: Sink> Poller<S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        params: ApiParams,
        sink: S,
        store: Store,
        holder: String,
        prefix: String,
        max_event_bytes: usize,
    ) -> Result<Poller<S>, PollError> {
        let fail = |detail: String| PollError {
            source_name: name.clone(),
            detail,
        };
        let client = http::ApiClient::new(&params).map_err(fail)?;
        let origin =
            Url::parse(params.url.expose()).map_err(|e| fail(format!("params.url: {e}")))?;
        Ok(Poller {
            mapping: Mapping::new(&params.mapping),
            name,
            params,
            client,
            origin,
            sink,
            store,
            holder,
            prefix,
            max_event_bytes,
        })
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn style_name(&self) -> &'static str {
        match self.params.cursor {
            CursorStyle::Link => "link",
            CursorStyle::Token { .. } => "token",
            CursorStyle::Window(_) => "window",
        }
    }

    /// Takes part in the source's lease until `shutdown`, polling while it holds it.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), PollError> {
        let initial = cursor::initial(&self.params.cursor, OffsetDateTime::now_utc());
        let mut backoff = retry_backoff();
        loop {
            match self
                .store
                .register_api_source(&self.name, self.style_name(), initial.as_ref())
                .await
            {
                Ok(()) => break,
                Err(StoreError::Mismatch(detail)) => {
                    return Err(PollError {
                        source_name: self.name.clone(),
                        detail,
                    });
                }
                Err(e) => {
                    tracing::warn!(source = %self.name, error = %e, message = "Cannot register the api source; retrying.");
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    if sleep_or(delay, &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
        let label = [("source", self.name.clone())];
        while !shutdown.is_cancelled() {
            match self
                .store
                .acquire_api_lease(&self.name, &self.holder, LEASE_TTL)
                .await
            {
                Ok(Some(state)) => {
                    tracing::info!(source = %self.name, holder = %self.holder, message = "Took the api source's lease; polling.");
                    metrics::gauge!(m::POLL_LEASE_HELD, &label).set(1.0);
                    self.hold(state.cursor, state.cursor_moved_at, &shutdown)
                        .await;
                    metrics::gauge!(m::POLL_LEASE_HELD, &label).set(0.0);
                    if shutdown.is_cancelled() {
                        let _ = self.store.release_api_lease(&self.name, &self.holder).await;
                        break;
                    }
                    tracing::warn!(source = %self.name, message = "Lost the api source's lease; waiting to take it again.");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(source = %self.name, error = %e, message = "Cannot take the api source's lease; retrying.");
                }
            }
            if sleep_or(LEASE_TTL / 3, &shutdown).await {
                break;
            }
        }
        Ok(())
    }

    /// Polls while the lease is ours: renews it beside the polling, and stops when it is lost
    /// or at shutdown.
    async fn hold(
        &self,
        mut saved: Option<Value>,
        moved_at: Option<OffsetDateTime>,
        shutdown: &CancellationToken,
    ) {
        let lost = shutdown.child_token();
        let renew = {
            let store = self.store.clone();
            let (name, holder, lost) = (self.name.clone(), self.holder.clone(), lost.clone());
            tokio::spawn(async move {
                let mut last_ok = Instant::now();
                loop {
                    if sleep_or(LEASE_TTL / 3, &lost).await {
                        return;
                    }
                    match store.renew_api_lease(&name, &holder, LEASE_TTL).await {
                        Ok(true) => last_ok = Instant::now(),
                        Ok(false) => break,
                        // Unsure: the lease may still be ours until it would have expired.
                        Err(_) if last_ok.elapsed() < LEASE_TTL => continue,
                        Err(_) => break,
                    }
                }
                lost.cancel();
            })
        };
        let label = [("source", self.name.clone())];
        let mut moved_at = moved_at.unwrap_or_else(OffsetDateTime::now_utc);
        let mut newest: Option<OffsetDateTime> = None;
        let mut backoff = retry_backoff();
        while !lost.is_cancelled() {
            let now = OffsetDateTime::now_utc();
            metrics::gauge!(m::POLL_CURSOR_AGE, &label).set((now - moved_at).as_seconds_f64());
            if let Some(n) = newest {
                metrics::gauge!(m::POLL_LAG, &label).set((now - n).as_seconds_f64().max(0.0));
            }
            let outcome = match cursor::plan(
                &self.params.cursor,
                &self.origin,
                self.page_size_param(),
                saved.as_ref(),
                now,
            ) {
                Ok(Some(plan)) => self.poll_once(&plan, saved.as_ref(), &mut newest).await,
                Ok(None) => Outcome::Polled(Polled {
                    cursor: saved.clone(),
                    caught_up: true,
                    slow_down: None,
                }),
                Err(detail) => Outcome::Failed(Failure::new("malformed", detail)),
            };
            let delay = match outcome {
                Outcome::LeaseLost => break,
                Outcome::Polled(p) => {
                    metrics::counter!(m::POLL_REQUESTS, "source" => self.name.clone(), "outcome" => "ok").increment(1);
                    backoff = retry_backoff();
                    if p.cursor != saved {
                        moved_at = OffsetDateTime::now_utc();
                    }
                    saved = p.cursor;
                    let base = if p.caught_up {
                        self.params.interval
                    } else {
                        Duration::ZERO
                    };
                    base.max(p.slow_down.unwrap_or_default())
                }
                Outcome::Failed(f) => {
                    metrics::counter!(m::POLL_REQUESTS, "source" => self.name.clone(), "outcome" => f.kind).increment(1);
                    metrics::counter!(m::POLL_ERRORS, "source" => self.name.clone(), "kind" => f.kind).increment(1);
                    tracing::warn!(source = %self.name, kind = f.kind, error = %f.detail, message = "Poll failed; the cursor stays.");
                    match self
                        .store
                        .record_api_error(&self.name, &self.holder, f.kind, &f.detail, f.failing)
                        .await
                    {
                        Ok(false) => break,
                        Ok(true) => {}
                        Err(e) => {
                            tracing::warn!(source = %self.name, error = %e, message = "Cannot record the poll's error.");
                        }
                    }
                    if f.failing {
                        // Credentials do not mend themselves quickly; keep trying, slowly.
                        (self.params.interval * 5)
                            .clamp(Duration::from_secs(5), Duration::from_secs(300))
                    } else {
                        f.wait
                            .unwrap_or_else(|| backoff.next().unwrap_or(Duration::from_secs(300)))
                    }
                }
            };
            if !delay.is_zero() && sleep_or(delay, &lost).await {
                break;
            }
        }
        lost.cancel();
        let _ = renew.await;
    }

    fn page_size_param(&self) -> Option<(&str, usize)> {
        (!self.params.page_size_param.is_empty())
            .then_some((self.params.page_size_param.as_str(), self.params.page_size))
    }

    fn token_pointer(&self) -> Option<&str> {
        match &self.params.cursor {
            CursorStyle::Token { pointer, .. } => Some(pointer),
            CursorStyle::Window(w) => w.token.as_ref().map(|(p, _)| p.as_str()),
            CursorStyle::Link => None,
        }
    }

    /// Fetches one page, publishes what maps, and accounts for it under the lease.
    async fn poll_once(
        &self,
        plan: &cursor::Plan,
        saved: Option<&Value>,
        newest: &mut Option<OffsetDateTime>,
    ) -> Outcome {
        let response = match self.client.get(&plan.url).await {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(e.into()),
        };
        let page = match page::parse(
            &response.body,
            &response.headers,
            &plan.url,
            &self.origin,
            &self.params.items,
            self.token_pointer(),
        ) {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(Failure::new(e.kind, e.detail)),
        };
        let received_at = OffsetDateTime::now_utc();
        let mut outgoing = Vec::new();
        let mut times: Vec<(Uuid, OffsetDateTime)> = Vec::new();
        let mut rejects = Vec::new();
        let mut seen_in_page = std::collections::HashSet::new();
        let mut repeated = 0u64;
        for (index, item) in page.items.iter().enumerate() {
            match self.map_item(item, received_at) {
                Ok(mapped) => {
                    if !seen_in_page.insert(mapped.event.id) {
                        repeated += 1;
                        continue;
                    }
                    times.push((mapped.event.id, mapped.event.occurred_at));
                    outgoing.push(Outgoing::mapped(&mapped, &self.prefix, None));
                }
                Err((kind, reason)) => rejects.push(NewReject {
                    index: index as u32,
                    item: kept_item(&item.text),
                    kind: kind.to_owned(),
                    reason,
                }),
            }
        }
        // A window's overlap: what an earlier window published is not published again.
        let window = matches!(self.params.cursor, CursorStyle::Window(_));
        if window && !times.is_empty() {
            let ids: Vec<Uuid> = times.iter().map(|t| t.0).collect();
            match self.store.api_seen(&self.name, &ids).await {
                Ok(seen) if !seen.is_empty() => {
                    let seen: std::collections::HashSet<Uuid> = seen.into_iter().collect();
                    repeated += seen.len() as u64;
                    outgoing.retain(|o| !seen.contains(&o.id));
                    times.retain(|t| !seen.contains(&t.0));
                }
                Ok(_) => {}
                Err(e) => return Outcome::Failed(Failure::new("database", e.to_string())),
            }
        }
        if let Err(e) = self.sink.publish(&outgoing).await {
            return Outcome::Failed(Failure::new("publish", e.to_string()));
        }
        let next = cursor::Next {
            link: page.link,
            token: page.token,
            items: page.items.len(),
        };
        let (cursor, caught_up) = cursor::advance(
            &self.params.cursor,
            saved,
            plan,
            &next,
            self.params.page_size,
        );
        let page_newest = times.iter().map(|t| t.1).max();
        let commit = PageCommit {
            fetched_at: saved.cloned(),
            cursor: cursor.clone(),
            events: outgoing.len() as u64,
            newest: page_newest,
            rejects,
            seen: if window { times } else { Vec::new() },
            forget_before: cursor::forget_before(&self.params.cursor, cursor.as_ref()),
        };
        match self
            .store
            .commit_api_page(&self.name, &self.holder, &commit)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Outcome::LeaseLost,
            Err(e) => return Outcome::Failed(Failure::new("database", e.to_string())),
        }
        let source = self.name.clone();
        metrics::counter!(m::POLL_PAGES, "source" => source.clone()).increment(1);
        for (result, n) in [
            ("published", commit.events),
            ("rejected", commit.rejects.len() as u64),
            ("seen", repeated),
        ] {
            if n > 0 {
                metrics::counter!(m::POLL_EVENTS, "source" => source.clone(), "result" => result)
                    .increment(n);
            }
        }
        for r in &commit.rejects {
            tracing::warn!(source = %self.name, index = r.index, kind = %r.kind, reason = %r.reason, message = "Item of a page kept as a reject.");
        }
        if let Some(n) = page_newest {
            *newest = Some(newest.map_or(n, |o| o.max(n)));
        }
        tracing::debug!(source = %self.name, url = %shown_url(&plan.url), items = next.items, published = commit.events, caught_up, message = "Page accounted for.");
        Outcome::Polled(Polled {
            cursor,
            caught_up,
            slow_down: response.slow_down,
        })
    }

    /// One item as an event this source may publish, or why not.
    fn map_item(
        &self,
        item: &page::Item,
        received_at: OffsetDateTime,
    ) -> Result<crate::mapping::Mapped, (&'static str, String)> {
        if item.damaged {
            return Err((
                RefusalKind::NotJson.as_str(),
                "the page was not UTF-8 and this item holds bytes that are not".into(),
            ));
        }
        let value: Value = serde_json::from_str(&item.text).map_err(|e| {
            (
                RefusalKind::NotJson.as_str(),
                format!("cannot read the item: {e}"),
            )
        })?;
        let mapped = self
            .mapping
            .apply_value(&self.name, &value, self.max_event_bytes, received_at)
            .and_then(|m| check_tenant(&self.name, &self.params.tenants, &m.event).map(|()| m))
            .map_err(|r| (r.kind.as_str(), r.detail))?;
        Ok(mapped)
    }

    /// Maps the source's rejected items again (after a mapping fix) and publishes those that
    /// map now; each is recorded as published with its event id, or refused again with the
    /// reason. Needs no lease: the ids deduplicate.
    pub async fn replay_rejects(&self) -> Result<ReplayReport, String> {
        let mut report = ReplayReport::default();
        let mut after = 0;
        loop {
            let batch = self
                .store
                .api_rejects(&self.name, true, after, 500)
                .await
                .map_err(|e| e.to_string())?;
            let Some(last) = batch.last() else { break };
            after = last.id;
            let received_at = OffsetDateTime::now_utc();
            let mut ready = Vec::new();
            for r in &batch {
                let item = page::Item {
                    text: r.item.clone(),
                    damaged: false,
                };
                match self.map_item(&item, received_at) {
                    Ok(mapped) => {
                        ready.push((
                            r.id,
                            mapped.event.id,
                            Outgoing::mapped(&mapped, &self.prefix, None),
                        ));
                    }
                    Err((kind, reason)) => {
                        report.refused += 1;
                        self.store
                            .settle_api_reject(
                                r.id,
                                &format!("refused again ({kind}): {reason}"),
                                None,
                            )
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            let out: Vec<Outgoing> = ready.iter().map(|r| r.2.clone()).collect();
            self.sink.publish(&out).await.map_err(|e| e.to_string())?;
            for (id, event, _) in &ready {
                self.store
                    .settle_api_reject(*id, "published", Some(*event))
                    .await
                    .map_err(|e| e.to_string())?;
                report.published += 1;
            }
        }
        Ok(report)
    }
}

/// What [`Poller::replay_rejects`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    pub published: u64,
    pub refused: u64,
}

/// The item as kept in `api_source_rejects`: its text, or its size and hash when large.
fn kept_item(text: &str) -> String {
    if text.len() <= MAX_REJECT_BYTES {
        return text.to_owned();
    }
    serde_json::json!({"auditbridge_withheld": {
        "bytes": text.len(),
        "sha256": hex::encode(Sha256::digest(text.as_bytes())),
        "why": "larger than 1 MiB",
    }})
    .to_string()
}

fn retry_backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(300))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Sleeps `d`; true if `token` was cancelled first.
async fn sleep_or(d: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = token.cancelled() => true,
    }
}
