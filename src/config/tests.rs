//! Unit tests of loading, validation and redaction, with figment's `Jail` for files and the
//! environment.
#![allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
use std::net::SocketAddr;

use figment::Jail;

use super::*;

/// The error and its causes, as the binary prints them.
fn message(e: &ConfigError) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out = format!("{out}: {c}");
        cause = c.source();
    }
    out
}

#[test]
fn toml_then_env_override_and_tokens_are_redacted() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "bridge.toml",
            r#"
            [huggy]
            tokens = ["first-secret-token"]
            [kafka]
            brokers = "k1:9092"
            [kafka.librdkafka]
            "sasl.password" = "hunter2"
            "linger.ms" = "7"
            "#,
        )?;
        jail.set_env("HUGGY_BRIDGE_KAFKA__BROKERS", "k1:9092,k2:9092");
        jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "a-token,b-token");
        let cfg = Config::load(Some(Path::new("bridge.toml"))).expect("loads");
        assert_eq!(cfg.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(cfg.huggy.tokens.iter().map(Secret::expose).collect::<Vec<_>>(), ["a-token", "b-token"]);
        let printed = cfg.to_redacted_toml();
        assert!(!printed.contains("a-token") && !printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("linger.ms") && printed.contains("[redacted]"));
        Ok(())
    });
}

#[test]
fn a_numeric_token_from_the_environment_is_a_token() {
    Jail::expect_with(|jail| {
        jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "12345678");
        let cfg = Config::load(None).expect("loads");
        assert_eq!(cfg.huggy.tokens[0].expose(), "12345678");
        Ok(())
    });
}

#[test]
fn unknown_keys_are_rejected() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", "[huggy]\ntokens=[\"t\"]\n[kafka]\nbrokerz = \"x\"\n")?;
        let err = message(&Config::load(Some(Path::new("c.toml"))).unwrap_err());
        assert!(err.contains("kafka.brokerz: unknown field") && err.contains("c.toml"), "{err}");
        assert!(!err.contains("default."), "no figment profile: {err}");
        Ok(())
    });
}

#[test]
fn string_settings_from_the_environment_are_never_coerced() {
    Jail::expect_with(|jail| {
        jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
        jail.set_env("HUGGY_BRIDGE_KAFKA__SASL__MECHANISM", "PLAIN");
        jail.set_env("HUGGY_BRIDGE_KAFKA__SASL__USERNAME", "0123");
        jail.set_env("HUGGY_BRIDGE_KAFKA__SASL__PASSWORD", "true");
        jail.set_env("HUGGY_BRIDGE_KAFKA__FALLBACK_TOPIC", "007");
        jail.set_env("HUGGY_BRIDGE_KAFKA__TOPICS__RECEIVEDMESSAGE", "1e3");
        jail.set_env("HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__CLIENT__RACK", "0042");
        jail.set_env("HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__SOCKET__KEEPALIVE__ENABLE", "true");
        jail.set_env("HUGGY_BRIDGE_HTTP__PATH", "/0123");
        jail.set_env("HUGGY_BRIDGE_LOG__LEVEL", "true");
        // Numbers and booleans still parse for settings that are numbers and booleans.
        jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONS", "12");
        jail.set_env("HUGGY_BRIDGE_KAFKA__TLS__ENABLED", "false");
        jail.set_env("HUGGY_BRIDGE_FILES__ALLOWED_URL_PREFIXES", "[\"https://a.example/\"]");
        let cfg = Config::load(None).expect("loads");
        assert_eq!(cfg.kafka.sasl.username, "0123");
        assert_eq!(cfg.kafka.sasl.password.as_ref().map(Secret::expose), Some("true"));
        assert_eq!(cfg.kafka.fallback_topic, "007");
        assert_eq!(
            cfg.kafka.topics.get("receivedMessage").or(cfg.kafka.topics.get("receivedmessage")).map(String::as_str),
            Some("1e3")
        );
        assert_eq!(cfg.kafka.librdkafka.get("client.rack").map(String::as_str), Some("0042"));
        assert_eq!(cfg.kafka.librdkafka.get("socket.keepalive.enable").map(String::as_str), Some("true"));
        assert_eq!(cfg.http.path, "/0123");
        assert_eq!(cfg.log.level, "true");
        assert_eq!(cfg.kafka.partitions, 12);
        assert!(!cfg.kafka.tls.enabled);
        assert_eq!(cfg.files.allowed_url_prefixes, ["https://a.example/"]);
        Ok(())
    });
}

#[test]
fn errors_from_the_environment_name_the_variable() {
    Jail::expect_with(|jail| {
        jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
        jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONS", "six");
        let err = message(&Config::load(None).unwrap_err());
        assert!(err.contains("HUGGY_BRIDGE_KAFKA__PARTITIONS: invalid type"), "{err}");
        assert!(err.contains("the key is kafka.partitions"), "{err}");
        jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONS", "6");
        jail.set_env("HUGGY_BRIDGE_SPOOL__MAX_BYTEZ", "1");
        let err = message(&Config::load(None).unwrap_err());
        assert!(err.contains("HUGGY_BRIDGE_SPOOL__MAX_BYTEZ: unknown field"), "{err}");
        assert!(!err.contains("default."), "{err}");
        Ok(())
    });
}

#[test]
fn a_listen_address_without_a_host_means_every_interface() {
    Jail::expect_with(|jail| {
        jail.create_file("c.toml", "[huggy]\ntokens=[\"t\"]\n[http]\nlisten = \":8080\"\n")?;
        jail.set_env("HUGGY_BRIDGE_ADMIN__LISTEN", ":9090");
        let cfg = Config::load(Some(Path::new("c.toml"))).expect("loads");
        assert_eq!(cfg.http.listen, SocketAddr::from(([0, 0, 0, 0], 8080)));
        assert_eq!(cfg.admin.listen, SocketAddr::from(([0, 0, 0, 0], 9090)));
        jail.set_env("HUGGY_BRIDGE_ADMIN__LISTEN", "[::1]:9091");
        assert_eq!(Config::load(Some(Path::new("c.toml"))).expect("loads").admin.listen.port(), 9091);
        jail.set_env("HUGGY_BRIDGE_ADMIN__LISTEN", ":http");
        let err = message(&Config::load(Some(Path::new("c.toml"))).unwrap_err());
        assert!(err.contains("HUGGY_BRIDGE_ADMIN__LISTEN") && err.contains("\":http\""), "{err}");
        Ok(())
    });
}

#[test]
fn the_tls_pair_is_both_files_or_neither() {
    let mut cfg = Config::default();
    cfg.huggy.tokens = vec![Secret::new("t")];
    assert!(!cfg.http.tls.enabled());
    cfg.validate().expect("plain HTTP");
    cfg.check_tls_pair().expect("nothing to check without [http.tls]");
    cfg.http.tls.cert_file = "cert.pem".into();
    assert_eq!(cfg.validate().unwrap_err().to_string(), "invalid configuration: http.tls.key_file is empty");
    cfg.http.tls = HttpTlsConfig { cert_file: String::new(), key_file: "key.pem".into() };
    assert_eq!(cfg.validate().unwrap_err().to_string(), "invalid configuration: http.tls.cert_file is empty");
}

#[test]
fn validate_rejects_conflicts() {
    let mut cfg = Config::default();
    assert!(cfg.validate().is_err(), "no tokens");
    cfg.huggy.tokens = vec![Secret::new("t")];
    cfg.validate().expect("defaults plus a token are valid");
    cfg.kafka.topics.insert("notAType".into(), "x".into());
    assert!(cfg.validate().is_err());
    cfg.kafka.topics.clear();
    cfg.kafka.topic_template = "static".into();
    assert!(cfg.validate().is_err());
    cfg.kafka.topic_template = "huggy.{event}".into();
    cfg.spool.max_undelivered_age_secs = 600;
    assert!(cfg.validate().unwrap_err().to_string().contains("must exceed files.token_ttl_secs"));
    cfg.files.enabled = false;
    cfg.validate().expect("without file capture any age is fine");
}

/// What kubelet injects for Services `huggy-bridge` (ports `http`, `admin`) and `huggy-bridge-admin`.
pub(crate) const KUBELET_SERVICE_LINKS: &[(&str, &str)] = &[
    ("HUGGY_BRIDGE_SERVICE_HOST", "10.96.0.12"),
    ("HUGGY_BRIDGE_SERVICE_PORT", "8080"),
    ("HUGGY_BRIDGE_SERVICE_PORT_HTTP", "8080"),
    ("HUGGY_BRIDGE_SERVICE_PORT_ADMIN", "9090"),
    ("HUGGY_BRIDGE_PORT", "tcp://10.96.0.12:8080"),
    ("HUGGY_BRIDGE_PORT_8080_TCP", "tcp://10.96.0.12:8080"),
    ("HUGGY_BRIDGE_PORT_8080_TCP_PROTO", "tcp"),
    ("HUGGY_BRIDGE_PORT_8080_TCP_PORT", "8080"),
    ("HUGGY_BRIDGE_PORT_8080_TCP_ADDR", "10.96.0.12"),
    ("HUGGY_BRIDGE_ADMIN_SERVICE_HOST", "10.96.0.13"),
    ("HUGGY_BRIDGE_ADMIN_SERVICE_PORT", "9090"),
    ("HUGGY_BRIDGE_ADMIN_SERVICE_PORT_ADMIN", "9090"),
    ("HUGGY_BRIDGE_ADMIN_PORT", "tcp://10.96.0.13:9090"),
    ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP", "tcp://10.96.0.13:9090"),
    ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP_PROTO", "tcp"),
    ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP_PORT", "9090"),
    ("HUGGY_BRIDGE_ADMIN_PORT_9090_TCP_ADDR", "10.96.0.13"),
];

#[test]
fn kubernetes_service_links_are_ignored_and_reported() {
    Jail::expect_with(|jail| {
        jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
        jail.set_env("HUGGY_BRIDGE_ADMIN__LISTEN", "127.0.0.1:9999");
        for (k, v) in KUBELET_SERVICE_LINKS {
            jail.set_env(k, v);
        }
        let cfg = Config::load(None).expect("service links are not configuration");
        assert_eq!(cfg.admin.listen, SocketAddr::from(([127, 0, 0, 1], 9999)), "a real admin key still applies");
        let mut expected: Vec<String> = KUBELET_SERVICE_LINKS.iter().map(|(k, _)| k.to_string()).collect();
        expected.sort();
        assert_eq!(Config::ignored_env_vars(), expected);
        Ok(())
    });
}

#[test]
fn an_unknown_key_inside_a_known_section_is_still_an_error() {
    Jail::expect_with(|jail| {
        jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
        jail.set_env("HUGGY_BRIDGE_SERVICE_HOST", "10.96.0.12");
        jail.set_env("HUGGY_BRIDGE_KAFKA__BROKRES", "k1:9092");
        let err = message(&Config::load(None).unwrap_err());
        assert!(err.contains("brokres"), "{err}");
        assert_eq!(Config::ignored_env_vars(), ["HUGGY_BRIDGE_SERVICE_HOST"], "a section typo is not ignored");
        Ok(())
    });
}

#[test]
fn only_a_double_underscore_nests() {
    let sections = section_names();
    assert!(sections.len() >= 9, "{sections:?}");
    for key in ["HTTP__LISTEN", "ADMIN__LISTEN", "kafka__brokers", "SPOOL__DIR", "LOG__LEVEL", "FILES__STORE"] {
        assert!(names_a_section(&sections, key), "{key}");
    }
    for key in ["ADMIN_PORT", "ADMIN_SERVICE_HOST", "PORT", "SERVICE_HOST", "KAFKA_PORT_9092_TCP", ""] {
        assert!(!names_a_section(&sections, key), "{key}");
    }
}

#[test]
fn body_limits_must_fit_the_inflight_budget_and_the_spool() {
    let mut cfg = Config::default();
    cfg.huggy.tokens = vec![Secret::new("t")];
    assert_eq!(cfg.http.max_inflight_bytes, 256 * 1024 * 1024);
    cfg.http.max_inflight_bytes = cfg.http.max_body_bytes - 1;
    assert!(cfg.validate().unwrap_err().to_string().contains("http.max_inflight_bytes"));
    let body = cfg.http.max_body_bytes;
    cfg.http.max_body_bytes = MAX_BODY_BYTES_CEILING + 1;
    cfg.http.max_inflight_bytes = usize::MAX;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("http.max_body_bytes") && err.contains("must be at most 134217728"), "{err}");
    assert!(err.contains("spool frame"), "the reason is given: {err}");
    cfg.http.max_body_bytes = MAX_BODY_BYTES_CEILING;
    cfg.spool.max_bytes = u64::MAX;
    assert!(cfg.validate().is_ok(), "the ceiling itself is accepted");
    cfg.spool.max_bytes = 1024 * 1024 * 1024;
    cfg.http.max_body_bytes = body;
    cfg.http.max_inflight_bytes = cfg.http.max_body_bytes;
    cfg.validate().expect("one body at a time is a valid budget");
    cfg.spool.max_bytes = cfg.http.max_body_bytes as u64 - 1;
    assert!(cfg.validate().unwrap_err().to_string().contains("spool.max_bytes"));
    cfg.delivery.ack = AckMode::Kafka;
    cfg.validate().expect("kafka mode does not store batches in the spool");
}

#[test]
fn file_prefixes_without_a_slash_and_inverted_concurrency_are_refused() {
    let mut cfg = Config::default();
    cfg.huggy.tokens = vec![Secret::new("t")];
    cfg.files.allowed_url_prefixes = vec!["https://files.huggy.app".into()];
    let err = message(&cfg.validate().unwrap_err());
    assert!(err.contains("must end with '/'") && err.contains("\"https://files.huggy.app/\""), "{err}");
    cfg.files.allowed_url_prefixes = vec!["https://files.huggy.app@evil.com/".into()];
    assert!(message(&cfg.validate().unwrap_err()).contains("user information"));
    cfg.files.allowed_url_prefixes = vec!["https://files.huggy.app/".into()];
    cfg.validate().expect("a prefix ending in a slash is fine");
    cfg.files.max_concurrency = 8;
    assert!(cfg.validate().unwrap_err().to_string().contains("files.max_concurrency (8)"));
}

#[test]
fn a_capture_buffer_budget_below_one_part_is_refused() {
    let mut cfg = Config::default();
    cfg.huggy.tokens = vec![Secret::new("t")];
    cfg.files.max_buffer_bytes = 5 * 1024 * 1024 - 1;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("files.max_buffer_bytes") && err.contains("5242880"), "{err}");
    cfg.files.max_buffer_bytes = 5 * 1024 * 1024;
    cfg.validate().expect("one part is enough");
}

#[test]
fn a_webhook_path_the_router_would_read_as_a_pattern_is_refused() {
    for path in ["/webhooks/:account", "/hooks/*x", "/a/{b", "/a/{b}", "/a/{*rest}", "/a/b}", "/:x", "/*"] {
        let mut cfg = with_token();
        cfg.http.path = path.into();
        let err = cfg.validate().expect_err(path);
        assert!(matches!(err, ConfigError::Malformed { key: "http.path", .. }), "{path}: {err}");
        assert!(message(&err).contains("http.path"), "{path}: {err}");
    }
    for path in ["webhooks", ""] {
        let mut cfg = with_token();
        cfg.http.path = path.into();
        assert!(message(&cfg.validate().unwrap_err()).contains("http.path"), "{path}");
    }
    for path in ["/webhooks/huggy", "/", "/a:b/c*d", "/hooks/huggy-bridge_1.0"] {
        let mut cfg = with_token();
        cfg.http.path = path.into();
        cfg.validate().unwrap_or_else(|e| panic!("{path}: {e}"));
        // And the router takes it as it is.
        let _ = axum::Router::<()>::new().route(path, axum::routing::post(|| async {}));
    }
}

#[test]
fn zero_timeouts_are_refused_naming_the_key() {
    let keys = ["http.header_timeout_ms", "http.body_timeout_ms", "delivery.kafka_ack_timeout_ms"];
    for key in keys {
        let mut cfg = with_token();
        cfg.delivery.ack = AckMode::Kafka;
        match key {
            "http.header_timeout_ms" => cfg.http.header_timeout_ms = 0,
            "http.body_timeout_ms" => cfg.http.body_timeout_ms = 0,
            _ => cfg.delivery.kafka_ack_timeout_ms = 0,
        }
        let err = cfg.validate().expect_err(key);
        assert!(matches!(err, ConfigError::NotPositive { key: k } if k == key), "{key}: {err}");
        assert!(message(&err).contains(key), "{err}");
    }
    let mut cfg = with_token();
    cfg.delivery.ack = AckMode::Kafka;
    (cfg.http.header_timeout_ms, cfg.http.body_timeout_ms, cfg.delivery.kafka_ack_timeout_ms) = (1, 1, 1);
    cfg.validate().expect("a millisecond is a timeout");
}

#[test]
fn a_log_level_the_filter_would_misread_or_drop_is_refused_naming_log_level() {
    for level in ["warning", "WARNING", "Verbose", "fatal", "huggy=loud", "hyper=warn,err", "[{", "info, hyper=warn"] {
        let mut cfg = with_token();
        cfg.log.level = level.into();
        let err = cfg.validate().expect_err(level);
        assert!(matches!(err, ConfigError::Malformed { key: "log.level", .. }), "{level}: {err}");
        assert!(message(&err).contains("log.level"), "{err}");
    }
    for level in ["info", "WARN", "off", "3", "debug,hyper=warn", "huggy_bridge=debug", "[request]=debug"] {
        let mut cfg = with_token();
        cfg.log.level = level.into();
        cfg.validate().unwrap_or_else(|e| panic!("{level}: {e}"));
    }
}

fn with_token() -> Config {
    let mut cfg = Config::default();
    cfg.huggy.tokens = vec![Secret::new("t")];
    cfg
}

#[test]
fn tls_and_sasl_load_from_toml_and_the_password_from_the_environment_redacted() {
    Jail::expect_with(|jail| {
        jail.create_file("ca.pem", "not checked here")?;
        jail.create_file(
            "bridge.toml",
            r#"
            [huggy]
            tokens = ["t"]
            [kafka]
            brokers = "b-1.msk:9096"
            [kafka.tls]
            enabled = true
            ca_file = "ca.pem"
            [kafka.sasl]
            mechanism = "scram-sha-512"
            username = "bridge"
            "#,
        )?;
        jail.set_env("HUGGY_BRIDGE_KAFKA__SASL__PASSWORD", "[0123456789]");
        let cfg = Config::load(Some(Path::new("bridge.toml"))).expect("loads");
        assert_eq!(cfg.kafka.sasl.mechanism, SaslMechanism::ScramSha512);
        let password = cfg.kafka.sasl.password.as_ref().map(Secret::expose);
        assert_eq!(password, Some("[0123456789]"), "taken as it is, not as a TOML array");
        assert_eq!(cfg.kafka.security_protocol(), Some("sasl_ssl"));
        let printed = cfg.to_redacted_toml();
        assert!(!printed.contains("0123456789"), "{printed}");
        assert!(printed.contains("mechanism = \"SCRAM-SHA-512\""), "{printed}");
        assert!(!format!("{cfg:?}").contains("0123456789"), "Debug redacts too");
        Ok(())
    });
}

#[test]
fn librdkafka_properties_from_the_environment_and_dotted_toml_keys() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            "[huggy]\ntokens=[\"t\"]\n[kafka.librdkafka]\n\"linger.ms\" = \"7\"\nsocket.timeout.ms = 30000\n",
        )?;
        jail.set_env("HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__SOCKET__KEEPALIVE__ENABLE", "true");
        jail.set_env("HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__SASL__OAUTHBEARER__CLIENT__SECRET", "hunter2");
        let cfg = Config::load(Some(Path::new("c.toml"))).expect("loads");
        let p = &cfg.kafka.librdkafka;
        assert_eq!(p.get("linger.ms").map(String::as_str), Some("7"));
        assert_eq!(p.get("socket.timeout.ms").map(String::as_str), Some("30000"));
        assert_eq!(p.get("socket.keepalive.enable").map(String::as_str), Some("true"));
        assert_eq!(p.get("sasl.oauthbearer.client.secret").map(String::as_str), Some("hunter2"));
        assert!(!cfg.to_redacted_toml().contains("hunter2"));
        Ok(())
    });
}

#[test]
fn the_passthrough_guard_refuses_what_breaks_the_2xx_promise_naming_property_and_reason() {
    let refused = [
        ("acks", "1", "acks=all"),
        ("request.required.acks", "0", "acks=all"),
        ("enable.idempotence", "false", "idempotence"),
        ("max.in.flight.requests.per.connection", "6", "above 5"),
        ("max.in.flight", "100", "above 5"),
        ("message.timeout.ms", "30000", "re-sends a timed-out record"),
        ("delivery.timeout.ms", "30000", "re-sends a timed-out record"),
        ("transactional.id", "bridge-1", "transaction"),
        ("partitioner", "random", "per-key order"),
        ("bootstrap.servers", "x:9092", "kafka.brokers"),
    ];
    for (k, v, why) in refused {
        let mut cfg = with_token();
        cfg.kafka.librdkafka.insert(k.into(), v.into());
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(&format!("kafka.librdkafka.{k} is refused")) && e.contains(why), "{k}={v}: {e}");
    }
    let allowed = [("acks", "all"), ("max.in.flight.requests.per.connection", "5"), ("linger.ms", "50")];
    for (k, v) in allowed {
        let mut cfg = with_token();
        cfg.kafka.librdkafka.insert(k.into(), v.into());
        cfg.validate().unwrap_or_else(|e| panic!("{k}={v}: {e}"));
    }
    let mut cfg = with_token();
    cfg.delivery.ack = AckMode::Kafka;
    cfg.kafka.librdkafka.insert("message.timeout.ms".into(), "5000".into());
    cfg.validate().expect("kafka mode: a message timeout only makes a 503 earlier");
}

#[test]
fn the_passthrough_cannot_contradict_the_tls_and_sasl_sections() {
    let mut cfg = with_token();
    cfg.kafka.sasl.mechanism = SaslMechanism::Plain;
    cfg.kafka.sasl.username = "u".into();
    cfg.kafka.sasl.password = Some(Secret::new("p"));
    cfg.kafka.librdkafka.insert("sasl.password".into(), "other".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("kafka.librdkafka.sasl.password is refused") && e.contains("[kafka.sasl]"), "{e}");
    assert!(!e.contains("other"), "{e}");
    let mut cfg = with_token();
    cfg.kafka.librdkafka.insert("security.protocol".into(), "sasl_ssl".into());
    cfg.kafka.librdkafka.insert("sasl.mechanism".into(), "OAUTHBEARER".into());
    cfg.validate().expect("without the sections, the passthrough may configure other mechanisms");
}

#[test]
fn tls_and_sasl_settings_are_checked() {
    let mut cfg = with_token();
    cfg.kafka.tls.ca_file = "ca.pem".into();
    assert!(cfg.validate().unwrap_err().to_string().contains("kafka.tls.enabled is false"));
    cfg.kafka.tls.enabled = true;
    cfg.kafka.tls.ca_file = "/nonexistent/ca.pem".into();
    assert!(cfg.validate().unwrap_err().to_string().contains("kafka.tls.ca_file"));
    cfg.kafka.tls.ca_file.clear();
    cfg.kafka.tls.cert_file = "/nonexistent/client.pem".into();
    assert!(cfg.validate().unwrap_err().to_string().contains("go together"));
    cfg.kafka.tls.cert_file.clear();
    cfg.validate().expect("TLS with the system roots");
    cfg.kafka.sasl.mechanism = SaslMechanism::ScramSha256;
    cfg.kafka.sasl.username = "u".into();
    assert!(cfg.validate().unwrap_err().to_string().contains("needs username and password"));
    cfg.kafka.sasl.password = Some(Secret::new("p"));
    cfg.validate().expect("complete");
}

#[test]
fn an_unsupported_sasl_mechanism_is_named() {
    Jail::expect_with(|jail| {
        jail.set_env("HUGGY_BRIDGE_HUGGY__TOKENS", "t");
        jail.set_env("HUGGY_BRIDGE_KAFKA__SASL__MECHANISM", "GSSAPI");
        let e = message(&Config::load(None).unwrap_err());
        assert!(e.contains("GSSAPI") && e.contains("SCRAM-SHA-512"), "{e}");
        Ok(())
    });
}

#[test]
fn topic_names_from_the_template_and_overrides_follow_kafka_rules() {
    let mut cfg = with_token();
    cfg.kafka.topic_template = "huggy/{event}".into();
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("kafka.topic_template makes \"huggy/"), "{e}");
    cfg.kafka.topic_template = format!("{}{{event}}", "x".repeat(240));
    assert!(cfg.validate().is_err(), "longer than 249 for some type");
    cfg.kafka.topic_template = "huggy.{event}".into();
    cfg.kafka.dead_letter_topic = "..".into();
    assert!(cfg.validate().unwrap_err().to_string().contains("kafka.dead_letter_topic"));
    cfg.kafka.dead_letter_topic = "huggy.dead-letter".into();
    cfg.kafka.topics.insert("receivedMessage".into(), "chat inbound".into());
    assert!(cfg.validate().unwrap_err().to_string().contains("receivedMessage"));
}

#[test]
fn min_insync_replicas_must_fit_the_replication_factor() {
    let mut cfg = with_token();
    cfg.kafka.replication_factor = 3;
    cfg.kafka.min_insync_replicas = Some(4);
    assert!(cfg.validate().unwrap_err().to_string().contains("kafka.min_insync_replicas"));
    cfg.kafka.min_insync_replicas = Some(3);
    cfg.validate().expect("fits");
}

#[test]
fn the_partitioner_defaults_to_murmur2_random_and_only_keyed_partitioners_are_accepted() {
    assert_eq!(Config::default().kafka.partitioner, Partitioner::Murmur2Random);
    Jail::expect_with(|jail| {
        jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONER", "Consistent_Random");
        assert_eq!(Config::load_offline(None).expect("loads").kafka.partitioner, Partitioner::ConsistentRandom);
        jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONER", "random");
        let e = message(&Config::load_offline(None).unwrap_err());
        assert!(e.contains("per-key order") && e.contains("murmur2_random"), "{e}");
        jail.set_env("HUGGY_BRIDGE_KAFKA__PARTITIONER", "crc32");
        assert!(message(&Config::load_offline(None).unwrap_err()).contains("unsupported partitioner"));
        Ok(())
    });
    let mut cfg = with_token();
    cfg.kafka.librdkafka.insert("partitioner".into(), "murmur2".into());
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("kafka.librdkafka.partitioner is refused") && e.contains("kafka.partitioner"), "{e}");
}

#[test]
fn offline_commands_need_no_webhook_tokens() {
    Jail::expect_with(|jail| {
        jail.set_env("HUGGY_BRIDGE_KAFKA__BROKERS", "k1:9092");
        assert!(Config::load(None).is_err());
        let cfg = Config::load_offline(None).expect("no tokens needed");
        assert_eq!(cfg.kafka.brokers, "k1:9092");
        jail.set_env("HUGGY_BRIDGE_KAFKA__LIBRDKAFKA__ACKS", "1");
        assert!(Config::load_offline(None).unwrap_err().to_string().contains("acks"));
        Ok(())
    });
}

#[test]
fn accounts_bind_tokens_to_a_company_from_the_file_or_the_list() {
    Jail::expect_with(|jail| {
        jail.create_file("account-b.tokens", "b-1\n\n  b-2  \n")?;
        jail.create_file(
            "c.toml",
            r#"
            [huggy]
            tokens = ["plain"]
            [[huggy.accounts]]
            company_id = 15693
            tokens = ["a-1"]
            [[huggy.accounts]]
            company_id = "20001"
            tokens_file = "account-b.tokens"
            "#,
        )?;
        let cfg = Config::load(Some(Path::new("c.toml"))).expect("valid");
        let accounts = &cfg.huggy.accounts;
        assert_eq!((accounts[0].company_id.as_str(), accounts[1].company_id.as_str()), ("15693", "20001"));
        let b: Vec<&str> = accounts[1].tokens.iter().map(Secret::expose).collect();
        assert_eq!(b, ["b-1", "b-2"], "one token a line, exactly");
        let shown = toml::to_string(&cfg).unwrap_or_default() + &format!("{cfg:?}");
        assert!(!shown.contains("a-1") && !shown.contains("b-2"), "tokens never printed");

        jail.create_file("only-accounts.toml", "[[huggy.accounts]]\ncompany_id = 1\ntokens = [\"x\"]\n")?;
        assert!(Config::load(Some(Path::new("only-accounts.toml"))).is_ok(), "accounts alone are tokens enough");
        for (toml, expected) in [
            ("[huggy]\ntokens = [\"y\"]\n[[huggy.accounts]]\ncompany_id = 1\n", "no tokens"),
            ("[[huggy.accounts]]\ncompany_id = \"x1\"\ntokens = [\"x\"]\n", "company_id must be"),
            ("[huggy]\ntokens = [\"x\"]\n[[huggy.accounts]]\ncompany_id = 1\ntokens = [\"x\"]\n", "configured twice"),
            ("[[huggy.accounts]]\ncompany_id = 1\ntokens_file = \"missing.tokens\"\n", "tokens_file"),
        ] {
            jail.create_file("bad.toml", toml)?;
            let err = message(&Config::load(Some(Path::new("bad.toml"))).unwrap_err());
            assert!(err.contains(expected) && !err.contains("\"x\""), "{toml}: {err}");
        }
        Ok(())
    });
}
