use super::*;

const INLINE: &str = r#"[daemon]
interfaces = ["eth0"]

[[service]]
name = "web"
vip = "203.0.113.10"
port = 80
protocol = "tcp"
backend = [
  # first rack
  { address = "192.0.2.11", weight = 50 },  # a1
  { address = "192.0.2.12" },  # a2
  { address = "192.0.2.13" },  # a3
]

[[service]]
name = "one"
vip = "203.0.113.11"
port = 80
protocol = "tcp"
backend = [{ address = "192.0.2.31" }, { address = "192.0.2.32" }]
"#;

#[test]
fn inline_backend_arrays_are_edited_too() {
    let mut f = file(INLINE);
    f.set_weight("web", ip("192.0.2.11"), 60).unwrap();
    f.set_weight("web", ip("192.0.2.12"), 5).unwrap();
    let text = f.text();
    assert!(
        text.contains("{ address = \"192.0.2.11\", weight = 60 },  # a1"),
        "{text}"
    );
    assert!(
        text.contains("{ address = \"192.0.2.12\", weight = 5 },  # a2"),
        "{text}"
    );

    f.remove_backend("web", ip("192.0.2.12")).unwrap();
    let text = f.text();
    assert!(
        !text.contains("# a2") && !text.contains("192.0.2.12"),
        "{text}"
    );
    assert!(text.contains("# first rack") && text.contains("# a1") && text.contains("# a3"));
    f.remove_backend("web", ip("192.0.2.13")).unwrap();
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
    let text = f.text();
    assert!(
            text.contains(
                "backend = [\n  # first rack\n  { address = \"192.0.2.11\", weight = 60 },  # a1\n  { address = \"192.0.2.14\" },\n]"
            ),
            "{text}"
        );

    f.remove_backend("one", ip("192.0.2.31")).unwrap();
    f.add_backend(
        "one",
        &Backend {
            address: ip("192.0.2.33"),
            weight: 9,
            mac: None,
            port: None,
        },
    )
    .unwrap();
    let text = f.text();
    assert!(
        text.contains(
            "backend = [{ address = \"192.0.2.32\" }, { address = \"192.0.2.33\", weight = 9 }]"
        ),
        "{text}"
    );
    assert_eq!(
        summary(&text),
        vec![
            web(&[("192.0.2.11", 60), ("192.0.2.14", 100)]),
            (
                "one".into(),
                vec![(ip("192.0.2.32"), 100), (ip("192.0.2.33"), 9)]
            )
        ]
    );
    f.remove_service("one").unwrap();
    assert_eq!(summary(&f.text()).len(), 1);
}

#[test]
fn other_layouts_are_refused_clearly() {
    let mut f = file("service = 3\n[daemon]\ninterfaces = [\"eth0\"]\n");
    let e = f.remove_service("web").unwrap_err();
    assert!(matches!(e, EditError::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("[[service]]"), "{e}");
}
