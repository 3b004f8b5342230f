//! Where the next page starts, for each cursor style, and how a page moves it. Pure: the
//! poller saves what [`advance`] returns once the page is accounted for.
//!
//! Saved shapes (`api_sources.cursor`):
//! - `link`: `{"next": "<url>"}`, the `rel="next"` link of the last page (Okta keeps sending
//!   one, also on an empty page); none yet: the configured URL with the page size.
//! - `token`: `{"token": "<t>"}`, the token that fetches the next page. A page without a next
//!   token is the newest: the cursor stays where it was, so that page is asked for again (its
//!   events deduplicate) until a next token appears. Never back to the first page.
//! - `window`: `{"high_water": "<rfc3339>"}` between windows; within one,
//!   `{"high_water", "since", "until"}` and the next page's `"next"` link or `"token"`. A
//!   window is `[high_water - overlap, now - settle)`, its bounds cut to what `time_format`
//!   can say, so that the next window starts exactly where this one's `until` was sent.

use auditbridge_config::api_source::{CursorStyle, TimeFormat, Window};
use reqwest::Url;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The request to make, and for a window its bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub url: Url,
    /// `(since, until)` of the window being fetched.
    pub window: Option<(OffsetDateTime, OffsetDateTime)>,
}

/// What a page says about the next one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Next {
    /// `Link: <…>; rel="next"`, already checked to be on the source's origin.
    pub link: Option<Url>,
    /// The next-page token from the body, when the style reads one.
    pub token: Option<String>,
    pub items: usize,
}

/// The cursor a source starts with, saved when it is first registered (so a window's start
/// does not move with the time of a restart).
pub fn initial(style: &CursorStyle, now: OffsetDateTime) -> Option<Value> {
    match style {
        CursorStyle::Link | CursorStyle::Token { .. } => None,
        CursorStyle::Window(w) => {
            let start = cut(w.start.unwrap_or(now), w.time_format);
            Some(json!({"high_water": rfc3339(start)}))
        }
    }
}

/// The next request, or `None` when a window source has nothing settled to ask for yet.
pub fn plan(
    style: &CursorStyle,
    base: &Url,
    page_size: Option<(&str, usize)>,
    saved: Option<&Value>,
    now: OffsetDateTime,
) -> Result<Option<Plan>, String> {
    let first = || {
        let mut url = base.clone();
        if let Some((param, size)) = page_size {
            set_param(&mut url, param, &size.to_string());
        }
        url
    };
    match style {
        CursorStyle::Link => {
            let url = match saved.and_then(|c| c.get("next")).and_then(Value::as_str) {
                Some(next) => parse_saved(next)?,
                None => first(),
            };
            Ok(Some(Plan { url, window: None }))
        }
        CursorStyle::Token { param, .. } => {
            let mut url = first();
            if let Some(token) = saved.and_then(|c| c.get("token")).and_then(Value::as_str) {
                set_param(&mut url, param, token);
            }
            Ok(Some(Plan { url, window: None }))
        }
        CursorStyle::Window(w) => {
            let saved = saved.ok_or("a window cursor without its high water")?;
            let high_water =
                time_at(saved, "high_water")?.ok_or("a window cursor without its high water")?;
            if let (Some(since), Some(until)) = (time_at(saved, "since")?, time_at(saved, "until")?)
            {
                // Within a window: its next page.
                if let Some(next) = saved.get("next").and_then(Value::as_str) {
                    return Ok(Some(Plan {
                        url: parse_saved(next)?,
                        window: Some((since, until)),
                    }));
                }
                let mut url = window_url(first(), w, since, until);
                if let (Some((_, param)), Some(token)) =
                    (&w.token, saved.get("token").and_then(Value::as_str))
                {
                    set_param(&mut url, param, token);
                }
                return Ok(Some(Plan {
                    url,
                    window: Some((since, until)),
                }));
            }
            let since = cut(high_water - w.overlap, w.time_format);
            let until = cut(now - w.settle, w.time_format);
            if until <= high_water {
                return Ok(None);
            }
            Ok(Some(Plan {
                url: window_url(first(), w, since, until),
                window: Some((since, until)),
            }))
        }
    }
}

/// The cursor after an accounted-for page fetched by `plan`, and whether the source is
/// caught up (wait `interval` before asking again).
pub fn advance(
    style: &CursorStyle,
    saved: Option<&Value>,
    plan: &Plan,
    next: &Next,
    page_size: usize,
) -> (Option<Value>, bool) {
    match style {
        CursorStyle::Link => match &next.link {
            // A full page may have more behind it; a short one (Okta: also an empty one,
            // which still has a next link) is the newest for now.
            Some(link) => (Some(json!({"next": link.as_str()})), next.items < page_size),
            // No next link: ask for this page again later (its events deduplicate).
            None => (Some(json!({"next": plan.url.as_str()})), true),
        },
        CursorStyle::Token { .. } => {
            let current = saved.and_then(|c| c.get("token")).and_then(Value::as_str);
            match next.token.as_deref() {
                Some(t) if Some(t) != current => (Some(json!({"token": t})), false),
                // The newest page: stay, and ask for it again later.
                _ => (saved.cloned(), true),
            }
        }
        CursorStyle::Window(w) => {
            let Some((since, until)) = plan.window else {
                return (saved.cloned(), true);
            };
            let high_water = saved.and_then(|c| c.get("high_water")).cloned();
            let more = match (&next.link, &w.token, &next.token) {
                (Some(link), _, _) => Some(("next", link.as_str().to_owned())),
                (None, Some(_), Some(t)) => {
                    let current = saved.and_then(|c| c.get("token")).and_then(Value::as_str);
                    (Some(t.as_str()) != current).then(|| ("token", t.clone()))
                }
                _ => None,
            };
            match more {
                Some((key, value)) => (
                    Some(json!({
                        "high_water": high_water,
                        "since": rfc3339(since),
                        "until": rfc3339(until),
                        key: value,
                    })),
                    false,
                ),
                // The window is done: the next starts from its end (less the overlap).
                None => (Some(json!({"high_water": rfc3339(until)})), true),
            }
        }
    }
}

/// Ids remembered for a window's overlap older than this can be forgotten: no later window
/// reaches back that far.
pub fn forget_before(style: &CursorStyle, cursor: Option<&Value>) -> Option<OffsetDateTime> {
    let CursorStyle::Window(w) = style else {
        return None;
    };
    let high_water = time_at(cursor?, "high_water").ok()??;
    Some(high_water - w.overlap)
}

fn window_url(mut url: Url, w: &Window, since: OffsetDateTime, until: OffsetDateTime) -> Url {
    set_param(&mut url, &w.since_param, &format_time(since, w.time_format));
    set_param(&mut url, &w.until_param, &format_time(until, w.time_format));
    url
}

/// Sets one query parameter, replacing any of the same name the URL already has.
fn set_param(url: &mut Url, name: &str, value: &str) {
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != name)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut pairs = url.query_pairs_mut();
    pairs.clear();
    for (k, v) in &kept {
        pairs.append_pair(k, v);
    }
    pairs.append_pair(name, value);
}

fn parse_saved(text: &str) -> Result<Url, String> {
    Url::parse(text).map_err(|e| format!("the saved next link does not parse: {e}"))
}

fn time_at(cursor: &Value, key: &str) -> Result<Option<OffsetDateTime>, String> {
    match cursor.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => OffsetDateTime::parse(s, &Rfc3339)
            .map(Some)
            .map_err(|e| format!("the cursor's {key} {s:?}: {e}")),
        Some(other) => Err(format!("the cursor's {key} is {other}, not a time")),
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// `t` cut down to what `format` can say: whole seconds, or milliseconds.
fn cut(t: OffsetDateTime, format: TimeFormat) -> OffsetDateTime {
    let t = t.to_offset(time::UtcOffset::UTC);
    match format {
        TimeFormat::Unix => t.replace_nanosecond(0).unwrap_or(t),
        TimeFormat::Rfc3339 | TimeFormat::UnixMs => t
            .replace_nanosecond(t.nanosecond() / 1_000_000 * 1_000_000)
            .unwrap_or(t),
    }
}

fn format_time(t: OffsetDateTime, format: TimeFormat) -> String {
    match format {
        TimeFormat::Rfc3339 => rfc3339(t),
        TimeFormat::Unix => t.unix_timestamp().to_string(),
        TimeFormat::UnixMs => (t.unix_timestamp_nanos() / 1_000_000).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use time::macros::datetime;

    use super::*;

    fn window(token: bool) -> CursorStyle {
        CursorStyle::Window(Window {
            since_param: "since".into(),
            until_param: "until".into(),
            time_format: TimeFormat::Unix,
            overlap: Duration::from_secs(60),
            settle: Duration::from_secs(10),
            start: None,
            token: token.then(|| ("/next".into(), "page".into())),
        })
    }

    fn base() -> Url {
        Url::parse("https://api.example/logs?sortOrder=ASCENDING&limit=5").unwrap()
    }

    #[test]
    fn link_follows_next_and_stays_on_the_last_page() {
        let style = CursorStyle::Link;
        let p = plan(
            &style,
            &base(),
            Some(("limit", 100)),
            None,
            OffsetDateTime::now_utc(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            p.url.as_str(),
            "https://api.example/logs?sortOrder=ASCENDING&limit=100",
            "the page size replaces one in the URL"
        );
        let next = Url::parse("https://api.example/logs?after=abc").unwrap();
        let (c, caught_up) = advance(
            &style,
            None,
            &p,
            &Next {
                link: Some(next.clone()),
                token: None,
                items: 100,
            },
            100,
        );
        assert!(!caught_up, "a full page may have more behind it");
        let p2 = plan(
            &style,
            &base(),
            Some(("limit", 100)),
            c.as_ref(),
            OffsetDateTime::now_utc(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p2.url, next, "the saved link as it came");
        let (_, caught_up) = advance(
            &style,
            c.as_ref(),
            &p2,
            &Next {
                link: Some(next.clone()),
                token: None,
                items: 0,
            },
            100,
        );
        assert!(caught_up, "an empty page with a next link is the newest");
        let (c3, caught_up) = advance(&style, c.as_ref(), &p2, &Next::default(), 100);
        assert!(caught_up);
        assert_eq!(c3, Some(json!({"next": next.as_str()})));
    }

    #[test]
    fn token_never_goes_back_to_the_first_page() {
        let style = CursorStyle::Token {
            pointer: "/next".into(),
            param: "cursor".into(),
        };
        let now = OffsetDateTime::now_utc();
        let p = plan(&style, &base(), None, None, now).unwrap().unwrap();
        assert_eq!(p.url, base());
        let next = Next {
            token: Some("t1".into()),
            ..Next::default()
        };
        let (c, caught_up) = advance(&style, None, &p, &next, 5);
        assert_eq!(
            (c.clone(), caught_up),
            (Some(json!({"token": "t1"})), false)
        );
        let p = plan(&style, &base(), None, c.as_ref(), now)
            .unwrap()
            .unwrap();
        assert!(p.url.as_str().ends_with("&cursor=t1"), "{}", p.url);
        // The newest page has no next token: stay on t1.
        let (c2, caught_up) = advance(&style, c.as_ref(), &p, &Next::default(), 5);
        assert_eq!((c2, caught_up), (c.clone(), true));
        // An API that echoes the same token: caught up too.
        let (c3, caught_up) = advance(&style, c.as_ref(), &p, &next_of("t1"), 5);
        assert_eq!((c3, caught_up), (c, true));
    }

    fn next_of(t: &str) -> Next {
        Next {
            token: Some(t.into()),
            ..Next::default()
        }
    }

    #[test]
    fn windows_overlap_settle_and_page_within() {
        let style = window(true);
        let start = datetime!(2026-12-01 10:00:00.700 UTC);
        let c0 = initial(&style, start);
        assert_eq!(
            c0,
            Some(json!({"high_water": "2026-12-01T10:00:00Z"})),
            "cut to seconds"
        );
        let now = datetime!(2026-12-01 10:00:05 UTC);
        assert_eq!(
            plan(&style, &base(), None, c0.as_ref(), now).unwrap(),
            None,
            "nothing settled yet"
        );
        let now = datetime!(2026-12-01 10:02:00.9 UTC);
        let p = plan(&style, &base(), None, c0.as_ref(), now)
            .unwrap()
            .unwrap();
        let since = datetime!(2026-12-01 09:59:00 UTC);
        let until = datetime!(2026-12-01 10:01:50 UTC);
        assert_eq!(p.window, Some((since, until)));
        assert!(
            p.url.as_str().ends_with(&format!(
                "since={}&until={}",
                since.unix_timestamp(),
                until.unix_timestamp()
            )),
            "{}",
            p.url
        );
        // A token within the window: the same bounds, the token added.
        let (c1, caught_up) = advance(&style, c0.as_ref(), &p, &next_of("p2"), 5);
        assert!(!caught_up);
        let p2 = plan(
            &style,
            &base(),
            None,
            c1.as_ref(),
            now + Duration::from_secs(99),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            p2.window,
            Some((since, until)),
            "the window does not move mid-way"
        );
        assert!(p2.url.as_str().ends_with("&page=p2"), "{}", p2.url);
        // Done: the high water is the until that was sent.
        let (c2, caught_up) = advance(&style, c1.as_ref(), &p2, &Next::default(), 5);
        assert!(caught_up);
        assert_eq!(c2, Some(json!({"high_water": "2026-12-01T10:01:50Z"})));
        assert_eq!(
            forget_before(&style, c2.as_ref()),
            Some(datetime!(2026-12-01 10:00:50 UTC))
        );
    }
}
