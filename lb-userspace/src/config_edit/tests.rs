use super::*;
use crate::config::Protocol;

const ORIGINAL: &str = r#"# lb configuration for the edge pair.
# Managed by hand and by lbctl.

[daemon]
interfaces  = ["eth0"]                # uplink
xdp_mode    = "auto"
bpffs_dir   = "/sys/fs/bpf/lbtest"    # test pin dir

# ---------------------------------------------------------------
# Services
# ---------------------------------------------------------------

# The public web front.
[[service]]
vip      = "203.0.113.10"   # anycast VIP
name     = "web"
protocol = "tcp"
port     = 80

# HTTP check against the app's health endpoint.
[service.health]
path  = "/healthz"    # served by every app node
check = "http"

# rack A
[[service.backend]]
address = "192.0.2.11"  # web-a1
weight  = 50  # half

# rack B
[[service.backend]]
weight = 100
address = "192.0.2.12"  # web-b1

[[service.backend]]
address = "192.0.2.13"
mac = "02:00:00:00:0b:03"   # static neighbour

# DNS over UDP, IPv6 only.
[[service]]
name = "dns"
vip = "2001:db8::53"
port = 53
protocol = "udp"

[[service.backend]]
address = "2001:0db8::1"   # ns1

[[service.backend]]
address = "2001:db8::2"    # ns2

# end of file
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn file(text: &str) -> ConfigFile {
    ConfigFile::from_text(Path::new("/nonexistent/lb.toml"), text).unwrap()
}

/// (service, [(address, weight)]) as the edited text parses.
fn summary(text: &str) -> Vec<(String, Vec<(IpAddr, u32)>)> {
    let c = config::parse(text)
        .unwrap_or_else(|p| panic!("edited text is invalid: {p:?}\n{text}"))
        .config;
    c.services
        .into_iter()
        .map(|s| {
            let b = s.backends.iter().map(|b| (b.address, b.weight)).collect();
            (s.name, b)
        })
        .collect()
}

fn comments(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.find('#').map(|i| l[i..].to_owned()))
        .collect()
}

/// Every comment of the original except `gone` is still in `text`, verbatim and in order.
fn assert_comments_kept(text: &str, gone: &[&str]) {
    let now = comments(text);
    let expected: Vec<String> = comments(ORIGINAL)
        .into_iter()
        .filter(|c| !gone.iter().any(|g| c.contains(g)))
        .collect();
    assert_eq!(now, expected, "comments changed:\n{text}");
}

fn web(weights: &[(&str, u32)]) -> (String, Vec<(IpAddr, u32)>) {
    (
        "web".into(),
        weights.iter().map(|(a, w)| (ip(a), *w)).collect(),
    )
}

fn dns(weights: &[(&str, u32)]) -> (String, Vec<(IpAddr, u32)>) {
    (
        "dns".into(),
        weights.iter().map(|(a, w)| (ip(a), *w)).collect(),
    )
}

#[test]
fn untouched_file_renders_verbatim() {
    assert_eq!(file(ORIGINAL).text(), ORIGINAL);
    summary(ORIGINAL);
}

#[test]
fn set_weight_keeps_the_trailing_comment_and_alignment() {
    let mut f = file(ORIGINAL);
    f.set_weight("web", ip("192.0.2.11"), 75).unwrap();
    let text = f.text();
    assert_eq!(
        text,
        ORIGINAL.replace("weight  = 50  # half", "weight  = 75  # half")
    );
    assert_eq!(
        summary(&text),
        vec![
            web(&[("192.0.2.11", 75), ("192.0.2.12", 100), ("192.0.2.13", 100)]),
            dns(&[("2001:db8::1", 100), ("2001:db8::2", 100)])
        ]
    );
}

#[test]
fn set_weight_keeps_the_comment_column() {
    let src = ORIGINAL.replace("weight  = 50  # half", "weight  = 50       # half");
    let mut f = file(&src);
    f.set_weight("web", ip("192.0.2.11"), 5).unwrap();
    assert!(
        f.text().contains("weight  = 5        # half\n"),
        "{}",
        f.text()
    );
    f.set_weight("web", ip("192.0.2.11"), 123_456).unwrap();
    assert!(
        f.text().contains("weight  = 123456   # half\n"),
        "{}",
        f.text()
    );
    f.set_weight("web", ip("192.0.2.11"), 12_345_678).unwrap();
    assert!(
        f.text().contains("weight  = 12345678 # half\n"),
        "{}",
        f.text()
    );
    // No space left: one stays.
    f.set_weight("web", ip("192.0.2.11"), 1_234_567_890)
        .unwrap();
    assert!(
        f.text().contains("weight  = 1234567890 # half\n"),
        "{}",
        f.text()
    );
}

#[test]
fn new_tables_follow_an_indented_aligned_layout() {
    let src = "[daemon]\ninterfaces = [\"eth0\"]\n\n[[service]]\nname = \"web\"\n\
                   vip = \"203.0.113.10\"\nport = 80\nprotocol = \"tcp\"\n\n  [[service.backend]]\n  \
                   address = \"192.0.2.11\"\n  weight  = 100   # share\n";
    let mut f = file(src);
    f.add_backend(
        "web",
        &Backend {
            address: ip("192.0.2.12"),
            weight: 30,
            mac: None,
            port: None,
        },
    )
    .unwrap();
    assert_eq!(
        f.text(),
        format!("{src}\n  [[service.backend]]\n  address = \"192.0.2.12\"\n  weight  = 30\n")
    );
}

#[test]
fn set_weight_adds_a_key_after_the_address() {
    let mut f = file(ORIGINAL);
    f.set_weight("web", ip("192.0.2.13"), 0).unwrap();
    // Matched as an address: the file spells it 2001:0db8::1.
    f.set_weight("dns", ip("2001:db8::1"), 20).unwrap();
    let text = f.text();
    let expected = ORIGINAL
        .replace(
            "address = \"192.0.2.13\"\nmac",
            "address = \"192.0.2.13\"\nweight = 0\nmac",
        )
        .replace(
            "address = \"2001:0db8::1\"   # ns1\n",
            "address = \"2001:0db8::1\"   # ns1\nweight = 20\n",
        );
    assert_eq!(text, expected);
    let c = config::parse(&text).unwrap().config;
    assert_eq!(c.services[0].backends[2].weight, 0);
    assert_eq!(c.services[0].backends[2].mac, Some([2, 0, 0, 0, 0x0b, 3]));
    assert_eq!(
        summary(&text),
        vec![
            web(&[("192.0.2.11", 50), ("192.0.2.12", 100), ("192.0.2.13", 0)]),
            dns(&[("2001:db8::1", 20), ("2001:db8::2", 100)])
        ]
    );
    assert_comments_kept(&text, &[]);
}

#[test]
fn set_weight_follows_an_aligned_layout() {
    let src = ORIGINAL.replace(
        "address = \"192.0.2.13\"\nmac = ",
        "address   = \"192.0.2.13\"\nmac       = ",
    );
    let mut f = file(&src);
    f.set_weight("web", ip("192.0.2.13"), 7).unwrap();
    assert!(
        f.text()
            .contains("address   = \"192.0.2.13\"\nweight    = 7\nmac       = "),
        "{}",
        f.text()
    );
}

#[test]
fn remove_backend_takes_its_table_and_leading_comments_only() {
    let mut f = file(ORIGINAL);
    f.remove_backend("web", ip("192.0.2.12")).unwrap();
    let text = f.text();
    let removed =
        "\n# rack B\n[[service.backend]]\nweight = 100\naddress = \"192.0.2.12\"  # web-b1\n";
    assert!(ORIGINAL.contains(removed));
    assert_eq!(text, ORIGINAL.replacen(removed, "", 1));
    assert_eq!(
        summary(&text),
        vec![
            web(&[("192.0.2.11", 50), ("192.0.2.13", 100)]),
            dns(&[("2001:db8::1", 100), ("2001:db8::2", 100)])
        ]
    );
    assert_comments_kept(&text, &["rack B", "web-b1"]);

    f.remove_backend("dns", ip("2001:db8::2")).unwrap();
    let text = f.text();
    assert_eq!(
        text,
        ORIGINAL.replacen(removed, "", 1).replacen(
            "\n[[service.backend]]\naddress = \"2001:db8::2\"    # ns2\n",
            "",
            1
        )
    );
    assert_comments_kept(&text, &["rack B", "web-b1", "ns2"]);
}

#[test]
fn removing_every_backend_leaves_a_valid_service() {
    let mut f = file(ORIGINAL);
    f.remove_backend("dns", ip("2001:db8::1")).unwrap();
    f.remove_backend("dns", ip("2001:db8::2")).unwrap();
    let text = f.text();
    assert_eq!(summary(&text)[1], dns(&[]));
    assert!(
        text.ends_with("protocol = \"udp\"\n\n# end of file\n"),
        "{text}"
    );
    // And one can be added back.
    f.add_backend(
        "dns",
        &Backend {
            address: ip("2001:db8::9"),
            weight: 100,
            mac: None,
            port: None,
        },
    )
    .unwrap();
    assert_eq!(summary(&f.text())[1], dns(&[("2001:db8::9", 100)]));
}

#[test]
fn remove_service_keeps_the_section_comment_above_it() {
    let mut f = file(ORIGINAL);
    f.remove_service("web").unwrap();
    let text = f.text();
    let start = ORIGINAL.find("# The public web front.").unwrap();
    let end = ORIGINAL.find("# DNS over UDP").unwrap();
    let expected = format!("{}{}", &ORIGINAL[..start], &ORIGINAL[end..]);
    assert_eq!(text, expected);
    assert_eq!(
        summary(&text),
        vec![dns(&[("2001:db8::1", 100), ("2001:db8::2", 100)])]
    );
    assert_comments_kept(
        &text,
        &[
            "public web",
            "anycast",
            "half",
            "HTTP check",
            "served by",
            "rack",
            "web-",
            "static",
        ],
    );
}

#[test]
fn remove_last_service() {
    let mut f = file(ORIGINAL);
    f.remove_service("dns").unwrap();
    let text = f.text();
    let start = ORIGINAL.find("\n# DNS over UDP").unwrap();
    let end = ORIGINAL.find("\n# end of file").unwrap();
    let expected = format!("{}{}", &ORIGINAL[..start], &ORIGINAL[end..]);
    assert_eq!(text, expected);
    f.remove_service("web").unwrap();
    let text = f.text();
    assert!(summary(&text).is_empty());
    assert!(text.contains("# Services"), "{text}");
    assert!(text.ends_with("# end of file\n"), "{text}");
}

#[test]
fn a_blank_line_separates_a_section_comment_from_a_backend() {
    let src = ORIGINAL.replace("# rack B\n", "# ---- rack B ----\n\n");
    let mut f = file(&src);
    f.remove_backend("web", ip("192.0.2.12")).unwrap();
    let text = f.text();
    assert!(!text.contains("192.0.2.12"));
    assert!(
        text.contains(
            "# half\n\n# ---- rack B ----\n\n[[service.backend]]\naddress = \"192.0.2.13\""
        ),
        "{text}"
    );
    // The last table: the section comment stays at the end.
    let src = ORIGINAL.replace(
        "\n[[service.backend]]\naddress = \"2001:db8::2\"",
        "\n# spare\n\n[[service.backend]]\naddress = \"2001:db8::2\"",
    );
    let mut f = file(&src);
    f.remove_backend("dns", ip("2001:db8::2")).unwrap();
    assert!(
        f.text().ends_with("# ns1\n\n# spare\n\n# end of file\n"),
        "{}",
        f.text()
    );
}

#[test]
fn add_backend_appends_after_the_services_last_backend() {
    let mut f = file(ORIGINAL);
    f.add_backend(
        "web",
        &Backend {
            address: ip("192.0.2.14"),
            weight: 100,
            mac: None,
            port: None,
        },
    )
    .unwrap();
    f.add_backend(
        "web",
        &Backend {
            address: ip("192.0.2.15"),
            weight: 30,
            mac: Some([2, 0, 0, 0, 0x0b, 0x0f]),
            port: None,
        },
    )
    .unwrap();
    let text = f.text();
    let expected = ORIGINAL.replace(
            "# static neighbour\n",
            "# static neighbour\n\n[[service.backend]]\naddress = \"192.0.2.14\"\n\n\
             [[service.backend]]\naddress = \"192.0.2.15\"\nweight = 30\nmac = \"02:00:00:00:0b:0f\"\n",
        );
    assert_eq!(text, expected);
    assert_eq!(
        summary(&text)[0],
        web(&[
            ("192.0.2.11", 50),
            ("192.0.2.12", 100),
            ("192.0.2.13", 100),
            ("192.0.2.14", 100),
            ("192.0.2.15", 30)
        ])
    );
    let c = config::parse(&text).unwrap().config;
    assert_eq!(
        c.services[0].backends[4].mac,
        Some([2, 0, 0, 0, 0x0b, 0x0f])
    );
    assert_comments_kept(&text, &[]);
}

#[test]
fn add_service_writes_only_what_differs_from_defaults() {
    let mut f = file(ORIGINAL);
    let api = Service {
        name: "api".into(),
        vip: ip("203.0.113.20"),
        port: 443,
        protocol: Protocol::Tcp,
        forwarding: Forwarding::Tunnel,
        hash: HashMode::FiveTuple,
        table_size: 65_537,
        tunnel_source: Some(ip("198.51.100.1")),
        health: Health {
            check: CheckKind::Tcp,
            port: 443,
            interval_ms: 2000,
            ..Health::default()
        },
        backends: vec![
            Backend {
                address: ip("192.0.2.21"),
                weight: 100,
                mac: None,
                port: None,
            },
            Backend {
                address: ip("192.0.2.22"),
                weight: 10,
                mac: None,
                port: None,
            },
        ],
        allow: vec!["198.51.100.0/24".parse().unwrap()],
        deny: vec!["198.51.100.66/32".parse().unwrap()],
    };
    f.add_service(&api).unwrap();
    let text = f.text();
    let added = "\n[[service]]\nname = \"api\"\nvip = \"203.0.113.20\"\nport = 443\n\
                     protocol = \"tcp\"\nforwarding = \"tunnel\"\nhash = \"5-tuple\"\n\
                     tunnel_source = \"198.51.100.1\"\nallow = [\"198.51.100.0/24\"]\n\
                     deny = [\"198.51.100.66/32\"]\n\n[service.health]\ncheck = \"tcp\"\n\
                     interval_ms = 2000\n\n[[service.backend]]\naddress = \"192.0.2.21\"\n\n\
                     [[service.backend]]\naddress = \"192.0.2.22\"\nweight = 10\n";
    assert_eq!(
        text,
        ORIGINAL.replace("# ns2\n", &format!("# ns2\n{added}")),
        "{text}"
    );
    let c = config::parse(&text).unwrap().config;
    assert_eq!(c.services.len(), 3);
    assert_eq!(c.services[2], api);
    assert_comments_kept(&text, &[]);

    // No health table for check = none; into a file without services.
    let mut f = file("[daemon]\ninterfaces = [\"eth0\"]  # only\n");
    let plain = Service {
        name: "p".into(),
        vip: ip("10.0.0.1"),
        port: 0,
        protocol: Protocol::Udp,
        forwarding: Forwarding::Dsr,
        hash: HashMode::Source,
        table_size: 65_537,
        tunnel_source: None,
        health: Health::default(),
        backends: vec![],
        allow: vec![],
        deny: vec![],
    };
    f.add_service(&plain).unwrap();
    assert_eq!(
        f.text(),
        "[daemon]\ninterfaces = [\"eth0\"]  # only\n\n[[service]]\nname = \"p\"\n\
             vip = \"10.0.0.1\"\nport = 0\nprotocol = \"udp\"\n"
    );
    assert_eq!(config::parse(&f.text()).unwrap().config.services[0], plain);
}

#[test]
fn errors_name_what_is_missing_or_duplicated() {
    let mut f = file(ORIGINAL);
    let b = Backend {
        address: ip("192.0.2.11"),
        weight: 100,
        mac: None,
        port: None,
    };
    let e = f.set_weight("nope", ip("192.0.2.11"), 1).unwrap_err();
    assert!(
        matches!(&e, EditError::NoSuchService(n) if n == "nope"),
        "{e}"
    );
    assert!(e.to_string().contains("nope"));
    assert!(matches!(
        f.remove_service("nope"),
        Err(EditError::NoSuchService(_))
    ));
    assert!(matches!(
        f.add_backend("nope", &b),
        Err(EditError::NoSuchService(_))
    ));
    let e = f.remove_backend("web", ip("192.0.2.99")).unwrap_err();
    assert!(
        matches!(&e, EditError::NoSuchBackend { service, backend } if service == "web" && backend.address == ip("192.0.2.99"))
    );
    assert!(e.to_string().contains("192.0.2.99"), "{e}");
    assert!(matches!(
        f.set_weight("web", ip("2001:db8::1"), 1),
        Err(EditError::NoSuchBackend { .. })
    ));
    let e = f.add_backend("web", &b).unwrap_err();
    assert!(matches!(e, EditError::BackendExists { .. }), "{e}");
    assert!(e.to_string().contains("192.0.2.11"));
    // Equal as an address, spelt differently.
    let b6 = Backend {
        address: ip("2001:db8:0:0::2"),
        weight: 100,
        mac: None,
        port: None,
    };
    assert!(matches!(
        f.add_backend("dns", &b6),
        Err(EditError::BackendExists { .. })
    ));
    let mut web = config::parse(ORIGINAL).unwrap().config.services[0].clone();
    web.vip = ip("203.0.113.99");
    let e = f.add_service(&web).unwrap_err();
    assert!(
        matches!(&e, EditError::ServiceExists(n) if n == "web"),
        "{e}"
    );
    // Nothing changed.
    assert_eq!(f.text(), ORIGINAL);
}

mod layouts;
mod save;

/// `[daemon]` with `node_name` and a `[daemon.announce]` table (issue 13) changes nothing for
/// edits: services and backends are added, drained and removed around it, and it stays as
/// written.
#[test]
fn edits_keep_the_announce_table() {
    let announce = "[daemon.announce]   # routes for BIRD\ntable = 100\nprotocol = 200\n";
    let src = ORIGINAL
        .replace(
            "xdp_mode    = \"auto\"\n",
            "xdp_mode    = \"auto\"\nnode_name   = \"lb1\"\n",
        )
        .replacen("\n# -----", &format!("\n{announce}\n# -----"), 1);
    let mut f = file(&src);
    f.set_weight("web", ip("192.0.2.11"), 0).unwrap();
    f.add_backend(
        "dns",
        &Backend {
            address: ip("2001:db8::3"),
            weight: 10,
            mac: None,
            port: None,
        },
    )
    .unwrap();
    f.remove_service("web").unwrap();
    f.add_service(&Service {
        name: "api".into(),
        vip: ip("203.0.113.20"),
        port: 443,
        protocol: Protocol::Tcp,
        forwarding: config::Forwarding::Dsr,
        hash: config::HashMode::Source,
        table_size: 65_537,
        tunnel_source: None,
        health: config::Health::default(),
        backends: vec![],
        allow: vec![],
        deny: vec![],
    })
    .unwrap();
    let text = f.text();
    assert!(text.contains(announce), "{text}");
    let c = config::parse(&text)
        .unwrap_or_else(|p| panic!("{p:?}\n{text}"))
        .config;
    assert_eq!(c.daemon.node_name.as_deref(), Some("lb1"));
    assert_eq!(
        c.daemon.announce,
        Some(config::Announce {
            table: 100,
            protocol: 200
        })
    );
    assert_eq!(
        summary(&text),
        vec![
            dns(&[
                ("2001:db8::1", 100),
                ("2001:db8::2", 100),
                ("2001:db8::3", 10)
            ]),
            ("api".into(), vec![])
        ]
    );
}

#[test]
fn added_health_tables_of_every_kind_read_back_the_same() {
    let health_of = |text: &str| {
        let src = format!(
            "[daemon]\ninterfaces = [\"eth0\"]\n[[service]]\nname = \"s\"\nvip = \"10.0.0.1\"\nport = 53\nprotocol = \"udp\"\n[service.health]\n{text}\n"
        );
        config::parse(&src).unwrap().config.services[0]
            .health
            .clone()
    };
    for text in [
        "check = \"https\"\npath = \"/up\"\nexpect = 204\ntls_verify = true\nsni = \"a.example\"\nca_file = \"/ca.pem\"\nport = 443",
        "check = \"https\"",
        "check = \"udp\"\nsend = \"ping\"\nexpect_hex = \"706f6e67\"",
        "check = \"udp\"\nsend_hex = \"00ff\"",
        "check = \"dns\"",
        "check = \"dns\"\nquery_name = \"health.example.\"",
        "check = \"dns\"\nquery_name = \".\"\nquery_type = \"SOA\"",
        "check = \"pgsql\"\nport = 5432",
        "check = \"pgsql\"\nport = 5432\nuser = \"mon\"\ndatabase = \"app\"\nrole = \"primary\"\npassword_file = \"/p\"",
        "check = \"redis\"\nport = 6379\nrole = \"replica\"\npassword_file = \"/p\"",
        "check = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 0\"]\nuser = \"daemon\"\ntimeout_ms = 100\ninterval_ms = 200\nrise = 1\nfall = 1",
    ] {
        let health = health_of(text);
        let service = Service {
            name: "s".into(),
            vip: ip("10.0.0.1"),
            port: 53,
            protocol: Protocol::Udp,
            forwarding: Forwarding::Dsr,
            hash: HashMode::Source,
            table_size: 65_537,
            tunnel_source: None,
            health: health.clone(),
            allow: vec![],
            deny: vec![],
            backends: vec![],
        };
        let mut f = file("[daemon]\ninterfaces = [\"eth0\"]\n");
        f.add_service(&service).unwrap();
        let back = config::parse(&f.text()).unwrap().config;
        assert_eq!(back.services[0].health, health, "{text}\n---\n{}", f.text());
    }
}

/// `lbctl service allow|deny|unlist`: a new list goes after the service's plain keys, more
/// prefixes go at the end of its array in its style, and unlisting the last one removes the key;
/// comments stay.
#[test]
fn client_filter_prefixes_are_added_and_removed_in_place() {
    let mut f = file(ORIGINAL);
    let p = |s: &str| s.parse::<Cidr>().unwrap();
    f.add_prefix("web", "deny", p("198.51.100.66/32")).unwrap();
    f.add_prefix("web", "deny", p("198.51.100.0/28")).unwrap();
    f.add_prefix("web", "allow", p("198.51.100.0/24")).unwrap();
    f.add_prefix("dns", "allow", p("2001:db8:1::/48")).unwrap();
    let text = f.text();
    assert!(
        text.contains(
            "port     = 80\ndeny     = [\"198.51.100.66/32\", \"198.51.100.0/28\"]\n\
             allow    = [\"198.51.100.0/24\"]\n\n# HTTP check"
        ),
        "{text}"
    );
    assert!(
        text.contains("protocol = \"udp\"\nallow = [\"2001:db8:1::/48\"]\n"),
        "{text}"
    );
    let c = config::parse(&text).unwrap().config;
    assert_eq!(
        c.services[0].deny,
        [p("198.51.100.66/32"), p("198.51.100.0/28")]
    );
    assert_eq!(c.services[0].allow, [p("198.51.100.0/24")]);
    assert_eq!(c.services[1].allow, [p("2001:db8:1::/48")]);
    assert_comments_kept(&text, &[]);

    assert!(matches!(
        f.add_prefix("web", "deny", p("198.51.100.66/32")),
        Err(EditError::PrefixExists { list: "deny", .. })
    ));
    // Found whichever way it is written: "2001:0db8:1::/48" is "2001:db8:1::/48".
    let mut g = file(&text.replace("2001:db8:1::/48", "2001:0db8:1::/48"));
    assert_eq!(
        g.remove_prefix("dns", p("2001:db8:1::/48")).unwrap(),
        "allow"
    );
    assert!(!g.text().contains("allow = "), "{}", g.text());
    assert_eq!(
        f.remove_prefix("web", p("198.51.100.66/32")).unwrap(),
        "deny"
    );
    assert_eq!(
        f.remove_prefix("web", p("198.51.100.0/24")).unwrap(),
        "allow"
    );
    let text = f.text();
    assert!(
        text.contains("port     = 80\ndeny     = [\"198.51.100.0/28\"]\n\n# HTTP check"),
        "{text}"
    );
    assert!(matches!(
        f.remove_prefix("web", p("203.0.113.0/24")),
        Err(EditError::NoSuchPrefix { .. })
    ));
    assert!(matches!(
        f.add_prefix("nope", "deny", p("203.0.113.0/24")),
        Err(EditError::NoSuchService(_))
    ));
    // Inline tables and multi-line arrays keep their layout.
    let mut h = file(
        "service = [\n  { name = \"a\", vip = \"203.0.113.1\", port = 80, protocol = \"tcp\" },\n]\n\n[daemon]\ninterfaces = [\"eth0\"]\n",
    );
    h.add_prefix("a", "deny", p("192.0.2.0/24")).unwrap();
    assert!(
        h.text()
            .contains("protocol = \"tcp\", deny = [\"192.0.2.0/24\"] }"),
        "{}",
        h.text()
    );
    let mut m = file(
        "[daemon]\ninterfaces = [\"eth0\"]\n\n[[service]]\nname = \"a\"\nvip = \"203.0.113.1\"\nport = 80\nprotocol = \"tcp\"\nallow = [\n    \"192.0.2.0/24\",  # office\n]\n",
    );
    m.add_prefix("a", "allow", p("198.51.100.0/24")).unwrap();
    assert!(
        m.text()
            .contains("allow = [\n    \"192.0.2.0/24\",  # office\n    \"198.51.100.0/24\",\n]\n"),
        "{}",
        m.text()
    );
}

#[test]
fn a_nat_service_and_backend_ports_are_written_through_and_read_back() {
    let mut f = file("[daemon]\ninterfaces = [\"eth0\"]\n");
    let web = Service {
        name: "web".into(),
        vip: ip("203.0.113.30"),
        port: 80,
        protocol: Protocol::Tcp,
        forwarding: Forwarding::Nat,
        hash: HashMode::Source,
        table_size: 65_537,
        tunnel_source: None,
        health: Health {
            check: CheckKind::Http,
            port: 80,
            ..Health::default()
        },
        backends: vec![Backend {
            address: ip("192.0.2.31"),
            weight: 100,
            mac: None,
            port: Some(8080),
        }],
        allow: vec![],
        deny: vec![],
    };
    f.add_service(&web).unwrap();
    f.add_backend(
        "web",
        &Backend {
            address: ip("192.0.2.32"),
            weight: 100,
            mac: None,
            port: Some(8081),
        },
    )
    .unwrap();
    let text = f.text();
    assert!(text.contains("forwarding = \"nat\"\n"), "{text}");
    assert!(
        text.contains("address = \"192.0.2.31\"\nport = 8080\n"),
        "{text}"
    );
    assert!(
        text.contains("address = \"192.0.2.32\"\nport = 8081\n"),
        "{text}"
    );
    // The health table names no port: each backend is checked on its own.
    assert!(
        !text.contains("[service.health]\ncheck = \"http\"\nport"),
        "{text}"
    );
    let c = config::parse(&text).unwrap().config;
    let s = &c.services[0];
    assert_eq!(s.forwarding, Forwarding::Nat);
    assert_eq!(
        s.backends.iter().map(|b| b.port).collect::<Vec<_>>(),
        [Some(8080), Some(8081)]
    );
}

/// One host serving a `nat` service on two ports: each edit names the backend by address and
/// port (its `port` key, else the service's), and touches that table only.
#[test]
fn backends_of_one_address_are_told_apart_by_port() {
    const NAT: &str = r#"[daemon]
interfaces = ["eth0"]

[[service]]
name = "app"
vip = "203.0.113.10"
port = 80
protocol = "tcp"
forwarding = "nat"

[[service.backend]]
address = "192.0.2.11"   # instance on the service's port

[[service.backend]]
address = "192.0.2.11"   # second instance
port = 8081
"#;
    let key = |port| config::BackendKey {
        address: ip("192.0.2.11"),
        port,
    };
    let mut f = file(NAT);
    f.set_weight("app", key(8081), 0).unwrap();
    let text = f.text();
    assert!(
        text.contains("address = \"192.0.2.11\"   # second instance\nweight = 0\nport = 8081"),
        "{text}"
    );
    assert!(
        text.contains("# instance on the service's port\n\n"),
        "{text}"
    );
    let s = &f.validate().unwrap().config.services[0];
    assert_eq!(
        s.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
        [100, 0]
    );
    // The same address on a port it already serves on exists; on another it is new.
    let on = |port| Backend {
        address: ip("192.0.2.11"),
        weight: 100,
        mac: None,
        port,
    };
    for taken in [None, Some(80), Some(8081)] {
        let e = f.add_backend("app", &on(taken)).unwrap_err();
        assert!(
            matches!(e, EditError::BackendExists { .. }),
            "{taken:?}: {e}"
        );
    }
    f.add_backend("app", &on(Some(8082))).unwrap();
    assert_eq!(f.validate().unwrap().config.services[0].backends.len(), 3);
    // Removing the one on the service's port leaves the others.
    f.remove_backend("app", key(80)).unwrap();
    let s = &f.validate().unwrap().config.services[0];
    assert_eq!(
        s.backends.iter().map(|b| b.port).collect::<Vec<_>>(),
        [Some(8081), Some(8082)]
    );
    let e = f.remove_backend("app", key(80)).unwrap_err();
    assert!(e.to_string().contains("192.0.2.11:80"), "{e}");
}
