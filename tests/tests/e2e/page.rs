//! The query page (`GET /`) in a real browser: Debian's Chromium, headless and driven by
//! chromedriver over WebDriver, loads the page
//! served by `auditbridge serve` on 127.0.0.1 with a tenant token, and the DOM it renders must
//! show that tenant's stored events (and none of another tenant's), the charts, and events
//! that arrive on the live tail while the page is open.

use std::time::Duration;

use anyhow::Context as _;
use auditbridge_tests::api::{ApiServer, Token};
use auditbridge_tests::{TestEnv, eventually};
use tokio::process::Command;

fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_tenants_events_charts_and_live_tail_in_chromium() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let _worker = env.spawn_worker("w", &[]).await?;
    let mut events = env.events(60);
    for (i, e) in events.iter_mut().enumerate() {
        e.tenant = if i % 2 == 0 { "acme" } else { "globex" }.into();
    }
    env.publish(&events).await?;
    env.wait_for_count(60, Duration::from_secs(60)).await?;
    // So that the page's tail (which starts "now") starts after them.
    env.wait_below_horizon(Duration::from_secs(60)).await?;
    let acme = Token::tenant("browser", "acme", &["read"]);
    let api = ApiServer::start(&env, &[&acme], &[]).await?;

    // Events that arrive while the page is open must reach its live tail.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut live = env.events(1_000);
    for e in &mut live {
        e.tenant = "acme".into();
    }
    let publisher = {
        let js = env.js.clone();
        let prefix = env.prefix.clone();
        let live = live.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            // Until the browser is done (at most 1,000 events, about 20 s).
            for chunk in live.chunks(10) {
                if stop.is_cancelled() {
                    break;
                }
                for e in chunk {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Nats-Msg-Id", e.message_id().as_str());
                    js.publish_with_headers(e.subject(&prefix), h, serde_json::to_vec(e)?.into())
                        .await?
                        .await?;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            anyhow::Ok(())
        })
    };

    // The real browser, driven over WebDriver (chromedriver, plain HTTP): load the page, then
    // wait, by condition, until the live tail shows new events.
    let browser = Browser::start(&env.tag).await?;
    let url = format!("{}#token={}&tenant=acme", api.url("/"), acme.token);
    browser.goto(&url).await?;
    let what = "five rows in the page's live tail";
    eventually(what, Duration::from_secs(45), async || {
        let n = browser
            .script("return document.querySelectorAll('#tail tr').length")
            .await?;
        anyhow::ensure!(
            n.as_u64().unwrap_or(0) >= 5,
            "the live tail shows {n} rows; status: {}",
            browser
                .script("return document.getElementById('status').textContent")
                .await?
        );
        Ok(())
    })
    .await?;
    let dom = browser
        .script("return document.documentElement.outerHTML")
        .await?
        .as_str()
        .unwrap_or_default()
        .to_owned();
    stop.cancel();
    publisher.await??;
    drop(browser);
    // The two tables' bodies, each up to its closing tag.
    let section = |marker: &str| -> String {
        let start = dom.find(marker).unwrap_or(dom.len());
        let rest = &dom[start..];
        rest[..rest.find("</tbody>").unwrap_or(rest.len())].to_owned()
    };
    let recent = section("id=\"recent\"");
    let tail = section("id=\"tail\"");
    let rows = |html: &str| html.matches("data-id=").count();
    let has = |html: &str, id: &uuid::Uuid| html.contains(&format!("data-id=\"{id}\""));
    let acme_ids: Vec<_> = events
        .iter()
        .chain(live.iter())
        .filter(|e| e.tenant == "acme")
        .map(|e| e.id)
        .collect();
    let globex_ids: Vec<_> = events
        .iter()
        .filter(|e| e.tenant == "globex")
        .map(|e| e.id)
        .collect();
    // The recent table: the newest stored events of the tenant, and only those.
    let shown = acme_ids.iter().filter(|id| has(&recent, id)).count();
    assert!(
        shown >= 30,
        "the recent table shows {shown} events: {recent}"
    );
    assert_eq!(
        shown,
        rows(&recent),
        "the recent table shows rows that are not acme's"
    );
    assert!(
        !globex_ids.iter().any(|id| has(&dom, id)),
        "another tenant's event is on the page"
    );
    assert!(dom.contains("<rect"), "no chart was drawn");
    // The live tail: events committed after the page opened it.
    let tailed = live.iter().filter(|e| has(&tail, &e.id)).count();
    assert!(
        tailed > 0,
        "the live tail showed none of the new events: {tail}"
    );
    assert_eq!(tailed, rows(&tail));
    Ok(())
}

/// chromedriver and the headless Chromium it starts, for one test.
struct Browser {
    driver: tokio::process::Child,
    base: String,
    session: String,
    http: reqwest::Client,
    profile: std::path::PathBuf,
}

impl Browser {
    async fn start(tag: &str) -> anyhow::Result<Browser> {
        let port = auditbridge_tests::free_addr()?.port();
        let driver = Command::new(
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into()),
        )
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting chromedriver (Debian package chromium-driver)")?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        eventually(
            "chromedriver to start",
            Duration::from_secs(20),
            async || {
                http.get(format!("{base}/status")).send().await?;
                Ok(())
            },
        )
        .await?;
        let profile = std::env::temp_dir().join(format!("ab-chromium-{tag}"));
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let resp: serde_json::Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await?
            .json()
            .await?;
        let session = resp["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no WebDriver session: {resp}"))?
            .to_owned();
        Ok(Browser {
            driver,
            base,
            session,
            http,
            profile,
        })
    }

    async fn goto(&self, url: &str) -> anyhow::Result<()> {
        let resp: serde_json::Value = self
            .http
            .post(format!("{}/session/{}/url", self.base, self.session))
            .json(&serde_json::json!({ "url": url }))
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(resp["value"].is_null(), "navigation failed: {resp}");
        Ok(())
    }

    async fn script(&self, script: &str) -> anyhow::Result<serde_json::Value> {
        let resp: serde_json::Value = self
            .http
            .post(format!(
                "{}/session/{}/execute/sync",
                self.base, self.session
            ))
            .json(&serde_json::json!({ "script": script, "args": [] }))
            .send()
            .await?
            .json()
            .await?;
        Ok(resp["value"].clone())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let http = self.http.clone();
        auditbridge_tests::run_cleanup(async move {
            let _ = http.delete(url).send().await;
        });
        let _ = self.driver.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
