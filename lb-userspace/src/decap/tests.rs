use std::fs;

use super::{Cidr, program::map_pins_of_any_layout};

#[test]
fn cidrs_parse_and_say_what_is_wrong() {
    let c: Cidr = "192.0.2.0/24".parse().unwrap();
    assert_eq!((c.addr.to_string().as_str(), c.len), ("192.0.2.0", 24));
    assert_eq!("192.0.2.2".parse::<Cidr>().unwrap().len, 32);
    assert_eq!("2001:db8::/64".parse::<Cidr>().unwrap().len, 64);
    assert_eq!("2001:db8::2".parse::<Cidr>().unwrap().len, 128);
    assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().len, 0);
    assert_eq!(c.to_string(), "192.0.2.0/24");
    let e = "192.0.2.2/24".parse::<Cidr>().unwrap_err();
    assert!(e.contains("did you mean 192.0.2.0/24"), "{e}");
    let e = "2001:db8::1/64".parse::<Cidr>().unwrap_err();
    assert!(e.contains("did you mean 2001:db8::/64"), "{e}");
    assert!(
        "192.0.2.0/33"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("0 to 32")
    );
    assert!(
        "2001:db8::/129"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("0 to 128")
    );
    assert!(
        "lb1/24"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("not an address")
    );
    // Keys round-trip.
    for text in ["192.0.2.0/24", "2001:db8::/64", "0.0.0.0/0", "192.0.2.2/32"] {
        let c: Cidr = text.parse().unwrap();
        assert_eq!(Cidr::of_key(&c.key()), Some(c), "{text}");
    }
}

#[test]
fn pins_of_any_layout_are_this_interfaces_only() {
    let dir = std::env::temp_dir().join(format!("lb-decap-pins-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    for name in [
        "addrs_v1_eth0",
        "addrs_v2_eth0",
        "stats_v2_eth0",
        "allow_v2_eth0",
        "addrs_v2_eth0.100",
        "addrs_v2_eth1",
        "link_eth0",
        "addrs_vx_eth0",
    ] {
        fs::write(dir.join(name), "").unwrap();
    }
    let names: Vec<String> = map_pins_of_any_layout(&dir, "eth0")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "addrs_v1_eth0",
            "addrs_v2_eth0",
            "allow_v2_eth0",
            "stats_v2_eth0"
        ]
    );
    fs::remove_dir_all(&dir).unwrap();
}
