//! The RabbitMQ and HTTP sinks of `auditbridge-destinations` on their own, through the
//! crate's public API: RabbitMQ against the real broker on 127.0.0.1:5672 (guest/guest; each
//! test declares its own exchange and queue with random names and deletes them), HTTP against
//! a scripted receiver each test starts on 127.0.0.1:0. No worker, no database: what reaches
//! a destination end to end through the relay is `forwarding.rs`'s business.

/// `RabbitSink`: confirms, returns, refusals, reconnects and message layout, on a real broker.
mod rabbitmq {
    use std::collections::{HashMap, HashSet};
    use std::time::Duration;

    use auditbridge_destinations::rabbitmq::testing::{self, Answer, Message};
    use auditbridge_destinations::rabbitmq::{RabbitMode, RabbitParams, RabbitSink};
    use auditbridge_destinations::{Delivered, DeliveryError, StoredEvent};
    use auditbridge_fixtures::{Exchange, QueueOptions};
    use lapin::message::BasicGetMessage;
    use lapin::options::{
        BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
        QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    use lapin::{Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm};
    use time::OffsetDateTime;
    use tokio::time::Instant;
    use uuid::Uuid;

    const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    /// A topic exchange of its own (and, when bound, a queue that takes everything), set up by
    /// the test the way an operator would: an [`Exchange`] of the shared fixtures, and a
    /// channel to read the queue with.
    struct Broker {
        fixture: Exchange,
        _connection: Connection,
        channel: Channel,
        exchange: String,
        queue: String,
    }

    impl Broker {
        async fn new(bound: bool) -> Broker {
            Broker::declare(format!("test.ab.{}", Uuid::new_v4()), bound).await
        }

        async fn declare(exchange: String, bound: bool) -> Broker {
            let fixture = if bound {
                let options = QueueOptions {
                    // The broker removes the queue by itself if a failed test leaves it.
                    expires: Some(Duration::from_secs(600)),
                    ..QueueOptions::default()
                };
                Exchange::declare(URL, &exchange, &options).await
            } else {
                Exchange::declare_unbound(URL, &exchange).await
            }
            .unwrap();
            let connection = fixture.connect().await.unwrap();
            let channel = connection.create_channel().await.unwrap();
            Broker {
                exchange: fixture.name.clone(),
                queue: fixture.queue.clone(),
                fixture,
                _connection: connection,
                channel,
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
            let Broker {
                fixture, channel, ..
            } = self;
            let _ = channel.close(200, "done".into()).await;
            fixture.delete().await;
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
            checkpoints: false,
        }
    }

    fn event(n: usize) -> StoredEvent {
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

    fn event_for(n: usize, tenant: &str, action: &str, outcome: &str) -> StoredEvent {
        let id = Uuid::new_v4();
        StoredEvent {
            id,
            tenant: tenant.into(),
            action: action.into(),
            outcome: outcome.into(),
            actor_id: "u-1".into(),
            target_id: None,
            source: "docs-api".into(),
            occurred_at: OffsetDateTime::now_utc(),
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
                .map(|m| message_id(m).parse().unwrap())
                .collect(),
        }
    }

    /// A message's `message_id`, as the broker delivered it.
    fn message_id(m: &BasicGetMessage) -> &str {
        m.properties
            .message_id()
            .as_ref()
            .expect("message_id")
            .as_str()
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
        let events: Vec<StoredEvent> = (0..12).map(event).collect();

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(12)
        );
        assert!(sink.is_connected());

        let by_id: HashMap<String, &StoredEvent> =
            events.iter().map(|e| (e.id.to_string(), e)).collect();
        let messages = broker.take(12).await;
        let mut seen = HashSet::new();
        for m in &messages {
            let id = message_id(m).to_owned();
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
        let order: Vec<&str> = messages.iter().map(message_id).collect();
        let want: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(order, want, "messages arrive in the order given");
        broker.delete().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_mode_publishes_one_ndjson_message_per_run() {
        let broker = Broker::new(true).await;
        let mut sink = RabbitSink::new("bus", broker.params(RabbitMode::Batch));
        let events: Vec<StoredEvent> = (1..=7)
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
        assert_eq!(message_id(m), events[0].id.to_string());
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
        let events: Vec<StoredEvent> = spec
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
            let events: Vec<StoredEvent> = tenants
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
        let events: Vec<StoredEvent> = (0..3).map(event).collect();

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
        let first: Vec<StoredEvent> = (0..3).map(event).collect();
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

        let second: Vec<StoredEvent> = (0..3).map(event).collect();
        assert_eq!(
            sink.deliver(&second).await.unwrap(),
            Delivered::confirmed(3)
        );
        assert!(sink.is_connected());
        let ids: Vec<String> = broker
            .take(6)
            .await
            .iter()
            .map(|m| message_id(m).to_owned())
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
        let events: Vec<StoredEvent> = (0..3).map(event).collect();

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
        let events: Vec<StoredEvent> = (0..5).map(event).collect();

        let (reason, detail) = retry_reason(sink.deliver(&events).await);
        assert_eq!(reason, "channel");
        assert!(
            detail.contains("NOT_FOUND") && detail.contains(&exchange),
            "{detail}"
        );
        assert!(!sink.is_connected());

        // The operator creates the exchange; the same sink delivers on a new connection.
        let broker = Broker::declare(exchange, true).await;
        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(5)
        );
        assert!(sink.is_connected());
        let ids: HashSet<String> = broker
            .take(5)
            .await
            .iter()
            .map(|m| message_id(m).to_owned())
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
        let half: Vec<StoredEvent> = (0..2)
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
        let events: Vec<StoredEvent> = (0..3).map(event).collect();
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
            url: url.clone().into(),
            exchange: "amq.topic".into(),
            routing_key: "{tenant}".into(),
            mandatory: false,
            mode: RabbitMode::Event,
            confirm_timeout: Duration::from_secs(10),
            max_in_flight: 10,
            max_batch_bytes: 1024 * 1024,
            checkpoints: false,
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
            checkpoints: false,
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
        let events: Vec<StoredEvent> = (0..2000).map(event).collect();

        assert_eq!(
            sink.deliver(&events).await.unwrap(),
            Delivered::confirmed(2000)
        );

        // All arrived, once each, and in the order given (one channel, one queue).
        let ids: Vec<String> = broker
            .take(2000)
            .await
            .iter()
            .map(|m| message_id(m).to_owned())
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
        let events: Vec<StoredEvent> = (0..TOTAL).map(|n| padded(event(n), 600)).collect();
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
    fn padded(mut e: StoredEvent, size: usize) -> StoredEvent {
        e.json.pop(); // the closing brace
        e.json.push_str(r#","pad":""#);
        let pad = size.saturating_sub(e.json.len() + 2);
        e.json.extend(std::iter::repeat_n('x', pad));
        e.json.push_str(r#""}"#);
        e
    }

    async fn sink_rate(events: &[StoredEvent]) -> f64 {
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

    async fn raw_rate(events: &[StoredEvent]) -> f64 {
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

/// `HttpSink`: batches, headers, signatures and what each answer means, against a scripted
/// receiver on 127.0.0.1.
mod http {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use auditbridge_destinations::http::{
        HttpAuth, HttpFormat, HttpParams, HttpSink, sign, verify,
    };
    use auditbridge_destinations::{Delivered, DeliveryError, StoredEvent};
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap as AxHeaderMap, Method, StatusCode as AxStatus, Uri};
    use axum::response::{IntoResponse, Response};
    use serde_json::{Value, json};
    use time::OffsetDateTime;
    use time::format_description::FormatItem;
    use time::macros::format_description;
    use uuid::Uuid;

    /// How much of a response body the sink puts into an error detail.
    const SNIPPET_BYTES: usize = 200;

    /// Seconds since the Unix epoch, the clock of `X-Auditbridge-Timestamp`.
    fn unix_now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// An HTTP-date (RFC 9110's IMF-fixdate), as a receiver writes `Retry-After`.
    fn http_date(at: SystemTime) -> String {
        const IMF_FIXDATE: &[FormatItem<'_>] = format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        OffsetDateTime::from(at).format(IMF_FIXDATE).unwrap()
    }

    /// One request as the test server saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path: String,
        headers: AxHeaderMap,
        body: Bytes,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).map(|v| v.to_str().unwrap())
        }
    }

    /// What the test server answers to the next request (200 once the script runs out).
    #[derive(Clone)]
    struct Reply {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
        delay: Duration,
    }

    impl Reply {
        fn status(status: u16) -> Reply {
            Reply {
                status,
                headers: Vec::new(),
                body: String::new(),
                delay: Duration::ZERO,
            }
        }
        fn header(mut self, name: &'static str, value: &str) -> Reply {
            self.headers.push((name, value.to_owned()));
            self
        }
        fn body(mut self, body: &str) -> Reply {
            self.body = body.to_owned();
            self
        }
        fn delay(mut self, delay: Duration) -> Reply {
            self.delay = delay;
            self
        }
    }

    #[derive(Default)]
    struct Shared {
        seen: Mutex<Vec<Seen>>,
        script: Mutex<VecDeque<Reply>>,
    }

    struct Server {
        addr: SocketAddr,
        shared: Arc<Shared>,
    }

    impl Server {
        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }
        fn seen(&self) -> Vec<Seen> {
            self.shared.seen.lock().unwrap().clone()
        }
    }

    async fn record(
        State(shared): State<Arc<Shared>>,
        method: Method,
        uri: Uri,
        headers: AxHeaderMap,
        body: Bytes,
    ) -> Response {
        shared.seen.lock().unwrap().push(Seen {
            method,
            path: uri.path().to_owned(),
            headers,
            body,
        });
        let reply = shared
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| Reply::status(200));
        tokio::time::sleep(reply.delay).await;
        let mut response = (AxStatus::from_u16(reply.status).unwrap(), reply.body).into_response();
        for (name, value) in reply.headers {
            response.headers_mut().insert(name, value.parse().unwrap());
        }
        response
    }

    /// A real HTTP server on 127.0.0.1:0 that records every request and answers from `script`.
    async fn server(script: Vec<Reply>) -> Server {
        let shared = Arc::new(Shared {
            seen: Mutex::default(),
            script: Mutex::new(script.into()),
        });
        let app = axum::Router::new()
            .fallback(record)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Server { addr, shared }
    }

    fn params(url: String) -> HttpParams {
        let mut p = HttpParams::new(url.into());
        p.timeout = Duration::from_secs(5);
        p
    }

    /// An event whose JSON is exactly `len` bytes long (at least ~120).
    fn event(len: usize) -> StoredEvent {
        let id = Uuid::now_v7();
        let mut value = json!({"id": id, "tenant": "acme", "action": "user.login", "outcome": "success", "pad": ""});
        let short = value.to_string().len();
        assert!(len >= short, "an event is at least {short} bytes");
        value["pad"] = Value::String("x".repeat(len - short));
        let json = value.to_string();
        assert_eq!(json.len(), len);
        StoredEvent {
            id,
            tenant: "acme".into(),
            action: "user.login".into(),
            outcome: "success".into(),
            actor_id: "u-1".into(),
            target_id: None,
            source: "auth".into(),
            occurred_at: OffsetDateTime::now_utc(),
            received_at: OffsetDateTime::now_utc(),
            json,
        }
    }

    fn events(n: usize, len: usize) -> Vec<StoredEvent> {
        (0..n).map(|_| event(len)).collect()
    }

    fn values(events: &[StoredEvent]) -> Vec<Value> {
        events
            .iter()
            .map(|e| serde_json::from_str(&e.json).unwrap())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ndjson_batches_carry_events_headers_and_bearer_auth() {
        let server = server(vec![]).await;
        let mut p = params(server.url("/in"));
        p.headers = [("X-Source".into(), "auditbridge-test".into())].into();
        p.auth = Some(HttpAuth::Bearer("tok-123".into()));
        let mut sink = HttpSink::new("siem", p).unwrap();
        let batch = events(3, 150);

        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(3));

        let seen = server.seen();
        assert_eq!(seen.len(), 1);
        let req = &seen[0];
        assert_eq!(req.method, Method::POST);
        assert_eq!(req.path, "/in");
        assert_eq!(req.header("content-type"), Some("application/x-ndjson"));
        assert_eq!(req.header("x-source"), Some("auditbridge-test"));
        assert_eq!(req.header("authorization"), Some("Bearer tok-123"));
        assert_eq!(req.header("x-auditbridge-destination"), Some("siem"));
        assert_eq!(req.header("x-auditbridge-count"), Some("3"));
        let key = format!("{}..{}", batch[0].id, batch[2].id);
        assert_eq!(req.header("idempotency-key"), Some(key.as_str()));
        // No secret, no signature.
        assert_eq!(req.header("x-auditbridge-timestamp"), None);
        assert_eq!(req.header("x-auditbridge-signature"), None);

        let body = std::str::from_utf8(&req.body).unwrap();
        assert!(body.ends_with('\n'));
        let got: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got, values(&batch));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn json_array_batches_parse_back_and_carry_basic_auth() {
        let server = server(vec![Reply::status(202)]).await;
        let mut p = params(server.url("/hook"));
        p.format = HttpFormat::JsonArray;
        // The example from RFC 7617.
        p.auth = Some(HttpAuth::Basic {
            username: "Aladdin".into(),
            password: "open sesame".into(),
        });
        let mut sink = HttpSink::new("array", p).unwrap();
        let batch = events(4, 130);

        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(4));

        let req = &server.seen()[0];
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(
            req.header("authorization"),
            Some("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
        );
        assert_eq!(req.header("x-auditbridge-count"), Some("4"));
        let got: Vec<Value> = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(got, values(&batch));
        let expected = format!(
            "[{}]",
            batch
                .iter()
                .map(|e| e.json.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(req.body, expected.as_bytes());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_limits_cut_the_prefix_but_a_lone_oversized_event_still_goes() {
        let server = server(vec![]).await;
        let batch = events(5, 200);

        // By count.
        let mut p = params(server.url("/"));
        p.max_batch_events = 2;
        let mut sink = HttpSink::new("count", p).unwrap();
        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(2));

        // By bytes, NDJSON: three events take 3 × 201 = 603 bytes, four would take 804.
        let mut p = params(server.url("/"));
        p.max_batch_bytes = 700;
        let mut sink = HttpSink::new("bytes", p).unwrap();
        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(3));

        // By bytes, JSON array, an exact fit: "[" + 3 × 200 + 2 commas + "]" = 604.
        let mut p = params(server.url("/"));
        p.format = HttpFormat::JsonArray;
        p.max_batch_bytes = 604;
        let mut sink = HttpSink::new("exact", p).unwrap();
        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(3));

        // One event larger than the limit goes alone, and only it.
        let mut big = vec![event(2000)];
        big.extend(events(2, 150));
        let mut p = params(server.url("/"));
        p.max_batch_bytes = 1024;
        let mut sink = HttpSink::new("big", p).unwrap();
        assert_eq!(sink.deliver(&big).await.unwrap(), Delivered::confirmed(1));

        let seen = server.seen();
        let counts: Vec<_> = seen
            .iter()
            .map(|r| r.header("x-auditbridge-count").unwrap().to_owned())
            .collect();
        assert_eq!(counts, ["2", "3", "3", "1"]);
        assert_eq!(
            seen[0].body,
            format!("{}\n{}\n", batch[0].json, batch[1].json).as_bytes()
        );
        assert_eq!(seen[1].body.len(), 603);
        assert_eq!(seen[2].body.len(), 604);
        assert_eq!(seen[3].body, format!("{}\n", big[0].json).as_bytes());
        let key = format!("{}..{}", big[0].id, big[0].id);
        assert_eq!(seen[3].header("idempotency-key"), Some(key.as_str()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signed_requests_verify_on_the_raw_body() {
        let server = server(vec![]).await;
        let mut p = params(server.url("/signed"));
        p.secret = Some("whsec-test".into());
        let mut sink = HttpSink::new("signed", p).unwrap();
        let batch = events(2, 140);

        assert_eq!(sink.deliver(&batch).await.unwrap(), Delivered::confirmed(2));

        let req = &server.seen()[0];
        let timestamp: u64 = req
            .header("x-auditbridge-timestamp")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            unix_now().abs_diff(timestamp) <= 5,
            "timestamp {timestamp} is not now"
        );
        let signature = req.header("x-auditbridge-signature").unwrap();
        assert!(signature.starts_with("v1="));
        assert_eq!(signature.len(), 3 + 64);
        assert!(
            signature[3..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(signature, sign(b"whsec-test", timestamp, &req.body));

        assert!(verify(b"whsec-test", timestamp, &req.body, signature));
        let mut altered = req.body.to_vec();
        altered[5] ^= 1;
        assert!(!verify(b"whsec-test", timestamp, &altered, signature));
        assert!(!verify(b"whsec-test", timestamp + 1, &req.body, signature));
        assert!(!verify(b"whsec-other", timestamp, &req.body, signature));
        assert!(!verify(
            b"whsec-test",
            timestamp,
            &req.body,
            &signature[3..]
        ));
        assert!(!verify(b"whsec-test", timestamp, &req.body, "v1=zz"));
    }

    async fn fail_with(reply: Reply) -> (DeliveryError, Server) {
        let server = server(vec![reply]).await;
        let mut sink = HttpSink::new("siem", params(server.url("/in"))).unwrap();
        let error = sink.deliver(&events(2, 130)).await.unwrap_err();
        (error, server)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_errors_and_throttling_are_retried() {
        let (e, _s) = fail_with(Reply::status(500).body("database down")).await;
        assert!(
            matches!(
                e,
                DeliveryError::Retry {
                    reason: "status_5xx",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("500") && e.to_string().contains("database down"),
            "{e}"
        );

        let (e, _s) = fail_with(
            Reply::status(429)
                .header("retry-after", "7")
                .body("slow down"),
        )
        .await;
        assert!(
            matches!(
                e,
                DeliveryError::Retry {
                    reason: "status_429",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert!(
            e.to_string().contains("429") && e.to_string().contains("slow down"),
            "{e}"
        );

        let when = http_date(SystemTime::now() + Duration::from_secs(120));
        let (e, _s) = fail_with(Reply::status(503).header("retry-after", &when)).await;
        assert_eq!(e.reason(), "status_5xx");
        let after = e.retry_after().unwrap();
        assert!(
            after > Duration::from_secs(100) && after <= Duration::from_secs(120),
            "{after:?}"
        );

        let (e, _s) = fail_with(Reply::status(408)).await;
        assert!(
            matches!(
                e,
                DeliveryError::Retry {
                    reason: "timeout",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_errors_and_redirects_are_refused() {
        let (e, _s) = fail_with(Reply::status(404)).await;
        assert!(
            matches!(
                e,
                DeliveryError::Refused {
                    reason: "status_4xx",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("404"), "{e}");

        let long = format!("bad field tenant{}", "y".repeat(1000));
        let (e, _s) = fail_with(Reply::status(400).body(&long)).await;
        assert!(
            matches!(
                e,
                DeliveryError::Refused {
                    reason: "status_4xx",
                    ..
                }
            ),
            "{e:?}"
        );
        let detail = e.to_string();
        assert!(
            detail.contains("400") && detail.contains("bad field tenant"),
            "{detail}"
        );
        assert!(
            !detail.contains(&"y".repeat(SNIPPET_BYTES)),
            "the body is cut to {SNIPPET_BYTES} bytes: {detail}"
        );

        let server = server(vec![Reply::status(302).header("location", "/elsewhere")]).await;
        let mut sink = HttpSink::new("siem", params(server.url("/in"))).unwrap();
        let e = sink.deliver(&events(1, 130)).await.unwrap_err();
        assert!(
            matches!(
                e,
                DeliveryError::Refused {
                    reason: "status_3xx",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("302") && e.to_string().contains("/elsewhere"),
            "{e}"
        );
        let paths: Vec<_> = server.seen().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["/in"], "the redirect was not followed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_receiver_times_out() {
        let server = server(vec![Reply::status(200).delay(Duration::from_secs(5))]).await;
        let mut p = params(server.url("/slow"));
        p.timeout = Duration::from_millis(300);
        let mut sink = HttpSink::new("slow", p).unwrap();

        let started = Instant::now();
        let e = sink.deliver(&events(1, 130)).await.unwrap_err();
        assert!(
            matches!(
                e,
                DeliveryError::Retry {
                    reason: "timeout",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "took {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_port_is_a_connect_error() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let mut sink =
            HttpSink::new("gone", params(format!("http://127.0.0.1:{port}/in"))).unwrap();
        let e = sink.deliver(&events(1, 130)).await.unwrap_err();
        assert!(
            matches!(
                e,
                DeliveryError::Retry {
                    reason: "connect",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn credentials_stay_out_of_errors_and_debug_output() {
        // A receiver that echoes the credentials back in its refusal.
        let server =
            server(vec![Reply::status(401).body(
                "bad token tok-secret-123 / whsec-hidden / key-hidden-9",
            )])
            .await;
        let mut p = params(server.url("/in?api_key=query-hidden"));
        p.auth = Some(HttpAuth::Bearer("tok-secret-123".into()));
        p.secret = Some("whsec-hidden".into());
        p.headers = [("X-Api-Key".into(), "key-hidden-9".into())].into();
        let mut sink = HttpSink::new("siem", p).unwrap();

        let e = sink.deliver(&events(1, 130)).await.unwrap_err();
        assert_eq!(e.reason(), "status_4xx");
        let shown = format!("{e} {e:?} {sink:?}");
        for hidden in [
            "tok-secret-123",
            "whsec-hidden",
            "key-hidden-9",
            "query-hidden",
        ] {
            assert!(!shown.contains(hidden), "{hidden} leaked: {shown}");
        }
        assert!(shown.contains("bad token [redacted]"), "{shown}");

        let mut p = params("http://user:pw-hidden@127.0.0.1:1/in".into());
        p.auth = Some(HttpAuth::Basic {
            username: "u".into(),
            password: "basic-hidden".into(),
        });
        let mut sink = HttpSink::new("siem", p).unwrap();
        let e = sink.deliver(&events(1, 130)).await.unwrap_err();
        let shown = format!("{e} {e:?} {sink:?}");
        assert!(
            !shown.contains("pw-hidden") && !shown.contains("basic-hidden"),
            "{shown}"
        );
    }
}
