//! The RabbitMQ and HTTP sinks of `auditbridge-destinations` on their own, through the
//! crate's public API: RabbitMQ against the real broker on 127.0.0.1:5672 (guest/guest; each
//! test declares its own exchange and queue with random names and deletes them), HTTP against
//! a scripted receiver each test starts on 127.0.0.1:0. No worker, no database: what reaches
//! a destination end to end through the relay is `forwarding.rs`'s business.
//!
//! Self-contained (its own fixtures), so that it can become a module of one test binary as
//! it is.

/// `RabbitSink`: confirms, returns, refusals, reconnects and message layout, on a real broker.
mod rabbitmq {
    use std::collections::{HashMap, HashSet};
    use std::time::Duration;

    use auditbridge_destinations::rabbitmq::testing::{self, Answer, Message};
    use auditbridge_destinations::rabbitmq::{RabbitMode, RabbitParams, RabbitSink};
    use auditbridge_destinations::{Delivered, DeliveryError, OutEvent};
    use lapin::message::BasicGetMessage;
    use lapin::options::{
        BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    use lapin::{
        Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm,
    };
    use time::OffsetDateTime;
    use tokio::time::Instant;
    use uuid::Uuid;

    const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    /// A topic exchange of its own (and, when bound, a queue that takes everything), set up by
    /// the test the way an operator would.
    struct Broker {
        _connection: Connection,
        channel: Channel,
        exchange: String,
        queue: String,
    }

    impl Broker {
        async fn new(bound: bool) -> Broker {
            let suffix = Uuid::new_v4();
            Broker::declare(
                format!("test.ab.{suffix}"),
                format!("test.ab.{suffix}"),
                bound,
            )
            .await
        }

        async fn declare(exchange: String, queue: String, bound: bool) -> Broker {
            let connection = Connection::connect(URL, ConnectionProperties::default())
                .await
                .unwrap();
            let channel = connection.create_channel().await.unwrap();
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            if bound {
                let options = QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                };
                channel
                    .queue_declare(queue.as_str().into(), options, expiring())
                    .await
                    .unwrap();
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        "#".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap();
            }
            Broker {
                _connection: connection,
                channel,
                exchange,
                queue,
            }
        }

        fn params(&self, mode: RabbitMode) -> RabbitParams {
            params(&self.exchange, mode)
        }

        /// Takes `want` messages off the queue, giving up after 10 s; then checks none is left.
        async fn take(&self, want: usize) -> Vec<BasicGetMessage> {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut got = Vec::with_capacity(want);
            while got.len() < want && Instant::now() < deadline {
                match self.get().await {
                    Some(m) => got.push(m),
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            assert_eq!(got.len(), want, "messages on queue {}", self.queue);
            assert!(
                self.get().await.is_none(),
                "more than {want} messages on queue {}",
                self.queue
            );
            got
        }

        async fn get(&self) -> Option<BasicGetMessage> {
            self.channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
        }

        async fn queued(&self) -> u32 {
            let options = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let queue = self
                .channel
                .queue_declare(self.queue.as_str().into(), options, FieldTable::default())
                .await
                .unwrap();
            queue.message_count()
        }

        async fn delete(self) {
            let _ = self
                .channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            self.channel
                .exchange_delete(
                    self.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await
                .unwrap();
        }
    }

    /// Queue arguments that let the broker remove a queue a failed test left behind.
    fn expiring() -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(600_000));
        arguments
    }

    fn params(exchange: &str, mode: RabbitMode) -> RabbitParams {
        RabbitParams {
            url: URL.into(),
            exchange: exchange.into(),
            routing_key: "audit.{tenant}.{action}.{outcome}.{source}".into(),
            mandatory: true,
            mode,
            confirm_timeout: Duration::from_secs(10),
            max_in_flight: 1000,
            max_batch_bytes: 1024 * 1024,
        }
    }

    fn event(n: usize) -> OutEvent {
        let tenant = if n.is_multiple_of(2) {
            "acme"
        } else {
            "globex"
        };
        let outcome = if n.is_multiple_of(3) {
            "denied"
        } else {
            "success"
        };
        event_for(n, tenant, "document.update", outcome)
    }

    fn event_for(n: usize, tenant: &str, action: &str, outcome: &str) -> OutEvent {
        let id = Uuid::new_v4();
        OutEvent {
            id,
            tenant: tenant.into(),
            action: action.into(),
            outcome: outcome.into(),
            source: "docs-api".into(),
            received_at: OffsetDateTime::now_utc(),
            json: serde_json::json!({"id": id, "tenant": tenant, "action": action, "outcome": outcome, "n": n})
                .to_string(),
        }
    }

    /// Declares a queue of the broker's name bound to its exchange with `binding` only.
    async fn bind_only(broker: &Broker, binding: &str) {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        broker
            .channel
            .queue_declare(broker.queue.as_str().into(), options, expiring())
            .await
            .unwrap();
        broker
            .channel
            .queue_bind(
                broker.queue.as_str().into(),
                broker.exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    fn body_ids(m: &BasicGetMessage) -> Vec<Uuid> {
        String::from_utf8_lossy(&m.data)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    /// The ids of the events `messages` carry, in order: each message's id in event mode, the
    /// ids in each NDJSON body in batch mode.
    fn event_ids(mode: &RabbitMode, messages: &[BasicGetMessage]) -> Vec<Uuid> {
        match mode {
            RabbitMode::Batch => messages.iter().flat_map(body_ids).collect(),
            RabbitMode::Event => messages
                .iter()
                .map(|m| {
                    m.properties
                        .message_id()
                        .as_ref()
                        .expect("message_id")
                        .as_str()
                        .parse()
                        .unwrap()
                })
                .collect(),
        }
    }

    fn header<'a>(m: &'a BasicGetMessage, key: &str) -> &'a AMQPValue {
        let headers = m.properties.headers().as_ref().expect("headers");
        headers
            .inner()
            .get(key)
            .unwrap_or_else(|| panic!("header {key} missing"))
    }

    fn retry_reason(result: Result<Delivered, DeliveryError>) -> (&'static str, String) {
        match result {
            Err(DeliveryError::Retry { reason, detail, .. }) => (reason, detail),
            other => panic!("expected a Retry error, got {other:?}"),
        }
    }

    fn refused_reason(result: Result<Delivered, DeliveryError>) -> (&'static str, String) {
        match result {
            Err(DeliveryError::Refused { reason, detail }) => (reason, detail),
            other => panic!("expected a Refused error, got {other:?}"),
        }
    }

    /// Runs `rabbitmqctl` on the local broker; its standard output.
    fn rabbitmqctl(args: &[&str]) -> String {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .expect("rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The broker's `max_message_size` (read only: it is global, and tests run in parallel).
    fn max_message_size() -> usize {
        let out = rabbitmqctl(&["eval", "application:get_env(rabbit, max_message_size)."]);
        // `{ok,134217728}`
        out.trim()
            .strip_prefix("{ok,")
            .and_then(|rest| rest.strip_suffix('}'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no max_message_size in {out:?}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn event_mode_publishes_one_persistent_message_per_event() {
        let broker = Broker::new(true).await;
        let mut sink = RabbitSink::new("bus", broker.params(RabbitMode::Event));
        let events: Vec<OutEvent> = (0..12).map(event).collect();

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(12)
        );
        assert!(sink.is_connected());

        let by_id: HashMap<String, &OutEvent> =
            events.iter().map(|e| (e.id.to_string(), e)).collect();
        let messages = broker.take(12).await;
        let mut seen = HashSet::new();
        for m in &messages {
            let id = m
                .properties
                .message_id()
                .as_ref()
                .expect("message_id")
                .to_string();
            let e = by_id[&id];
            assert!(seen.insert(id.clone()), "{id} arrived twice");
            assert_eq!(m.data, e.json.as_bytes());
            assert_eq!(
                m.routing_key.as_str(),
                format!("audit.{}.document.update.{}.docs-api", e.tenant, e.outcome)
            );
            assert_eq!(*m.properties.delivery_mode(), Some(2));
            assert_eq!(
                m.properties
                    .content_type()
                    .as_ref()
                    .map(ShortString::as_str),
                Some("application/json")
            );
            assert_eq!(
                *m.properties.timestamp(),
                Some(e.received_at.unix_timestamp() as u64)
            );
            assert_eq!(
                header(m, "tenant"),
                &AMQPValue::LongString(e.tenant.as_str().into())
            );
            assert_eq!(
                header(m, "action"),
                &AMQPValue::LongString("document.update".into())
            );
            assert_eq!(
                header(m, "outcome"),
                &AMQPValue::LongString(e.outcome.as_str().into())
            );
        }
        let order: Vec<&str> = messages
            .iter()
            .map(|m| m.properties.message_id().as_ref().unwrap().as_str())
            .collect();
        let want: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(order, want, "messages arrive in the order given");
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_mode_publishes_one_ndjson_message_per_run() {
        let broker = Broker::new(true).await;
        let mut sink = RabbitSink::new("bus", broker.params(RabbitMode::Batch));
        let events: Vec<OutEvent> = (1..=7)
            .map(|n| event_for(n, "globex", "document.update", "success"))
            .collect();

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(7)
        );

        let messages = broker.take(1).await;
        let m = &messages[0];
        let body = String::from_utf8(m.data.clone()).unwrap();
        let want: String = events.iter().map(|e| format!("{}\n", e.json)).collect();
        assert_eq!(body, want);
        let ids: Vec<String> = body
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            ids,
            events.iter().map(|e| e.id.to_string()).collect::<Vec<_>>()
        );
        assert_eq!(
            m.properties.message_id().as_ref().unwrap().as_str(),
            events[0].id.to_string()
        );
        assert_eq!(
            m.properties
                .content_type()
                .as_ref()
                .map(ShortString::as_str),
            Some("application/x-ndjson")
        );
        assert_eq!(*m.properties.delivery_mode(), Some(2));
        assert_eq!(header(m, "count"), &AMQPValue::LongLongInt(7));
        assert_eq!(header(m, "tenant"), &AMQPValue::LongString("globex".into()));
        assert_eq!(
            m.routing_key.as_str(),
            "audit.globex.document.update.success.docs-api"
        );
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_messages_never_mix_routing_keys_or_tenants() {
        let broker = Broker::new(true).await;
        let mut params = broker.params(RabbitMode::Batch);
        // Without {tenant} in the key, the tenant still splits runs (and is a header).
        params.routing_key = "{action}".into();
        let mut sink = RabbitSink::new("bus", params);
        let spec = [
            ("acme", "a.x"),
            ("acme", "a.x"),
            ("globex", "a.x"),
            ("acme", "a.x"),
            ("acme", "b.y"),
            ("acme", "b.y"),
        ];
        let events: Vec<OutEvent> = spec
            .iter()
            .enumerate()
            .map(|(n, (t, a))| event_for(n, t, a, "success"))
            .collect();

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(6)
        );

        let messages = broker.take(4).await;
        let runs: Vec<(String, AMQPValue, Vec<Uuid>)> = messages
            .iter()
            .map(|m| {
                (
                    m.routing_key.to_string(),
                    header(m, "tenant").clone(),
                    body_ids(m),
                )
            })
            .collect();
        let ids = |r: std::ops::Range<usize>| events[r].iter().map(|e| e.id).collect::<Vec<_>>();
        let tenant = |t: &str| AMQPValue::LongString(t.into());
        assert_eq!(
            runs,
            vec![
                ("a.x".into(), tenant("acme"), ids(0..2)),
                ("a.x".into(), tenant("globex"), ids(2..3)),
                ("a.x".into(), tenant("acme"), ids(3..4)),
                ("b.y".into(), tenant("acme"), ids(4..6)),
            ]
        );
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_messages_are_cut_at_max_batch_bytes_but_a_lone_oversized_event_still_goes() {
        let broker = Broker::new(true).await;
        let mut params = broker.params(RabbitMode::Batch);
        // Three 200-byte events take 3 × 201 = 603 bytes, an exact fit; four would take 804.
        params.max_batch_bytes = 603;
        let mut sink = RabbitSink::new("bus", params);
        let same = |n| padded(event_for(n, "acme", "a", "success"), 200);
        let events = vec![
            same(0),
            same(1),
            same(2),
            same(3),
            // Larger than the bound on its own: it goes alone, and cuts the run around it.
            padded(event_for(4, "acme", "a", "success"), 2000),
            same(5),
            same(6),
        ];
        assert!(
            events
                .iter()
                .all(|e| e.json.len() == 200 || e.json.len() == 2000)
        );

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(7)
        );

        let messages = broker.take(4).await;
        let ids = |r: std::ops::Range<usize>| events[r].iter().map(|e| e.id).collect::<Vec<_>>();
        let got: Vec<(Vec<Uuid>, usize, AMQPValue)> = messages
            .iter()
            .map(|m| (body_ids(m), m.data.len(), header(m, "count").clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (ids(0..3), 603, AMQPValue::LongLongInt(3)),
                (ids(3..4), 201, AMQPValue::LongLongInt(1)),
                (ids(4..5), 2001, AMQPValue::LongLongInt(1)),
                (ids(5..7), 402, AMQPValue::LongLongInt(2)),
            ]
        );
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queue_bound_to_one_tenant_gets_only_its_events_and_returns_are_undeliverable() {
        for mode in [RabbitMode::Batch, RabbitMode::Event] {
            let broker = Broker::new(false).await;
            bind_only(&broker, "acme.#").await;
            let mut params = broker.params(mode.clone());
            params.routing_key = "{tenant}.{action}".into();
            let mut sink = RabbitSink::new("bus", params);
            let tenants = ["acme", "globex", "globex", "acme", "initech", "acme"];
            let events: Vec<OutEvent> = tenants
                .iter()
                .enumerate()
                .map(|(n, t)| event_for(n, t, "document.update", "success"))
                .collect();

            let got = sink.deliver(&events).await.unwrap();

            assert_eq!(got.settled, 6, "{mode:?}: {got:?}");
            let refused: Vec<usize> = got.undeliverable.iter().map(|u| u.index).collect();
            assert_eq!(refused, [1, 2, 4], "{mode:?}");
            assert!(got.undeliverable.iter().all(|u| u.reason == "returned"));
            assert!(
                got.undeliverable[0]
                    .detail
                    .contains("globex.document.update")
                    && got.undeliverable[0].detail.contains("NO_ROUTE"),
                "{}",
                got.undeliverable[0].detail
            );
            // A return is an answer, not a failure: the connection stays.
            assert!(sink.is_connected());
            let want: Vec<Uuid> = [0, 3, 5].iter().map(|&i| events[i].id).collect();
            let queued = event_ids(&mode, &broker.take(3).await);
            assert_eq!(queued, want, "{mode:?}");
            broker.delete().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_whose_routing_key_is_too_long_is_undeliverable_and_the_rest_go() {
        for mode in [RabbitMode::Event, RabbitMode::Batch] {
            let broker = Broker::new(true).await;
            let mut params = broker.params(mode.clone());
            params.routing_key = "{tenant}.{action}".into();
            let mut sink = RabbitSink::new("bus", params);
            // Five 60-character tokens: a valid action, a 300-byte routing key.
            let long = vec!["x".repeat(60); 5].join(".");
            let events = vec![
                event_for(0, "acme", "a", "success"),
                event_for(1, "acme", &long, "success"),
                event_for(2, "acme", "a", "success"),
            ];

            // The call ends at the event: settled up to and including it, nothing after it.
            let got = sink.deliver(&events).await.unwrap();
            assert_eq!(got.settled, 2, "{mode:?}");
            assert_eq!(got.undeliverable.len(), 1);
            assert_eq!(got.undeliverable[0].index, 1);
            assert_eq!(got.undeliverable[0].reason, "routing_key");
            assert!(
                got.undeliverable[0]
                    .detail
                    .contains(&events[1].id.to_string()),
                "{}",
                got.undeliverable[0].detail
            );
            assert_eq!(
                sink.deliver(&events[2..]).await.unwrap(),
                Delivered::confirmed(1)
            );
            let ids = event_ids(&mode, &broker.take(2).await);
            assert_eq!(ids, [events[0].id, events[2].id], "{mode:?}");
            broker.delete().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unroutable_mandatory_message_is_undeliverable() {
        let broker = Broker::new(false).await;
        let mut params = broker.params(RabbitMode::Event);
        params.routing_key = "{tenant}.{action}".into();
        let mut sink = RabbitSink::new("bus", params.clone());
        let events: Vec<OutEvent> = (0..3).map(event).collect();

        let got = sink.deliver(&events).await.unwrap();
        assert_eq!(got.settled, 3);
        assert_eq!(got.confirmed_count(), 0);
        let detail = &got.undeliverable[0].detail;
        assert_eq!(got.undeliverable[0].reason, "returned");
        assert!(
            detail.contains("acme.document.update") && detail.contains("NO_ROUTE"),
            "{detail}"
        );

        // Without `mandatory` the broker drops unroutable messages and confirms them.
        params.mandatory = false;
        let mut sink = RabbitSink::new("bus", params);
        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(3)
        );
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_closed_by_the_broker_is_replaced_on_the_next_call() {
        let broker = Broker::new(true).await;
        let name = format!("closed-{}", Uuid::new_v4());
        let mut sink = RabbitSink::new(&name, broker.params(RabbitMode::Event));
        let first: Vec<OutEvent> = (0..3).map(event).collect();
        assert_eq!(sink.deliver(&first).await.unwrap(), Delivered::confirmed(3));

        // Only this sink's connection is closed, by the broker (as `stop_app` does to all).
        // Tab-separated: the Erlang pid (as `close_connection` wants it), then the properties.
        let listing = rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"]);
        let pid = listing
            .lines()
            .find(|line| line.contains(&name))
            .and_then(|line| line.split('\t').next())
            .unwrap_or_else(|| panic!("no connection named {name} in {listing}"));
        rabbitmqctl(&["close_connection", pid, "test"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.is_connected() {
            assert!(
                Instant::now() < deadline,
                "the sink did not notice the closed connection"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let second: Vec<OutEvent> = (0..3).map(event).collect();
        assert_eq!(
            sink.deliver(&second).await.unwrap(),
            Delivered::confirmed(3)
        );
        assert!(sink.is_connected());
        let ids: Vec<String> = broker
            .take(6)
            .await
            .iter()
            .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
            .collect();
        let want: Vec<String> = first
            .iter()
            .chain(&second)
            .map(|e| e.id.to_string())
            .collect();
        assert_eq!(ids, want);
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_nack_is_a_failure() {
        // A full queue with `reject-publish` overflow makes the broker nack further publishes.
        let broker = Broker::new(false).await;
        let mut arguments = expiring();
        arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        let queue = broker.queue.as_str();
        broker
            .channel
            .queue_declare(queue.into(), QueueDeclareOptions::default(), arguments)
            .await
            .unwrap();
        broker
            .channel
            .queue_bind(
                queue.into(),
                broker.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut sink = RabbitSink::new("bus", broker.params(RabbitMode::Event));
        let events: Vec<OutEvent> = (0..3).map(event).collect();

        // Nothing of a window with a nack counts (a return may ride on any of its confirms).
        let (reason, detail) = retry_reason(sink.deliver(&events).await);
        assert_eq!(reason, "nack");
        assert!(detail.contains(&events[1].id.to_string()), "{detail}");
        assert!(!sink.is_connected());
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_exchange_fails_the_channel_and_the_next_call_reconnects() {
        let suffix = Uuid::new_v4();
        let exchange = format!("test.ab.missing.{suffix}");
        let mut sink = RabbitSink::new("bus", params(&exchange, RabbitMode::Event));
        let events: Vec<OutEvent> = (0..5).map(event).collect();

        let (reason, detail) = retry_reason(sink.deliver(&events).await);
        assert_eq!(reason, "channel");
        assert!(
            detail.contains("NOT_FOUND") && detail.contains(&exchange),
            "{detail}"
        );
        assert!(!sink.is_connected());

        // The operator creates the exchange; the same sink delivers on a new connection.
        let broker = Broker::declare(exchange, format!("test.ab.{suffix}"), true).await;
        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(5)
        );
        assert!(sink.is_connected());
        let ids: HashSet<String> = broker
            .take(5)
            .await
            .iter()
            .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
            .collect();
        assert_eq!(ids, events.iter().map(|e| e.id.to_string()).collect());
        broker.delete().await;
    }

    /// A message over the broker's `max_message_size` makes it close the channel with 406
    /// PRECONDITION_FAILED. Provoked for real, with an event one byte over the broker's own
    /// limit (128 MiB by default in RabbitMQ 3, 16 MiB in 4): the limit is global, so the test
    /// reads it and never changes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_over_the_brokers_max_message_size_is_undeliverable_and_the_next_call_reconnects()
     {
        let limit = max_message_size();
        let big = padded(event_for(2, "acme", "a", "success"), limit + 1);
        assert_eq!(big.json.len(), limit + 1);
        let events = vec![
            event_for(0, "acme", "a", "success"),
            event_for(1, "acme", "a", "success"),
            big,
            event_for(3, "acme", "a", "success"),
        ];
        // Batch mode: the event is larger than `max_batch_bytes` and goes alone, as in event mode.
        for mode in [RabbitMode::Event, RabbitMode::Batch] {
            let broker = Broker::new(true).await;
            let mut params = broker.params(mode.clone());
            // One message per confirm window: the broker's refusal is about that message.
            params.max_in_flight = 1;
            params.max_batch_bytes = 1024;
            let mut sink = RabbitSink::new("bus", params);

            let got = sink.deliver(&events).await.unwrap();
            // Confirmed before it, undeliverable itself; the call ends with the channel.
            assert_eq!(got.settled, 3, "{mode:?}: {got:?}");
            assert_eq!(got.undeliverable.len(), 1, "{mode:?}: {got:?}");
            let u = &got.undeliverable[0];
            assert_eq!((u.index, u.reason), (2, "too_large"), "{mode:?}");
            assert!(
                u.detail.contains(&events[2].id.to_string())
                    && u.detail.contains("PRECONDITION_FAILED")
                    && u.detail.contains("message size"),
                "{}",
                u.detail
            );
            assert!(!sink.is_connected());

            // The same sink goes on with the next event, on a new connection.
            assert_eq!(
                sink.deliver(&events[3..]).await.unwrap(),
                Delivered::confirmed(1)
            );
            assert!(sink.is_connected());
            // In batch mode the first two events share a message.
            let count = if mode == RabbitMode::Event { 3 } else { 2 };
            let ids = event_ids(&mode, &broker.take(count).await);
            assert_eq!(ids, [events[0].id, events[1].id, events[3].id], "{mode:?}");
            broker.delete().await;
        }
    }

    /// When the refused message shared its confirm window with others, or carries several
    /// events, nothing tells which event it is about: the call is refused as a whole, and the
    /// relay offers less until one event is alone in its message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_message_that_cannot_be_pinned_on_one_event_refuses_the_call() {
        let limit = max_message_size();
        let broker = Broker::new(true).await;

        // Event mode, one window: four messages in flight when the broker closes the channel.
        let big = padded(event_for(2, "acme", "a", "success"), limit + 1);
        let events = vec![
            event_for(0, "acme", "a", "success"),
            event_for(1, "acme", "a", "success"),
            big,
            event_for(3, "acme", "a", "success"),
        ];
        let mut sink = RabbitSink::new("bus", broker.params(RabbitMode::Event));
        let (reason, detail) = refused_reason(sink.deliver(&events).await);
        assert_eq!(reason, "too_large");
        assert!(
            detail.contains("PRECONDITION_FAILED")
                && detail.contains("the broker refused one of 4 messages published together"),
            "{detail}"
        );
        assert!(!sink.is_connected());
        // What the relay does next: the first half goes, the event alone is undeliverable.
        assert_eq!(
            sink.deliver(&events[..2]).await.unwrap(),
            Delivered::confirmed(2)
        );
        let got = sink.deliver(&events[2..3]).await.unwrap();
        assert_eq!(got.settled, 1);
        assert_eq!(got.undeliverable[0].reason, "too_large");
        let (first, second) = (events[0].id, events[1].id);
        drop(events);

        // Batch mode with a bound above the broker's limit (a broker configured below 16 MiB,
        // or a hand-built configuration): two events that each fit make one message that does
        // not. Neither is undeliverable; alone, each goes.
        let mut params = broker.params(RabbitMode::Batch);
        params.max_batch_bytes = usize::MAX;
        let mut sink = RabbitSink::new("bus", params);
        let half: Vec<OutEvent> = (0..2)
            .map(|n| padded(event_for(n, "acme", "a", "success"), limit / 2 + 1))
            .collect();
        let (reason, detail) = refused_reason(sink.deliver(&half).await);
        assert_eq!(reason, "too_large");
        assert!(
            detail.contains("the broker refused a batch of 2 events"),
            "{detail}"
        );
        assert!(!sink.is_connected());
        assert_eq!(
            sink.deliver(&half[..1]).await.unwrap(),
            Delivered::confirmed(1)
        );
        assert_eq!(
            sink.deliver(&half[1..]).await.unwrap(),
            Delivered::confirmed(1)
        );
        // The broker routed the two messages before the big one, but they were never reported
        // settled: the relay offered them again. Then the halves, one message each.
        let ids: Vec<Uuid> = broker.take(6).await.iter().flat_map(body_ids).collect();
        assert_eq!(ids, [first, second, first, second, half[0].id, half[1].id]);
        broker.delete().await;
    }

    /// Another 406 on publish, cheap to provoke per test: RabbitMQ refuses a `user_id` property
    /// that is not the connection's user. The sink never sets one, so the message is built by
    /// hand and goes through the sink's own publishing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_refused_for_its_properties_is_precondition_failed() {
        let broker = Broker::new(true).await;
        let mut params = broker.params(RabbitMode::Event);
        params.max_in_flight = 1;
        let mut sink = RabbitSink::new("bus", params);
        let events: Vec<OutEvent> = (0..3).map(event).collect();
        let mut messages: Vec<Message<'_>> = testing::event_messages(&sink, &events);
        messages[1].properties = messages[1]
            .properties
            .clone()
            .with_user_id("not-guest".into());

        let (answered, error) = testing::publish(&mut sink, &broker.exchange, &messages).await;

        // Confirmed before it, refused itself, nothing after it (the channel is gone).
        assert_eq!(answered.len(), 2, "{answered:?}");
        assert_eq!(answered[0], Answer::Confirmed);
        let Answer::Refused { reason, detail } = &answered[1] else {
            panic!("{answered:?}");
        };
        assert_eq!(*reason, "precondition_failed");
        assert!(
            detail.contains("PRECONDITION_FAILED")
                && detail.contains("user_id")
                && detail.contains(&events[1].id.to_string()),
            "{detail}"
        );
        let error = error.expect("the channel closed");
        assert_eq!(error.reason(), "precondition_failed");
        assert!(!sink.is_connected());
        assert_eq!(
            event_ids(&RabbitMode::Event, &broker.take(1).await),
            [events[0].id]
        );
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_password_fails_to_connect_quickly_without_showing_it() {
        let password = format!("not-the-password-{}", Uuid::new_v4());
        let url = format!("amqp://guest:{password}@127.0.0.1:5672/%2f");
        let params = RabbitParams {
            url: url.clone(),
            exchange: "amq.topic".into(),
            routing_key: "{tenant}".into(),
            mandatory: false,
            mode: RabbitMode::Event,
            confirm_timeout: Duration::from_secs(10),
            max_in_flight: 10,
            max_batch_bytes: 1024 * 1024,
        };
        let mut sink = RabbitSink::new("bus", params);
        let started = Instant::now();
        let (reason, detail) = retry_reason(sink.deliver(&[event(0)]).await);
        assert_eq!(reason, "connect");
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            !detail.contains(&password) && detail.contains("guest:***@127.0.0.1"),
            "{detail}"
        );
        assert!(!format!("{sink:?}").contains(&password));
        assert!(!sink.is_connected());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_call_does_no_io() {
        let params = RabbitParams {
            // Nothing listens on port 1: any attempt to connect would fail.
            url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
            exchange: "x".into(),
            routing_key: "{tenant}".into(),
            mandatory: true,
            mode: RabbitMode::Event,
            confirm_timeout: Duration::from_secs(1),
            max_in_flight: 10,
            max_batch_bytes: 1024 * 1024,
        };
        let mut sink = RabbitSink::new("bus", params);
        assert_eq!(sink.deliver(&[]).await.unwrap(), Delivered::confirmed(0));
        assert!(!sink.is_connected());
        let (reason, _) = retry_reason(sink.deliver(&[event(0)]).await);
        assert_eq!(reason, "connect");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_larger_than_max_in_flight_is_published_in_windows() {
        let broker = Broker::new(true).await;
        let mut params = broker.params(RabbitMode::Event);
        params.max_in_flight = 100;
        let mut sink = RabbitSink::new("bus", params);
        let events: Vec<OutEvent> = (0..2000).map(event).collect();

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(2000)
        );

        // All arrived, once each, and in the order given (one channel, one queue).
        let ids: Vec<String> = broker
            .take(2000)
            .await
            .iter()
            .map(|m| m.properties.message_id().as_ref().unwrap().to_string())
            .collect();
        assert_eq!(
            ids,
            events.iter().map(|e| e.id.to_string()).collect::<Vec<_>>()
        );
        broker.delete().await;
    }

    /// Event mode with confirms, 20,000 events in calls of 500 (max_in_flight 1000), against
    /// the same 20,000 messages published with lapin directly (windows of 1000 unconfirmed,
    /// all publishes of a window in flight together). Both go to a durable queue; the rounds
    /// alternate so that load from elsewhere on the machine hits both alike. Prints the rates
    /// (run with `--release --nocapture` for meaningful figures); asserts only that everything
    /// arrived.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn throughput_of_event_mode_against_raw_lapin() {
        const TOTAL: usize = 20_000;
        const ROUNDS: usize = 2;
        // 600-byte events, as in the design's measured limits.
        let events: Vec<OutEvent> = (0..TOTAL).map(|n| padded(event(n), 600)).collect();
        assert_eq!(events[0].json.len(), 600);
        let (mut sink_rates, mut raw_rates) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            sink_rates.push(sink_rate(&events).await);
            raw_rates.push(raw_rate(&events).await);
        }
        let best = |rates: &[f64]| rates.iter().copied().fold(0.0, f64::max);
        println!(
            "rabbitmq event mode, {TOTAL} persistent 600-byte messages with confirms: sink {:.0} msg/s \
             (calls of 500, rounds {sink_rates:.0?}), raw lapin {:.0} msg/s (rounds {raw_rates:.0?})",
            best(&sink_rates),
            best(&raw_rates),
        );
    }

    /// Grows the event's JSON to `size` bytes with a padding field.
    fn padded(mut e: OutEvent, size: usize) -> OutEvent {
        e.json.pop(); // the closing brace
        e.json.push_str(r#","pad":""#);
        let pad = size.saturating_sub(e.json.len() + 2);
        e.json.extend(std::iter::repeat_n('x', pad));
        e.json.push_str(r#""}"#);
        e
    }

    async fn sink_rate(events: &[OutEvent]) -> f64 {
        let broker = Broker::new(true).await;
        let mut sink = RabbitSink::new("bench", broker.params(RabbitMode::Event));
        sink.deliver(&events[..1]).await.unwrap(); // connect outside the measurement
        let started = Instant::now();
        for call in events.chunks(500) {
            assert_eq!(
                sink.deliver(call).await.unwrap(),
                Delivered::confirmed(call.len())
            );
        }
        let rate = events.len() as f64 / started.elapsed().as_secs_f64();
        assert_eq!(broker.queued().await as usize, events.len() + 1);
        broker.delete().await;
        rate
    }

    async fn raw_rate(events: &[OutEvent]) -> f64 {
        let broker = Broker::new(true).await;
        let connection = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // The sink's own message building, so both publish the same bytes and properties.
        let helper = RabbitSink::new("bench", broker.params(RabbitMode::Event));
        let messages: Vec<Message<'_>> = testing::event_messages(&helper, events);
        let exchange: ShortString = broker.exchange.as_str().into();
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let started = Instant::now();
        for window in messages.chunks(1000) {
            let publishes = window
                .iter()
                .map(|m| publish_one(&channel, &exchange, options, m));
            for confirm in futures::future::join_all(publishes).await {
                assert_eq!(confirm.unwrap().await.unwrap(), Confirmation::Ack(None));
            }
        }
        let rate = events.len() as f64 / started.elapsed().as_secs_f64();
        assert_eq!(broker.queued().await as usize, events.len());
        broker.delete().await;
        rate
    }

    async fn publish_one(
        channel: &Channel,
        exchange: &ShortString,
        options: BasicPublishOptions,
        m: &Message<'_>,
    ) -> lapin::Result<PublisherConfirm> {
        channel
            .basic_publish(
                exchange.clone(),
                m.routing_key.clone(),
                options,
                &m.body,
                m.properties.clone(),
            )
            .await
    }
}
