use super::*;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "lb-config-edit-{tag}-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&d).unwrap();
    d
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn entries(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn save_writes_atomically_and_keeps_the_mode() {
    let dir = temp_dir("save");
    let path = dir.join("lb.toml");
    fs::write(&path, ORIGINAL).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    let inode = fs::metadata(&path).unwrap().ino();

    let mut f = ConfigFile::load(&path).unwrap();
    f.set_weight("web", ip("192.0.2.12"), 0).unwrap();
    f.save().unwrap();
    let on_disk = fs::read_to_string(&path).unwrap();
    assert_eq!(on_disk, f.text());
    assert_eq!(summary(&on_disk)[0].1[1].1, 0);
    assert_eq!(mode(&path), 0o640);
    assert_ne!(
        fs::metadata(&path).unwrap().ino(),
        inode,
        "not renamed over"
    );
    assert_eq!(entries(&dir), vec!["lb.toml"], "temporary file left behind");

    // A second edit and save through the same ConfigFile.
    f.set_weight("web", ip("192.0.2.12"), 100).unwrap();
    f.save().unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), f.text());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_refuses_an_invalid_result_and_leaves_the_file() {
    let dir = temp_dir("invalid");
    let path = dir.join("lb.toml");
    fs::write(&path, ORIGINAL).unwrap();
    let mut f = ConfigFile::load(&path).unwrap();
    f.add_backend(
        "web",
        &Backend {
            address: ip("2001:db8::7"),
            weight: 100,
            mac: None,
            port: None,
        },
    )
    .unwrap();
    let e = f.save().unwrap_err();
    match &e {
        EditError::Invalid(p) => {
            assert!(p.iter().any(|p| p.message.contains("2001:db8::7")), "{p:?}")
        }
        other => panic!("expected Invalid, got {other}"),
    }
    assert!(e.to_string().contains("family"), "{e}");
    assert_eq!(fs::read_to_string(&path).unwrap(), ORIGINAL);
    assert_eq!(entries(&dir), vec!["lb.toml"]);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_refuses_to_overwrite_a_file_changed_meanwhile() {
    let dir = temp_dir("conflict");
    let path = dir.join("lb.toml");
    fs::write(&path, ORIGINAL).unwrap();
    let mut f = ConfigFile::load(&path).unwrap();
    f.remove_service("dns").unwrap();
    let by_hand = ORIGINAL.replace("# uplink", "# uplink (edited by hand)");
    fs::write(&path, &by_hand).unwrap();
    assert!(matches!(f.save(), Err(EditError::Conflict(_))));
    assert_eq!(fs::read_to_string(&path).unwrap(), by_hand);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_through_a_symlink_keeps_the_link() {
    let dir = temp_dir("link");
    let real = dir.join("real.toml");
    let link = dir.join("lb.toml");
    fs::write(&real, ORIGINAL).unwrap();
    std::os::unix::fs::symlink("real.toml", &link).unwrap();
    let mut f = ConfigFile::load(&link).unwrap();
    f.remove_backend("web", ip("192.0.2.13")).unwrap();
    f.save().unwrap();
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read_to_string(&real).unwrap(), f.text());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn syntax_errors_are_reported_on_load() {
    let e = ConfigFile::from_text(Path::new("/etc/lb/lb.toml"), "[daemon\n").unwrap_err();
    assert!(
        matches!(&e, EditError::Parse(m) if m.contains("/etc/lb/lb.toml")),
        "{e}"
    );
}
