//! `auditbridge dead-letters list|show` (issue 13) against the real services: what ingest
//! refused is listed and shown with its exact bytes, escaped for the terminal.

use std::time::Duration;

use auditbridge_tests::TestEnv;
use base64::Engine as _;

const T: Duration = Duration::from_secs(60);

async fn run(env: &TestEnv, args: &[&str]) -> anyhow::Result<(Option<i32>, String)> {
    env.run(args, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_shown_exactly_and_escaped() -> anyhow::Result<()> {
    let mut env = TestEnv::new().await?;
    env.ensure_stream().await?;
    let good = env.events(3);
    // Not JSON, with a terminal escape sequence and a byte that is not UTF-8.
    let hostile = b"\x1b[2J\x1b]0;owned\x07 not json \xff".to_vec();
    env.publish_raw(&good[0].subject(&env.prefix), hostile.clone(), None)
        .await?
        .await?;
    let mut wrong = serde_json::to_value(&good[1])?;
    wrong["outcome"] = "maybe".into();
    env.publish_raw(
        &good[1].subject(&env.prefix),
        serde_json::to_vec(&wrong)?,
        None,
    )
    .await?
    .await?;
    env.publish(&good).await?;
    let worker = env.spawn_worker("w", &[]).await?;
    env.wait_for_count(3, T).await?;
    env.wait_for_drained(T).await?;
    drop(worker);

    let (code, listed) = run(&env, &["dead-letters", "list", "--json"]).await?;
    assert_eq!(code, Some(0), "{listed}");
    let list: serde_json::Value = serde_json::from_str(&listed)?;
    let list = list.as_array().expect("an array");
    assert_eq!(list.len(), 2, "{listed}");
    let kinds: Vec<&str> = list.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert!(
        kinds.contains(&"not_json") && kinds.contains(&"schema"),
        "{kinds:?}"
    );
    let (_, only) = run(
        &env,
        &["dead-letters", "list", "--kind", "not_json", "--json"],
    )
    .await?;
    let only: serde_json::Value = serde_json::from_str(&only)?;
    assert_eq!(only.as_array().map(Vec::len), Some(1));
    let id = only[0]["id"].as_i64().unwrap().to_string();
    let (_, none) = run(
        &env,
        &["dead-letters", "list", "--since", "2999-01-01T00:00:00Z"],
    )
    .await?;
    assert!(none.contains("no dead letters"), "{none}");

    // Shown as text: every byte accounted for, none that a terminal would act on.
    let out = env
        .command(&["dead-letters", "show", &id], &[])
        .output()
        .await?;
    assert!(out.status.success());
    assert!(
        !out.stdout.contains(&0x1b) && !out.stdout.contains(&0x07),
        "a raw control byte reached the terminal"
    );
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("\\x1b[2J\\x1b]0;owned\\x07 not json \\xff"),
        "{text}"
    );
    assert!(text.contains("(not UTF-8)"), "{text}");
    assert!(text.contains("kind        not_json"), "{text}");
    // As JSON: the exact bytes.
    let (_, shown) = run(&env, &["dead-letters", "show", &id, "--json"]).await?;
    let shown: serde_json::Value = serde_json::from_str(&shown)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(shown["payload_base64"].as_str().unwrap())?;
    assert_eq!(bytes, hostile);
    assert_eq!(shown["stream"], env.stream.as_str());
    let (code, missing) = run(&env, &["dead-letters", "show", "999999"]).await?;
    assert_eq!(code, Some(1), "{missing}");
    assert!(missing.contains("no dead letter #999999"), "{missing}");
    Ok(())
}
