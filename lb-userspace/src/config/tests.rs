use super::*;

const GOOD: &str = r#"
[daemon]
interfaces = ["eth0"]
bpffs_dir = "/sys/fs/bpf/lbtest"

[[service]]
name = "web"
vip = "203.0.113.10"
port = 80
protocol = "tcp"

[service.health]
check = "http"
path = "/healthz"

[[service.backend]]
address = "192.0.2.11"

[[service.backend]]
address = "192.0.2.12"
weight = 50
"#;

fn problems(src: &str) -> Vec<Problem> {
    parse(src).expect_err("config should be rejected")
}

#[test]
fn good_config_with_defaults() {
    let c = parse(GOOD).unwrap().config;
    assert_eq!(c.daemon.socket, PathBuf::from(DEFAULT_SOCKET));
    assert_eq!(c.daemon.bpffs_dir, PathBuf::from("/sys/fs/bpf/lbtest"));
    assert_eq!(c.daemon.conntrack_entries, DEFAULT_CONNTRACK_ENTRIES);
    assert_eq!(c.daemon.xdp_mode, XdpMode::Auto);
    let s = &c.services[0];
    assert_eq!(s.table_size, DEFAULT_TABLE_SIZE);
    assert_eq!(s.forwarding, Forwarding::Dsr);
    assert_eq!(s.hash, HashMode::Source);
    assert_eq!(s.health.check, CheckKind::Http);
    assert_eq!(s.health.port, 80);
    assert_eq!(s.health.interval_ms, 1000);
    assert_eq!(s.backends[0].weight, 100);
    assert_eq!(s.backends[1].weight, 50);
}

#[test]
fn service_without_health_has_no_check() {
    let src = GOOD.replace(
        "[service.health]\ncheck = \"http\"\npath = \"/healthz\"\n",
        "",
    );
    let c = parse(&src).unwrap().config;
    assert_eq!(c.services[0].health.check, CheckKind::None);
}

#[test]
fn type_errors_name_the_key() {
    let p = problems(&GOOD.replace("port = 80", "port = \"eighty\""));
    assert_eq!(p[0].key, "service[0].port", "{p:?}");
    let p = problems(&GOOD.replace("weight = 50", "weight = -1"));
    assert_eq!(p[0].key, "service[0].backend[1].weight", "{p:?}");
    let p = problems(&GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""));
    assert_eq!(p[0].key, "service[0].protocol", "{p:?}");
}

#[test]
fn syntax_error_names_the_line() {
    let p = problems("[daemon]\ninterfaces = [\"eth0\"\n");
    assert_eq!(p.len(), 1);
    assert!(p[0].line.is_some(), "{p:?}");
}

#[test]
fn unknown_key_is_rejected_with_its_line() {
    let src = GOOD.replace("port = 80", "port = 80\ncolour = \"blue\"");
    let p = problems(&src);
    assert!(p[0].message.contains("colour"), "{p:?}");
    assert_eq!(p[0].line, Some(10));
}

#[test]
fn missing_required_keys() {
    assert!(problems("[daemon]\n")[0].message.contains("interfaces"));
    let src = GOOD.replace("protocol = \"tcp\"\n", "");
    assert!(problems(&src)[0].message.contains("protocol"));
    let src = GOOD.replace("address = \"192.0.2.12\"\n", "");
    assert!(problems(&src)[0].message.contains("address"));
}

#[test]
fn every_semantic_problem_is_reported() {
    let src = r#"
[daemon]
interfaces = ["eth0", "eth0"]
hash_seed = "xyz"

[[service]]
name = "web"
vip = "203.0.113.10"
port = 80
protocol = "tcp"
table_size = 65536

[[service.backend]]
address = "2001:db8::1"

[[service]]
name = "web"
vip = "203.0.113.10"
port = 80
protocol = "tcp"
"#;
    let p = problems(src);
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"daemon.interfaces[1]"), "{p:?}");
    assert!(keys.contains(&"daemon.hash_seed"), "{p:?}");
    assert!(keys.contains(&"service[0].table_size"), "{p:?}");
    assert!(keys.contains(&"service[0].backend[0].address"), "{p:?}");
    assert!(keys.contains(&"service[1].name"), "{p:?}");
    assert!(keys.contains(&"service[1].vip"), "{p:?}");
    let table = p.iter().find(|p| p.key == "service[0].table_size").unwrap();
    assert_eq!(table.line, Some(11));
    assert!(table.message.contains("not a prime"));
}

#[test]
fn bad_values() {
    for (from, to, key) in [
        ("port = 80", "port = 70000", ""),
        ("protocol = \"tcp\"", "protocol = \"sctp\"", ""),
        ("vip = \"203.0.113.10\"", "vip = \"203.0.113\"", ""),
        (
            "address = \"192.0.2.12\"",
            "address = \"192.0.2.11\"",
            "service[0].backend[1].address",
        ),
        (
            "weight = 50",
            "weight = 5000000",
            "service[0].backend[1].weight",
        ),
        (
            "path = \"/healthz\"",
            "path = \"healthz\"",
            "service[0].health.path",
        ),
        (
            "check = \"http\"",
            "check = \"http\"\ntimeout_ms = 2000",
            "service[0].health.timeout_ms",
        ),
        (
            "check = \"http\"",
            "check = \"http\"\nrise = 0",
            "service[0].health.rise",
        ),
        (
            "bpffs_dir = \"/sys/fs/bpf/lbtest\"",
            "bpffs_dir = \"relative\"",
            "daemon.bpffs_dir",
        ),
        (
            "port = 80",
            "port = 80\ntable_size = 7\n[[service.backend]]\naddress=\"192.0.2.1\"\n[[service.backend]]\naddress=\"192.0.2.2\"\n[[service.backend]]\naddress=\"192.0.2.3\"\n[[service.backend]]\naddress=\"192.0.2.4\"\n[[service.backend]]\naddress=\"192.0.2.5\"\n[[service.backend]]\naddress=\"192.0.2.6\"",
            "",
        ),
    ] {
        let src = GOOD.replace(from, to);
        assert_ne!(src, GOOD, "replacement {from:?} did not apply");
        let p = problems(&src);
        assert!(p.iter().all(|p| p.line.is_some()), "{p:?}");
        if !key.is_empty() {
            assert!(
                p.iter().any(|p| p.key == key),
                "expected a problem at {key}: {p:?}"
            );
        }
    }
}

#[test]
fn small_table_is_a_warning() {
    let src = GOOD.replace("port = 80", "port = 80\ntable_size = 101");
    let loaded = parse(&src).unwrap();
    assert_eq!(loaded.warnings.len(), 1);
    assert!(loaded.warnings[0].message.contains("balance"));
}

#[test]
fn primes() {
    assert!(is_prime(65_537));
    assert!(is_prime(655_373));
    assert!(!is_prime(65_536));
    assert!(!is_prime(1));
    assert!(is_prime(2));
}

#[test]
fn idle_hold_defaults_to_two_and_a_half_hours_and_is_checked() {
    let c = parse(GOOD).unwrap().config;
    assert_eq!(c.daemon.idle_hold_s, 9_000);
    let src = GOOD.replacen("[daemon]\n", "[daemon]\nidle_hold_s = 0\n", 1);
    assert_eq!(parse(&src).unwrap().config.daemon.idle_hold_s, 0);
    let src = GOOD.replacen("[daemon]\n", "[daemon]\nidle_hold_s = 999999999999\n", 1);
    let p = problems(&src);
    assert_eq!(p[0].key, "daemon.idle_hold_s", "{p:?}");
    assert!(p[0].message.contains("out of range"), "{p:?}");
    let src = GOOD.replacen("[daemon]\n", "[daemon]\nidle_hold_s = -1\n", 1);
    assert_eq!(problems(&src)[0].key, "daemon.idle_hold_s");
}

#[test]
fn new_flow_limit_defaults_to_200000_and_is_checked() {
    let c = parse(GOOD).unwrap().config;
    assert_eq!(c.daemon.new_flow_limit, 200_000);
    let src = GOOD.replacen("[daemon]\n", "[daemon]\nnew_flow_limit = 0\n", 1);
    assert_eq!(parse(&src).unwrap().config.daemon.new_flow_limit, 0);
    let src = GOOD.replacen("[daemon]\n", "[daemon]\nnew_flow_limit = 2000000000\n", 1);
    let p = problems(&src);
    assert_eq!(p[0].key, "daemon.new_flow_limit", "{p:?}");
    assert!(p[0].message.contains("out of range"), "{p:?}");
    let src = GOOD.replacen("[daemon]\n", "[daemon]\nnew_flow_limit = \"lots\"\n", 1);
    assert_eq!(problems(&src)[0].key, "daemon.new_flow_limit");
}

/// GOOD with `[daemon.announce]` holding `body`, placed after `[daemon]`, and the line of
/// `body`'s first line.
fn with_announce(body: &str) -> (String, usize) {
    let at = GOOD.find("[[service]]").unwrap();
    let src = format!(
        "{}[daemon.announce]\n{body}\n\n{}",
        &GOOD[..at],
        &GOOD[at..]
    );
    let line = GOOD[..at].lines().count() + 2;
    (src, line)
}

#[test]
fn node_name_defaults_to_the_host_name_and_announce_is_off_unless_configured() {
    let c = parse(GOOD).unwrap().config;
    assert_eq!(c.daemon.node_name, None);
    assert_eq!(Some(c.daemon.node_name()), host_name());
    assert_eq!(c.daemon.announce, None);
    let src = GOOD.replacen("[daemon]\n", "[daemon]\nnode_name = \"lb1\"\n", 1);
    assert_eq!(parse(&src).unwrap().config.daemon.node_name(), "lb1");
    let p = problems(&GOOD.replacen("[daemon]\n", "[daemon]\nnode_name = \"lb 1\"\n", 1));
    assert_eq!(
        (p[0].key.as_str(), p[0].line),
        ("daemon.node_name", Some(3)),
        "{p:?}"
    );
}

#[test]
fn announce_takes_defaults_and_values() {
    let (src, _) = with_announce("");
    let a = parse(&src).unwrap().config.daemon.announce;
    assert_eq!(
        a,
        Some(Announce {
            table: 100,
            protocol: 200
        })
    );
    let (src, _) = with_announce("table = 4242\nprotocol = 77");
    let a = parse(&src).unwrap().config.daemon.announce.unwrap();
    assert_eq!((a.table, a.protocol), (4242, 77));
    let (src, _) = with_announce("table = 4294967295\nprotocol = 255");
    let a = parse(&src).unwrap().config.daemon.announce.unwrap();
    assert_eq!((a.table, a.protocol), (u32::MAX, 255));
}

#[test]
fn announce_refuses_reserved_tables_and_protocols_naming_key_and_line() {
    for (body, key, says) in [
        ("table = 0", "daemon.announce.table", "reserves"),
        ("table = 254", "daemon.announce.table", "254 main"),
        ("table = 255", "daemon.announce.table", "255 local"),
        ("table = 253", "daemon.announce.table", "253 default"),
        ("table = -1", "daemon.announce.table", "not a routing table"),
        (
            "table = 4294967296",
            "daemon.announce.table",
            "not a routing table",
        ),
        (
            "protocol = 0",
            "daemon.announce.protocol",
            "reserved to the kernel",
        ),
        ("protocol = 2", "daemon.announce.protocol", "2 kernel"),
        ("protocol = 4", "daemon.announce.protocol", "4 static"),
        ("protocol = 12", "daemon.announce.protocol", "BIRD"),
        ("protocol = 186", "daemon.announce.protocol", "bgpd"),
        ("protocol = 256", "daemon.announce.protocol", "5 to 255"),
        ("table = \"main\"", "daemon.announce.table", ""),
    ] {
        let (src, line) = with_announce(body);
        let p = problems(&src);
        assert_eq!(p.len(), 1, "{body}: {p:?}");
        assert_eq!(p[0].key, key, "{body}: {p:?}");
        assert_eq!(p[0].line, Some(line), "{body}: {p:?}");
        assert!(p[0].message.contains(says), "{body}: {p:?}");
    }
}

#[test]
fn announce_unknown_key_is_named_with_its_line() {
    let (src, line) = with_announce("table = 100\nmetric = 5");
    let p = problems(&src);
    assert!(p[0].message.contains("metric"), "{p:?}");
    assert_eq!(p[0].line, Some(line + 1), "{p:?}");
    assert_eq!(p[0].key, "daemon.announce.metric", "{p:?}");
    let p = problems(&GOOD.replacen("[daemon]\n", "[daemon]\nnode = \"lb1\"\n", 1));
    assert!(p[0].message.contains("node"), "{p:?}");
    assert_eq!(p[0].key, "daemon.node", "{p:?}");
}

/// GOOD with `[daemon.sync]` holding `body`, and the line of `body`'s first line.
fn with_sync(body: &str) -> (String, usize) {
    let at = GOOD.find("[[service]]").unwrap();
    let src = format!("{}[daemon.sync]\n{body}\n\n{}", &GOOD[..at], &GOOD[at..]);
    let line = GOOD[..at].lines().count() + 2;
    (src, line)
}

#[test]
fn sync_takes_its_addresses_and_key_file() {
    assert_eq!(parse(GOOD).unwrap().config.daemon.sync, None);
    let (src, _) = with_sync(
        "listen = \"192.0.2.1:9918\"\npeers = [\"192.0.2.2:9918\", \"[2001:db8::3]:9918\"]\nkey_file = \"/etc/lb/sync.key\"",
    );
    let s = parse(&src).unwrap().config.daemon.sync.unwrap();
    assert_eq!(s.listen, "192.0.2.1:9918".parse().unwrap());
    assert_eq!(
        s.peers,
        vec![
            "192.0.2.2:9918".parse().unwrap(),
            "[2001:db8::3]:9918".parse().unwrap()
        ]
    );
    assert_eq!(s.key_file, PathBuf::from("/etc/lb/sync.key"));
}

#[test]
fn sync_refuses_bad_addresses_peers_and_key_files_naming_key_and_line() {
    let listen = "listen = \"192.0.2.1:9918\"";
    let peers = "peers = [\"192.0.2.2:9918\"]";
    let key = "key_file = \"/etc/lb/sync.key\"";
    for (body, key_name, line_offset, says) in [
        (
            format!("listen = \"192.0.2.1\"\n{peers}\n{key}"),
            "daemon.sync.listen",
            0,
            "with a port",
        ),
        (
            format!("listen = \"0.0.0.0:9918\"\n{peers}\n{key}"),
            "daemon.sync.listen",
            0,
            "with a port",
        ),
        (
            format!("{peers}\n{key}"),
            "daemon.sync.listen",
            -1,
            "required",
        ),
        (
            format!("{listen}\n{key}"),
            "daemon.sync.peers",
            -1,
            "required",
        ),
        (
            format!("{listen}\npeers = []\n{key}"),
            "daemon.sync.peers",
            1,
            "empty",
        ),
        (
            format!("{listen}\npeers = [\"192.0.2.1:9918\"]\n{key}"),
            "daemon.sync.peers",
            1,
            "own `listen`",
        ),
        (
            format!("{listen}\npeers = [\"192.0.2.2:9918\", \"192.0.2.2:9918\"]\n{key}"),
            "daemon.sync.peers",
            1,
            "twice",
        ),
        (
            format!("{listen}\n{peers}\nkey_file = \"sync.key\""),
            "daemon.sync.key_file",
            2,
            "absolute",
        ),
        (
            format!("{listen}\n{peers}"),
            "daemon.sync.key_file",
            -1,
            "64 hex digits",
        ),
    ] {
        let (src, line) = with_sync(&body);
        let p = problems(&src);
        assert_eq!(p.len(), 1, "{body}: {p:?}");
        assert_eq!(p[0].key, key_name, "{body}: {p:?}");
        assert_eq!(
            p[0].line,
            Some((line as i64 + line_offset) as usize),
            "{body}: {p:?}"
        );
        assert!(p[0].message.contains(says), "{body}: {p:?}");
    }
    let (src, line) = with_sync(&format!("{listen}\n{peers}\n{key}\nport = 1"));
    let p = problems(&src);
    assert_eq!(p[0].key, "daemon.sync.port", "{p:?}");
    assert_eq!(p[0].line, Some(line + 3), "{p:?}");
}

/// GOOD with its health table replaced by `health` (the lines after `[service.health]`).
fn with_health(health: &str) -> String {
    GOOD.replace(
        "check = \"http\"\npath = \"/healthz\"\n",
        &format!("{health}\n"),
    )
}

fn health_of(health: &str) -> Health {
    let src = with_health(health);
    match parse(&src) {
        Ok(l) => l.config.services[0].health.clone(),
        Err(p) => panic!("{health:?} rejected: {p:?}"),
    }
}

#[test]
fn every_check_kind_with_its_keys() {
    let h = health_of(
        "check = \"https\"\npath = \"/up\"\nexpect = 204\ntls_verify = true\nsni = \"app.example\"\nca_file = \"/etc/lb/ca.pem\"",
    );
    assert_eq!(h.check, CheckKind::Https);
    assert_eq!(
        (h.path.as_str(), h.expect, h.tls_verify),
        ("/up", 204, true)
    );
    assert_eq!(h.sni.as_deref(), Some("app.example"));
    assert_eq!(h.ca_file, Some(PathBuf::from("/etc/lb/ca.pem")));
    let h = health_of("check = \"https\"");
    assert!(!h.tls_verify && h.sni.is_none() && h.ca_file.is_none());

    let h = health_of("check = \"udp\"\nsend = \"ping\\n\"");
    assert_eq!(h.send, Payload::Text("ping\n".into()));
    assert_eq!(h.expect_hex, None);
    let h = health_of("check = \"udp\"\nsend_hex = \"DE ad:be\"\nexpect_hex = \"ff00\"");
    assert_eq!(h.send, Payload::Hex(vec![0xde, 0xad, 0xbe]));
    assert_eq!(h.expect_hex, Some(vec![0xff, 0]));

    let h = health_of("check = \"dns\"");
    assert_eq!((h.query_name.as_str(), h.query_type.as_str()), (".", "NS"));
    let h = health_of("check = \"dns\"\nquery_name = \"health.example.\"");
    assert_eq!(
        (h.query_name.as_str(), h.query_type.as_str()),
        ("health.example.", "A")
    );
    let h = health_of("check = \"dns\"\nquery_name = \"x.example\"\nquery_type = \"aaaa\"");
    assert_eq!(h.query_type, "AAAA");

    let h = health_of("check = \"pgsql\"");
    assert_eq!(
        (h.user.as_str(), h.database.as_str(), h.role),
        ("lb", "postgres", None)
    );
    let h = health_of(
        "check = \"pgsql\"\nuser = \"monitor\"\ndatabase = \"app\"\nrole = \"replica\"\npassword_file = \"/etc/lb/pg.pass\"",
    );
    assert_eq!((h.user.as_str(), h.database.as_str()), ("monitor", "app"));
    assert_eq!(h.role, Some(Role::Replica));
    assert_eq!(h.password_file, Some(PathBuf::from("/etc/lb/pg.pass")));

    let h = health_of("check = \"redis\"");
    assert_eq!((h.role, h.password_file.clone()), (None, None));
    let h =
        health_of("check = \"redis\"\nrole = \"master\"\npassword_file = \"/etc/lb/redis.pass\"");
    assert_eq!(h.role, Some(Role::Master));

    let h = health_of("check = \"exec\"\ncommand = [\"/usr/local/bin/check\", \"--fast\"]");
    assert_eq!(h.command, ["/usr/local/bin/check", "--fast"]);
    assert_eq!(h.user, "nobody");
    let h = health_of(
        "check = \"exec\"\ncommand = [\"/bin/true\"]\nuser = \"lbcheck\"\ntimeout_ms = 200",
    );
    assert_eq!((h.user.as_str(), h.timeout_ms), ("lbcheck", 200));
}

#[test]
fn bad_health_keys_are_named_with_their_line() {
    // (health table, key named, words the message must hold)
    let cases: &[(&str, &str, &str)] = &[
        ("check = \"ftp\"", "check", "unknown variant"),
        (
            "check = \"tcp\"\npath = \"/x\"",
            "path",
            "belongs to check = \"http\" or \"https\"",
        ),
        (
            "check = \"tcp\"\nexpect = 200",
            "expect",
            "not a key of check = \"tcp\"",
        ),
        (
            "check = \"http\"\ntls_verify = true",
            "tls_verify",
            "\"https\"",
        ),
        ("check = \"http\"\nsni = \"a.example\"", "sni", "\"https\""),
        ("check = \"dns\"\nsend = \"x\"", "send", "\"udp\""),
        (
            "check = \"udp\"\nsend = \"x\"\nquery_name = \"a.\"",
            "query_name",
            "\"dns\"",
        ),
        (
            "check = \"redis\"\nuser = \"x\"",
            "user",
            "\"pgsql\" or \"exec\"",
        ),
        (
            "check = \"exec\"\ncommand = [\"/bin/true\"]\ndatabase = \"x\"",
            "database",
            "\"pgsql\"",
        ),
        (
            "check = \"http\"\nrole = \"master\"",
            "role",
            "\"pgsql\" or \"redis\"",
        ),
        (
            "check = \"exec\"\ncommand = [\"/bin/true\"]\npassword_file = \"/p\"",
            "password_file",
            "\"pgsql\" or \"redis\"",
        ),
        (
            "check = \"pgsql\"\ncommand = [\"/bin/true\"]",
            "command",
            "\"exec\"",
        ),
        ("check = \"tcp\"\nfoo = 1", "foo", "unknown field"),
        (
            "check = \"https\"\npath = \"x\"",
            "path",
            "must start with '/'",
        ),
        (
            "check = \"https\"\nexpect = 99",
            "expect",
            "not an HTTP status",
        ),
        (
            "check = \"https\"\ntls_verify = \"yes\"",
            "tls_verify",
            "invalid type",
        ),
        (
            "check = \"https\"\nsni = \"192.0.2.1\"",
            "sni",
            "IP address",
        ),
        (
            "check = \"https\"\nsni = \"bad name!\"",
            "sni",
            "not a DNS name",
        ),
        (
            "check = \"https\"\ntls_verify = true\nca_file = \"ca.pem\"",
            "ca_file",
            "absolute",
        ),
        (
            "check = \"https\"\nca_file = \"/ca.pem\"",
            "ca_file",
            "tls_verify = true",
        ),
        ("check = \"udp\"", "send", "required"),
        (
            "check = \"udp\"\nsend = \"a\"\nsend_hex = \"61\"",
            "send_hex",
            "not both",
        ),
        (
            "check = \"udp\"\nsend_hex = \"abc\"",
            "send_hex",
            "hex digits",
        ),
        (
            "check = \"udp\"\nsend_hex = \"zz\"",
            "send_hex",
            "hex digits",
        ),
        (
            "check = \"udp\"\nsend = \"a\"\nexpect_hex = \"1\"",
            "expect_hex",
            "hex digits",
        ),
        (
            "check = \"dns\"\nquery_name = \"\"",
            "query_name",
            "not a domain name",
        ),
        (
            "check = \"dns\"\nquery_name = \"a..b\"",
            "query_name",
            "not a domain name",
        ),
        (
            "check = \"dns\"\nquery_type = \"BOGUS\"",
            "query_type",
            "record type",
        ),
        (
            "check = \"pgsql\"\nuser = \"\"",
            "user",
            "PostgreSQL role name",
        ),
        (
            "check = \"pgsql\"\ndatabase = \"\"",
            "database",
            "database name",
        ),
        (
            "check = \"pgsql\"\nrole = \"master\"",
            "role",
            "\"primary\" or \"replica\"",
        ),
        (
            "check = \"pgsql\"\nrole = \"leader\"",
            "role",
            "unknown variant",
        ),
        (
            "check = \"pgsql\"\nrole = \"primary\"",
            "password_file",
            "required with `role`",
        ),
        (
            "check = \"pgsql\"\npassword_file = \"pass\"",
            "password_file",
            "absolute",
        ),
        (
            "check = \"redis\"\nrole = \"primary\"",
            "role",
            "\"master\" or \"replica\"",
        ),
        (
            "check = \"redis\"\npassword_file = \"./p\"",
            "password_file",
            "absolute",
        ),
        ("check = \"exec\"", "command", "required"),
        ("check = \"exec\"\ncommand = []", "command", "empty"),
        (
            "check = \"exec\"\ncommand = [\"check\"]",
            "command",
            "absolute path",
        ),
        (
            "check = \"exec\"\ncommand = \"/bin/true\"",
            "command",
            "invalid type",
        ),
        (
            "check = \"exec\"\ncommand = [\"/bin/true\"]\nuser = \"-x\"",
            "user",
            "user name",
        ),
        (
            "check = \"exec\"\ncommand = [\"/bin/true\"]\nuser = \"a b\"",
            "user",
            "user name",
        ),
    ];
    for (health, key, words) in cases {
        let src = with_health(health);
        let p = problems(&src);
        let want = format!("service[0].health.{key}");
        let hit = p.iter().find(|p| p.key == want);
        let Some(hit) = hit else {
            panic!("{health:?}: no problem at {want}: {p:?}");
        };
        assert!(
            hit.message.contains(words),
            "{health:?}: {:?} does not say {words:?}",
            hit.message
        );
        // The line is the key's own, or (for a missing key) one of its table.
        let line = hit.line.expect("a line");
        let text = src.lines().nth(line - 1).unwrap();
        assert!(
            text.starts_with(key)
                || text == "[service.health]"
                || health.lines().any(|l| l == text),
            "{health:?}: line {line} is {text:?}"
        );
    }
}

#[test]
fn health_options_are_checked_by_the_same_rules() {
    let h = parse_health("check = \"redis\"\nrole = \"replica\"\n", 6379).unwrap();
    assert_eq!(
        (h.check, h.port, h.role),
        (CheckKind::Redis, 6379, Some(Role::Replica))
    );
    let p = parse_health("check = \"tcp\"\npath = \"/x\"\n", 80).unwrap_err();
    assert_eq!(p[0].key, "health.path");
    assert_eq!(p[0].line, None);
    let p = parse_health("check = \"exec\"\n", 80).unwrap_err();
    assert_eq!(p[0].key, "health.command");
    let p = parse_health("check = \"pgsql\"\nbogus = 1\n", 80).unwrap_err();
    assert_eq!(p[0].key, "health.bogus");
}

/// The client filters: prefixes of either family (the VIP's), single addresses as /32 or /128,
/// and every mistake named with its entry and line.
#[test]
fn client_filters_parse_and_every_mistake_is_named() {
    let with = |lists: &str| {
        GOOD.replace(
            "protocol = \"tcp\"\n",
            &format!("protocol = \"tcp\"\n{lists}"),
        )
    };
    let c = parse(&with(
        "allow = [\"198.51.100.0/24\", \"192.0.2.0/28\"]\ndeny = [\"198.51.100.66\"]\n",
    ))
    .unwrap()
    .config;
    let s = &c.services[0];
    let shown: Vec<String> = s.allow.iter().map(|p| p.to_string()).collect();
    assert_eq!(shown, ["198.51.100.0/24", "192.0.2.0/28"]);
    assert_eq!(s.deny[0].to_string(), "198.51.100.66/32");
    assert!(
        c.summary().contains("allow 2 prefixes, deny 1 prefix"),
        "{}",
        c.summary()
    );

    // Host bits set: which prefix was meant.
    let p = problems(&with("allow = [\"198.51.100.7/24\"]\n"));
    assert_eq!(p[0].key, "service[0].allow[0]", "{p:?}");
    assert_eq!(p[0].line, Some(11), "{p:?}");
    assert!(
        p[0].message.contains("did you mean 198.51.100.0/24"),
        "{p:?}"
    );
    // Bad syntax, a length out of range.
    let p = problems(&with(
        "deny = [\"192.0.2.0/24\", \"lb1\", \"192.0.2.0/33\"]\n",
    ));
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p[0].key, "service[0].deny[1]", "{p:?}");
    assert!(p[0].message.contains("not an address or a prefix"), "{p:?}");
    assert_eq!(p[1].key, "service[0].deny[2]", "{p:?}");
    assert!(p[1].message.contains("0 to 32"), "{p:?}");
    // The other family than the VIP's.
    let p = problems(&with("allow = [\"2001:db8::/32\"]\n"));
    assert_eq!(p[0].key, "service[0].allow[0]", "{p:?}");
    assert!(
        p[0].message.contains("VIP's address family (203.0.113.10)"),
        "{p:?}"
    );
    // Twice in one list, and in both lists.
    let p = problems(&with("deny = [\"192.0.2.0/24\", \"192.0.2.0/24\"]\n"));
    assert_eq!(p[0].key, "service[0].deny[1]", "{p:?}");
    assert!(
        p[0].message.contains("listed twice (first on line 11)"),
        "{p:?}"
    );
    let p = problems(&with(
        "allow = [\"192.0.2.0/24\"]\ndeny = [\"192.0.2.0/24\"]\n",
    ));
    assert_eq!(p[0].key, "service[0].allow", "{p:?}");
    assert!(p[0].message.contains("also in deny (line 12)"), "{p:?}");
    // Not a list of strings.
    let p = problems(&with("allow = \"192.0.2.0/24\"\n"));
    assert!(p[0].key.starts_with("service[0].allow"), "{p:?}");
    // An empty list is no list, with a warning.
    let loaded = parse(&with("allow = []\n")).unwrap();
    assert!(loaded.config.services[0].allow.is_empty());
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.key == "service[0].allow" && w.message.contains("allows every client")),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn client_filters_over_every_service_fit_the_data_path() {
    let many: Vec<String> = (0..=lb_common::MAX_FILTER_PREFIXES / 2)
        .map(|i| format!("\"10.{}.{}.{}/32\"", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    let list = many.join(",");
    let v4 = |name: &str, vip: &str| {
        format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\ndeny = [{list}]\n"
        )
    };
    let src = format!(
        "[daemon]\ninterfaces = [\"eth0\"]\n{}{}",
        v4("a", "203.0.113.1"),
        v4("b", "203.0.113.2")
    );
    let p = problems(&src);
    assert_eq!(p.len(), 1, "{:?}", &p[..p.len().min(3)]);
    assert_eq!(p[0].key, "service.allow, service.deny");
    assert!(
        p[0].message
            .contains(&format!("at most {}", lb_common::MAX_FILTER_PREFIXES)),
        "{p:?}"
    );
    // One service alone may hold half of them, or 10,000 and more.
    let one = format!(
        "[daemon]\ninterfaces = [\"eth0\"]\n{}",
        v4("a", "203.0.113.1")
    );
    assert_eq!(
        parse(&one).unwrap().config.services[0].deny.len(),
        many.len()
    );
}

#[test]
fn nat_takes_backend_ports_and_other_forwardings_refuse_a_different_one() {
    let nat = GOOD
        .replace(
            "protocol = \"tcp\"\n",
            "protocol = \"tcp\"\nforwarding = \"nat\"\n",
        )
        .replace(
            "address = \"192.0.2.11\"\n",
            "address = \"192.0.2.11\"\nport = 8080\n",
        );
    let c = parse(&nat).unwrap().config;
    let s = &c.services[0];
    assert_eq!(s.forwarding, Forwarding::Nat);
    assert_eq!(s.backends[0].port, Some(8080));
    assert_eq!(s.backends[0].port_or(s.port), 8080);
    assert_eq!(s.backends[1].port, None);
    assert_eq!(s.backends[1].port_or(s.port), 80);
    assert!(
        !s.health.port_given,
        "the health port defaults to each backend's"
    );

    // dsr (the default) and tunnel cannot move a packet to another port: the key, its line,
    // and why.
    for forwarding in ["", "forwarding = \"tunnel\"\n"] {
        let src = GOOD
            .replace(
                "protocol = \"tcp\"\n",
                &format!("protocol = \"tcp\"\n{forwarding}"),
            )
            .replace(
                "address = \"192.0.2.12\"\n",
                "address = \"192.0.2.12\"\nport = 8080\n",
            );
        let p = problems(&src);
        let port = p
            .iter()
            .find(|p| p.key == "service[0].backend[1].port")
            .unwrap_or_else(|| panic!("{p:?}"));
        let line = src.lines().position(|l| l == "port = 8080").map(|i| i + 1);
        assert_eq!(port.line, line, "{port:?}");
        assert!(
            port.message.contains("differs from the service's port 80")
                && port.message.contains("nat"),
            "{}",
            port.message
        );
    }
    // The service's own port is accepted with any forwarding.
    let same = GOOD.replace(
        "address = \"192.0.2.12\"\n",
        "address = \"192.0.2.12\"\nport = 80\n",
    );
    assert!(parse(&same).is_ok());
    // Port 0 is no port to serve on.
    let zero = nat.replace("port = 8080", "port = 0");
    let p = problems(&zero);
    assert!(
        p.iter().any(|p| p.key == "service[0].backend[0].port"),
        "{p:?}"
    );
}

/// A NAT config with 192.0.2.11 on `ports` (None: no `port` key) and 192.0.2.12.
fn nat_on_ports(ports: &[Option<u16>]) -> String {
    let mut backends = String::new();
    for p in ports {
        backends.push_str("\n[[service.backend]]\naddress = \"192.0.2.11\"\n");
        if let Some(p) = p {
            backends.push_str(&format!("port = {p}\n"));
        }
    }
    GOOD.replace(
        "protocol = \"tcp\"\n",
        "protocol = \"tcp\"\nforwarding = \"nat\"\n",
    )
    .replace(
        "\n[[service.backend]]\naddress = \"192.0.2.11\"\n",
        &backends,
    )
}

#[test]
fn a_nat_host_may_serve_on_several_ports_each_listed_once() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let c = parse(&nat_on_ports(&[Some(8080), Some(8081), None]))
        .unwrap()
        .config;
    let s = &c.services[0];
    assert_eq!(s.backends.len(), 4);
    let ports: Vec<u16> = s.backends.iter().map(|b| b.port_or(s.port)).collect();
    assert_eq!(ports, [8080, 8081, 80, 80]);
    // Names: the repeated address with its port, the others as always.
    let names: Vec<String> = s.backends.iter().map(|b| s.backend_name(b)).collect();
    assert_eq!(
        names,
        [
            "192.0.2.11:8080",
            "192.0.2.11:8081",
            "192.0.2.11:80",
            "192.0.2.12"
        ]
    );
    // What lbctl names: a bare repeated address is ambiguous and says which ports there are.
    let e = s.select(ip("192.0.2.11"), None).unwrap_err();
    assert!(matches!(e, NoBackend::Ambiguous { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("3 backends at 192.0.2.11")
            && text.contains("ports 8080, 8081, 80")
            && text.contains("--port"),
        "{text}"
    );
    assert_eq!(
        s.select(ip("192.0.2.11"), Some(8081)).unwrap().port,
        Some(8081)
    );
    assert_eq!(s.select(ip("192.0.2.11"), Some(80)).unwrap().port, None);
    assert_eq!(s.select(ip("192.0.2.12"), None).unwrap().weight, 50);
    assert_eq!(s.select(ip("192.0.2.12"), Some(80)).unwrap().weight, 50);
    let missing = s.select(ip("192.0.2.11"), Some(9)).unwrap_err().to_string();
    assert!(missing.contains("no backend 192.0.2.11:9"), "{missing}");
    assert!(
        s.select(ip("192.0.2.12"), Some(8080)).is_err(),
        "a port it does not serve on"
    );

    // The same address and port twice: refused, naming both lines; no `port` and the
    // service's port are the same port.
    for ports in [[Some(8080), Some(8080)], [None, Some(80)]] {
        let src = nat_on_ports(&ports);
        let p = problems(&src);
        assert_eq!(p.len(), 1, "{p:?}");
        let first = src
            .lines()
            .position(|l| l == "address = \"192.0.2.11\"")
            .unwrap()
            + 1;
        assert_eq!(p[0].key, "service[0].backend[1].address");
        assert_eq!(p[0].line, Some(first + 2 + ports[0].is_some() as usize + 1));
        assert!(
            p[0].message.contains(&format!("first on line {first}"))
                && p[0]
                    .message
                    .contains(&format!("port {}", ports[1].unwrap())),
            "{}",
            p[0].message
        );
    }
    // dsr and tunnel: an address is listed once (its port is the service's).
    let src = GOOD.replace("address = \"192.0.2.12\"", "address = \"192.0.2.11\"");
    let p = problems(&src);
    let first = src
        .lines()
        .position(|l| l == "address = \"192.0.2.11\"")
        .unwrap()
        + 1;
    assert!(
        p.len() == 1
            && p[0].message.contains(&format!(
                "listed twice in this service (first on line {first})"
            )),
        "{p:?}"
    );
}

#[test]
fn nat_entries_defaults_and_is_checked() {
    let c = parse(GOOD).unwrap().config;
    assert_eq!(c.daemon.nat_entries, lb_common::nat::NAT_ENTRIES);
    let set = |v: &str| GOOD.replace("[daemon]\n", &format!("[daemon]\nnat_entries = {v}\n"));
    assert_eq!(parse(&set("4096")).unwrap().config.daemon.nat_entries, 4096);
    for bad in ["0", "1023", "16777217"] {
        let p = problems(&set(bad));
        let e = p
            .iter()
            .find(|p| p.key == "daemon.nat_entries")
            .unwrap_or_else(|| panic!("{bad}: {p:?}"));
        assert_eq!(e.line, Some(3), "{e:?}");
        assert!(e.message.contains("1024 to 16777216"), "{}", e.message);
    }
}

/// The NAT tables are made whole when lbd starts: `daemon.nat_entries` when a service uses
/// `nat` or the file sets it, else the smallest size (no NAT flow to hold).
#[test]
fn nat_tables_are_small_unless_nat_is_used_or_sized() {
    use lb_common::nat::{MIN_NAT_ENTRIES, NAT_ENTRIES};
    let c = parse(GOOD).unwrap().config;
    assert!(!c.daemon.nat_entries_set);
    assert_eq!(c.nat_tables(), MIN_NAT_ENTRIES, "no nat service");
    let nat = GOOD.replace(
        "protocol = \"tcp\"\n",
        "protocol = \"tcp\"\nforwarding = \"nat\"\n",
    );
    assert_eq!(
        parse(&nat).unwrap().config.nat_tables(),
        NAT_ENTRIES,
        "a nat service"
    );
    let set = |src: &str, v: &str| {
        let c = parse(&src.replace("[daemon]\n", &format!("[daemon]\nnat_entries = {v}\n")))
            .unwrap()
            .config;
        assert!(c.daemon.nat_entries_set);
        c.nat_tables()
    };
    assert_eq!(set(GOOD, "4096"), 4096, "set, no nat service");
    assert_eq!(set(&nat, "4096"), 4096, "set, a nat service");
    assert_eq!(set(GOOD, "262144"), NAT_ENTRIES, "set to the default");
}
