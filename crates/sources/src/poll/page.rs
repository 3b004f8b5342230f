//! A page as the API sent it: the items at `items`, the next token at `token_pointer`, the
//! `rel="next"` link. The page is walked without building it whole: the envelope is read as
//! raw JSON along the pointers only, and each item is parsed on its own, so one item that
//! cannot be read (nested too deep, not UTF-8) is that item's problem, kept as a reject,
//! and never holds the page or the source.

use std::collections::HashMap;

use reqwest::Url;
use reqwest::header::{HeaderMap, LINK};
use serde_json::value::RawValue;

/// The longest next link or token kept in a cursor.
const MAX_CURSOR_TEXT: usize = 8 * 1024;

/// Why a page cannot be used at all (the cursor does not move; retried with backoff).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct PageError {
    /// `malformed` or `foreign_link`.
    pub kind: &'static str,
    pub detail: String,
}

fn malformed(detail: impl Into<String>) -> PageError {
    PageError {
        kind: "malformed",
        detail: detail.into(),
    }
}

/// One item of a page, as raw JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub text: String,
    /// The page was not UTF-8 and this item holds a replacement character: it is kept as a
    /// reject rather than mapped with bytes the API did not send.
    pub damaged: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    pub items: Vec<Item>,
    pub link: Option<Url>,
    pub token: Option<String>,
}

/// Reads a page. `origin` is the configured URL: a next link elsewhere is refused (it would
/// carry the source's credentials to another host).
pub fn parse(
    body: &[u8],
    headers: &HeaderMap,
    request: &Url,
    origin: &Url,
    items: &str,
    token: Option<&str>,
) -> Result<Page, PageError> {
    let (text, lossy) = match std::str::from_utf8(body) {
        Ok(t) => (std::borrow::Cow::Borrowed(t), false),
        Err(_) => (String::from_utf8_lossy(body), true),
    };
    let root: &RawValue =
        serde_json::from_str(&text).map_err(|e| malformed(format!("the page is not JSON: {e}")))?;
    let list = match at(root, items)? {
        Some(v) => v,
        None => {
            return Err(malformed(format!(
                "nothing at params.items {items:?} in the page"
            )));
        }
    };
    let raw_items: Vec<&RawValue> = serde_json::from_str(list.get()).map_err(|_| {
        malformed(format!(
            "params.items {items:?} is not an array in the page (it starts {:?})",
            list.get().chars().take(40).collect::<String>()
        ))
    })?;
    let items = raw_items
        .into_iter()
        .map(|r| Item {
            text: r.get().to_owned(),
            damaged: lossy && r.get().contains('\u{FFFD}'),
        })
        .collect();
    let token = match token {
        None => None,
        Some(pointer) => next_token(root, pointer)?,
    };
    let link = next_link(headers, request, origin)?;
    Ok(Page { items, link, token })
}

/// The value at an RFC 6901 pointer, walking raw JSON (`""`: the whole).
fn at<'a>(root: &'a RawValue, pointer: &str) -> Result<Option<&'a RawValue>, PageError> {
    if pointer.is_empty() {
        return Ok(Some(root));
    }
    let mut here = root;
    for token in pointer.split('/').skip(1) {
        let key = token.replace("~1", "/").replace("~0", "~");
        let text = here.get().trim_start();
        here = if text.starts_with('{') {
            let map: HashMap<String, &RawValue> = serde_json::from_str(here.get())
                .map_err(|e| malformed(format!("the page is not JSON: {e}")))?;
            match map.get(&key) {
                Some(v) => v,
                None => return Ok(None),
            }
        } else if text.starts_with('[') {
            let list: Vec<&RawValue> = serde_json::from_str(here.get())
                .map_err(|e| malformed(format!("the page is not JSON: {e}")))?;
            match key.parse::<usize>().ok().and_then(|i| list.get(i)) {
                Some(v) => v,
                None => return Ok(None),
            }
        } else {
            return Ok(None);
        };
    }
    Ok(Some(here))
}

/// The next-page token: a string or a number; absent, null or empty is none.
fn next_token(root: &RawValue, pointer: &str) -> Result<Option<String>, PageError> {
    let Some(raw) = at(root, pointer)? else {
        return Ok(None);
    };
    let value: serde_json::Value = serde_json::from_str(raw.get())
        .map_err(|_| malformed(format!("the next token at {pointer} cannot be read")))?;
    let token = match value {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::String(s) => s,
        serde_json::Value::Number(n) => n.to_string(),
        other => {
            return Err(malformed(format!(
                "the next token at {pointer} is {}, not a string",
                kind_of(&other)
            )));
        }
    };
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() > MAX_CURSOR_TEXT {
        return Err(malformed(format!(
            "the next token at {pointer} is {} bytes, more than {MAX_CURSOR_TEXT}",
            token.len()
        )));
    }
    Ok(Some(token))
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
        _ => "a value",
    }
}

/// The `rel="next"` target of the `Link` headers (RFC 8288), resolved against the request's
/// URL; refused when it leaves the configured URL's origin.
fn next_link(headers: &HeaderMap, request: &Url, origin: &Url) -> Result<Option<Url>, PageError> {
    for value in headers.get_all(LINK) {
        let Ok(value) = value.to_str() else {
            return Err(malformed("a Link header that is not ASCII"));
        };
        for (target, params) in links(value) {
            let next = params.iter().any(|(k, v)| {
                k.eq_ignore_ascii_case("rel")
                    && v.split_ascii_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            });
            if !next {
                continue;
            }
            let url = request
                .join(target)
                .map_err(|e| malformed(format!("the next link {target:?} does not parse: {e}")))?;
            if url.origin() != origin.origin() {
                return Err(PageError {
                    kind: "foreign_link",
                    detail: format!(
                        "the next link points to {}, not to the configured URL's origin {}: not followed (it would carry the source's credentials there)",
                        crate::poll::shown_url(&url),
                        origin.origin().ascii_serialization()
                    ),
                });
            }
            if url.as_str().len() > MAX_CURSOR_TEXT {
                return Err(malformed(format!(
                    "the next link is {} bytes, more than {MAX_CURSOR_TEXT}",
                    url.as_str().len()
                )));
            }
            return Ok(Some(url));
        }
    }
    Ok(None)
}

/// The links of one `Link` header value: `<target>; key=value; key="quoted", <…>`.
fn links(value: &str) -> Vec<(&str, Vec<(String, String)>)> {
    let mut out = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        let Some(open) = rest.strip_prefix('<') else {
            break;
        };
        let Some(close) = open.find('>') else { break };
        let target = &open[..close];
        rest = &open[close + 1..];
        let mut params = Vec::new();
        loop {
            rest = rest.trim_start_matches([' ', '\t']);
            let Some(after) = rest.strip_prefix(';') else {
                break;
            };
            rest = after.trim_start_matches([' ', '\t']);
            let end = rest.find(['=', ';', ',']).unwrap_or(rest.len());
            let key = rest[..end].trim().to_owned();
            rest = &rest[end..];
            let mut val = String::new();
            if let Some(after) = rest.strip_prefix('=') {
                rest = after.trim_start_matches([' ', '\t']);
                if let Some(q) = rest.strip_prefix('"') {
                    let mut chars = q.char_indices();
                    let mut end = q.len();
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => {
                                if let Some((_, e)) = chars.next() {
                                    val.push(e);
                                }
                            }
                            '"' => {
                                end = i + 1;
                                break;
                            }
                            c => val.push(c),
                        }
                    }
                    rest = &q[end.min(q.len())..];
                } else {
                    let end = rest.find([';', ',']).unwrap_or(rest.len());
                    val = rest[..end].trim().to_owned();
                    rest = &rest[end..];
                }
            }
            params.push((key, val));
        }
        out.push((target, params));
    }
    out
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn with_link(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append(LINK, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn okta_links_relative_links_and_foreign_ones() {
        let base = url("https://acme.okta.com/api/v1/logs?since=x");
        let h = with_link(
            r#"<https://acme.okta.com/api/v1/logs?since=x&limit=2>; rel="self", <https://acme.okta.com/api/v1/logs?after=123&limit=2>; rel="next""#,
        );
        let p = parse(b"[]", &h, &base, &base, "", None).unwrap();
        assert_eq!(
            p.link.unwrap().as_str(),
            "https://acme.okta.com/api/v1/logs?after=123&limit=2"
        );
        let h = with_link(r#"</api/v1/logs?after=9>; rel="prev next""#);
        let p = parse(b"[]", &h, &base, &base, "", None).unwrap();
        assert_eq!(
            p.link.unwrap().as_str(),
            "https://acme.okta.com/api/v1/logs?after=9"
        );
        for foreign in [
            "<https://evil.example/logs>; rel=next",
            "<http://acme.okta.com/api/v1/logs>; rel=next",
            "<https://acme.okta.com:8443/x>; rel=next",
            "<//evil.example/x>; rel=next",
        ] {
            let e = parse(b"[]", &with_link(foreign), &base, &base, "", None).unwrap_err();
            assert_eq!(e.kind, "foreign_link", "{foreign}");
        }
    }

    #[test]
    fn items_and_tokens_by_pointer() {
        let base = url("https://api.example/audit");
        let body = br#"{"data": {"events": [{"id": 1}, {"id": 2}]}, "meta": {"next": "abc"}}"#;
        let p = parse(
            body,
            &HeaderMap::new(),
            &base,
            &base,
            "/data/events",
            Some("/meta/next"),
        )
        .unwrap();
        assert_eq!(p.items.len(), 2);
        assert_eq!(p.items[1].text, r#"{"id": 2}"#);
        assert_eq!(p.token.as_deref(), Some("abc"));
        let none = br#"{"data": {"events": []}, "meta": {"next": null}}"#;
        let p = parse(
            none,
            &HeaderMap::new(),
            &base,
            &base,
            "/data/events",
            Some("/meta/next"),
        )
        .unwrap();
        assert_eq!((p.items.len(), p.token), (0, None));
        for (bad, why) in [
            (&b"{"[..], "not JSON"),
            (br#"{"data": 3}"#, "nothing at"),
            (br#"{"data": {"events": {}}}"#, "not an array"),
        ] {
            let e = parse(bad, &HeaderMap::new(), &base, &base, "/data/events", None).unwrap_err();
            assert!(e.detail.contains(why), "{e}");
        }
    }

    #[test]
    fn one_unreadable_item_does_not_spoil_the_page() {
        let base = url("https://api.example/audit");
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let body = format!(r#"[{{"id": 1}}, {deep}, {{"id": 3}}]"#);
        let p = parse(body.as_bytes(), &HeaderMap::new(), &base, &base, "", None).unwrap();
        assert_eq!(p.items.len(), 3);
        assert!(serde_json::from_str::<serde_json::Value>(&p.items[1].text).is_err());
        // Not UTF-8 inside one item: that item is marked, the others are not.
        let mut body = br#"[{"id": 1}, {"id": "x"#.to_vec();
        body.push(0xff);
        body.extend_from_slice(br#""}]"#);
        let p = parse(&body, &HeaderMap::new(), &base, &base, "", None).unwrap();
        assert_eq!(
            p.items.iter().map(|i| i.damaged).collect::<Vec<_>>(),
            [false, true]
        );
    }
}
