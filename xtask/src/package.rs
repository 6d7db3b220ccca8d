//! `cargo xtask package`: the Debian package `target/debian/lb_<version>_<arch>.deb`, built
//! with dpkg-deb from the release binaries (no packaging tool to compile). `cargo xtask test`
//! makes one from the debug binaries for tests/e2e/package.rs (`make` with `Profile::Debug`).
//!
//! What goes where (Debian 12 paths):
//! - `/usr/sbin/lbd`, `/usr/sbin/lbctl`, stripped: both are for the administrator (lbctl talks
//!   to a socket only root may use), as in the manual install's /usr/local/sbin;
//! - `/lib/systemd/system/lbd.service`: packaging/lbd.service with `ExecStart=/usr/sbin/lbd`;
//! - `/usr/lib/sysusers.d/lb.conf`: packaging/lb.sysusers.conf (the user `lb`);
//! - `/usr/share/man/man8/`: lbd.8, lbctl.8 and a page per subcommand, gzipped;
//! - completions: bash (`/usr/share/bash-completion/completions`), zsh
//!   (`/usr/share/zsh/vendor-completions`), fish (`/usr/share/fish/vendor_completions.d`);
//! - `/etc/lb/lb.toml`: packaging/lb.toml, a conffile that names no real interface;
//! - `/usr/share/doc/lb/`: README.md.gz, operations.md.gz, copyright, changelog.gz;
//! - `/usr/share/lintian/overrides/lb`: the two lintian warnings that are on purpose.
//!
//! Maintainer scripts (packaging/debian/): postinst creates the user, gives /etc/lb to it and
//! reloads systemd, and on upgrade restarts a running lbd (hitless: the new lbd adopts the
//! pinned program); it never enables or starts lbd, whose example config would refuse to
//! start. prerm, on removal, stops lbd and takes lb out of the data path (`lbd --cleanup`:
//! with the package gone nothing could remove the pinned program). postrm purge removes
//! /var/lib/lb and /etc/lb.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::build::{self, Profile};
use crate::{cmd, setup, workspace};

#[derive(clap::Args)]
pub struct PackageArgs {
    /// Package the debug binaries (quick to build; what the tests install) instead of release
    #[arg(long)]
    debug: bool,
}

/// The package's name.
pub const NAME: &str = "lb";
const MAINTAINER: &str = "lb maintainers <maintainers@users.noreply.r-seed-fe3e4287.example>";
/// The line of packaging/lbd.service that names the manual install's lbd.
const UNIT_EXEC_START: &str = "ExecStart=/usr/local/sbin/lbd --config /etc/lb/lb.toml";
const PACKAGE_EXEC_START: &str = "ExecStart=/usr/sbin/lbd --config /etc/lb/lb.toml";

pub fn run(args: &PackageArgs) -> Result<()> {
    let start = Instant::now();
    cmd::phase("setup");
    setup::run()?;
    let profile = if args.debug {
        Profile::Debug
    } else {
        Profile::Release
    };
    cmd::phase(&format!("build lbd and lbctl ({})", profile.dir_name()));
    let bin_dir = build::binaries(profile)?;
    cmd::phase("the Debian package");
    let deb = make(&bin_dir, profile)?;
    println!(
        "\npackage: {} ({})",
        deb.display(),
        cmd::secs(start.elapsed())
    );
    println!(
        "package: install with `dpkg -i {}`, edit /etc/lb/lb.toml, then `systemctl enable --now lbd`",
        deb.display()
    );
    Ok(())
}

/// Where the package of `profile` goes: target/debian (release) or target/debian-debug.
pub fn out_dir(profile: Profile) -> Result<PathBuf> {
    let target = workspace::target_dir()?;
    Ok(match profile {
        Profile::Release => target.join("debian"),
        Profile::Debug => target.join("debian-debug"),
    })
}

/// Builds the package from the binaries in `bin_dir` and returns its path. A debug package is
/// compressed quickly (it is made for every `cargo xtask test`), a release one with xz.
pub fn make(bin_dir: &Path, profile: Profile) -> Result<PathBuf> {
    let version = workspace::version()?;
    let arch = cmd::stdout_of(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg --print-architecture (a Debian machine is needed to build the package)")?
        .trim()
        .to_owned();
    let out = out_dir(profile)?;
    let root = out.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("cannot empty {}", root.display()))?;
    }
    let dist = build::dist(bin_dir)?;
    let packaging = workspace::root().join("packaging");
    let mut files = Files::new(&root);

    for name in build::BINARIES {
        files.strip_into(&bin_dir.join(name), &format!("usr/sbin/{name}"))?;
    }
    let unit = read(&packaging.join("lbd.service"))?;
    if unit.lines().filter(|l| *l == UNIT_EXEC_START).count() != 1 {
        bail!("packaging/lbd.service should have exactly one line `{UNIT_EXEC_START}`");
    }
    files.write(
        "lib/systemd/system/lbd.service",
        unit.replace(UNIT_EXEC_START, PACKAGE_EXEC_START).as_bytes(),
        0o644,
    )?;
    files.copy(
        &packaging.join("lb.sysusers.conf"),
        "usr/lib/sysusers.d/lb.conf",
    )?;
    for page in build::man_pages(&dist)? {
        let name = page.file_name().unwrap().to_string_lossy().into_owned();
        files.gzip(&page, &format!("usr/share/man/man8/{name}.gz"))?;
    }
    for name in build::BINARIES {
        files.copy(
            &dist.join(build::completion_file("bash", name)),
            &format!("usr/share/bash-completion/completions/{name}"),
        )?;
        files.copy(
            &dist.join(build::completion_file("zsh", name)),
            &format!("usr/share/zsh/vendor-completions/_{name}"),
        )?;
        files.copy(
            &dist.join(build::completion_file("fish", name)),
            &format!("usr/share/fish/vendor_completions.d/{name}.fish"),
        )?;
    }
    files.copy(&packaging.join("lb.toml"), "etc/lb/lb.toml")?;
    let doc = "usr/share/doc/lb";
    files.gzip(
        &workspace::root().join("README.md"),
        &format!("{doc}/README.md.gz"),
    )?;
    files.gzip(
        &workspace::root().join("docs/operations.md"),
        &format!("{doc}/operations.md.gz"),
    )?;
    files.copy(
        &packaging.join("debian/copyright"),
        &format!("{doc}/copyright"),
    )?;
    files.copy(
        &packaging.join("debian/lintian-overrides"),
        "usr/share/lintian/overrides/lb",
    )?;
    let changelog = changelog(&version)?;
    let changelog_src = out.join("changelog");
    std::fs::write(&changelog_src, changelog)?;
    files.gzip(&changelog_src, &format!("{doc}/changelog.gz"))?;

    // The control area.
    let depends = depends(&root, &out)?;
    let installed_kib = files.installed_kib();
    let md5sums = md5sums(&root, &files.paths)?;
    files.write("DEBIAN/md5sums", md5sums.as_bytes(), 0o644)?;
    files.write("DEBIAN/conffiles", b"/etc/lb/lb.toml\n", 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        files.copy_mode(
            &packaging.join("debian").join(script),
            &format!("DEBIAN/{script}"),
            0o755,
        )?;
    }
    let control = control(&version, &arch, &depends, installed_kib)?;
    files.write("DEBIAN/control", control.as_bytes(), 0o644)?;

    let deb = out.join(format!("{NAME}_{version}_{arch}.deb"));
    let mut build = Command::new("dpkg-deb");
    build.arg("--root-owner-group");
    match profile {
        Profile::Release => build.arg("-Zxz"),
        Profile::Debug => build.args(["-Zgzip", "-z1"]),
    };
    // Every file's time is the last commit's (dpkg-deb clamps to it): one commit, one package.
    if let Some(epoch) = commit_epoch() {
        build.env("SOURCE_DATE_EPOCH", epoch);
    }
    build.arg("--build").arg(&root).arg(&deb);
    cmd::run(&mut build)?;
    Ok(deb)
}

/// The files of the package being assembled under `root`, with modes set explicitly (whatever
/// the umask), and the list of what was installed (for md5sums and Installed-Size).
struct Files {
    root: PathBuf,
    /// Relative paths of the files outside DEBIAN/.
    paths: BTreeSet<String>,
}

impl Files {
    fn new(root: &Path) -> Files {
        Files {
            root: root.to_owned(),
            paths: BTreeSet::new(),
        }
    }

    /// The destination of `rel`, its folders made (mode 0755).
    fn prepare(&mut self, rel: &str) -> Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let dest = self.root.join(rel);
        let parent = dest.parent().context("a file at the root")?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        // DirBuilder's mode is filtered by the umask: set every folder up to the root.
        let mut dir = parent;
        while dir.starts_with(&self.root) {
            set_mode(dir, 0o755)?;
            match dir.parent() {
                Some(p) => dir = p,
                None => break,
            }
        }
        if !rel.starts_with("DEBIAN/") {
            self.paths.insert(rel.to_owned());
        }
        Ok(dest)
    }

    fn write(&mut self, rel: &str, contents: &[u8], mode: u32) -> Result<()> {
        let dest = self.prepare(rel)?;
        std::fs::write(&dest, contents)
            .with_context(|| format!("cannot write {}", dest.display()))?;
        set_mode(&dest, mode)
    }

    fn copy(&mut self, from: &Path, rel: &str) -> Result<()> {
        self.copy_mode(from, rel, 0o644)
    }

    fn copy_mode(&mut self, from: &Path, rel: &str, mode: u32) -> Result<()> {
        let contents =
            std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
        self.write(rel, &contents, mode)
    }

    /// `gzip -9n` (no name or time stamp, so the same input gives the same bytes).
    fn gzip(&mut self, from: &Path, rel: &str) -> Result<()> {
        let mut gzip = Command::new("gzip");
        gzip.args(["-9nc"]).arg(from);
        let output = cmd::capture(&mut gzip)?;
        cmd::check(&cmd::describe(&gzip), output.status)?;
        self.write(rel, &output.stdout, 0o644)
    }

    /// An executable, stripped of symbols and debug information as Debian's dh_strip does.
    fn strip_into(&mut self, from: &Path, rel: &str) -> Result<()> {
        let dest = self.prepare(rel)?;
        cmd::run(
            Command::new("strip")
                .args([
                    "--remove-section=.comment",
                    "--remove-section=.note",
                    "--strip-unneeded",
                    "-o",
                ])
                .arg(&dest)
                .arg(from),
        )?;
        set_mode(&dest, 0o755)
    }

    /// What dpkg-gencontrol would say: every file's size in KiB, rounded up, plus one per
    /// folder.
    fn installed_kib(&self) -> u64 {
        let mut dirs = BTreeSet::new();
        let mut kib = 0;
        for rel in &self.paths {
            let size = std::fs::metadata(self.root.join(rel)).map_or(0, |m| m.len());
            kib += size.div_ceil(1024);
            let mut p = Path::new(rel).parent();
            while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
                dirs.insert(dir.to_owned());
                p = dir.parent();
            }
        }
        kib + dirs.len() as u64
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// `Depends:` as dpkg-shlibdeps computes it from the staged binaries (the libraries they
/// link and the symbol versions they use), then what the maintainer scripts call: the user is
/// made by systemd-sysusers (systemd's, or the standalone one on a host without systemd).
fn depends(root: &Path, out: &Path) -> Result<String> {
    // dpkg-shlibdeps wants to run in a source tree: a debian/control of one binary package.
    let tree = out.join("shlibdeps");
    std::fs::create_dir_all(tree.join("debian"))?;
    std::fs::write(
        tree.join("debian/control"),
        format!("Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n"),
    )?;
    let mut shlibdeps = Command::new("dpkg-shlibdeps");
    shlibdeps.current_dir(&tree).arg("-O");
    for name in build::BINARIES {
        shlibdeps.arg(format!("-e{}", root.join("usr/sbin").join(name).display()));
    }
    let text = cmd::stdout_of(&mut shlibdeps)
        .context("dpkg-shlibdeps (Debian package dpkg-dev) computes the libraries' versions")?;
    let libs = text
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {text}"))?
        .trim()
        .to_owned();
    if !libs.contains("libc6") {
        bail!("dpkg-shlibdeps found no libc6 dependency: {libs}");
    }
    Ok(format!("{libs}, systemd | systemd-standalone-sysusers"))
}

/// DEBIAN/md5sums: every file but the conffiles, as `md5sum` prints them.
fn md5sums(root: &Path, paths: &BTreeSet<String>) -> Result<String> {
    let mut md5 = Command::new("md5sum");
    md5.current_dir(root)
        .args(paths.iter().filter(|p| !p.starts_with("etc/")));
    cmd::stdout_of(&mut md5)
}

fn control(version: &str, arch: &str, depends: &str, installed_kib: u64) -> Result<String> {
    let description = read(&workspace::root().join("packaging/debian/description"))?;
    Ok(format!(
        "Package: {NAME}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Suggests: bpftool\n\
         Section: net\n\
         Priority: optional\n\
         {description}"
    ))
}

/// The last commit's time, seconds since the epoch.
fn commit_epoch() -> Option<String> {
    let mut git = Command::new("git");
    git.current_dir(workspace::root())
        .args(["log", "-1", "--format=%ct"]);
    let epoch = cmd::stdout_of(&mut git).ok()?.trim().to_owned();
    (!epoch.is_empty()).then_some(epoch)
}

/// A changelog of one entry: this build, dated by the last commit (so two builds of one commit
/// make the same package).
fn changelog(version: &str) -> Result<String> {
    let mut git = Command::new("git");
    git.current_dir(workspace::root())
        .args(["log", "-1", "--format=%h%n%aD"]);
    let (commit, date) = match cmd::stdout_of(&mut git) {
        Ok(text) => {
            let mut lines = text.lines();
            (
                lines.next().unwrap_or("unknown").to_owned(),
                lines.next().unwrap_or("").to_owned(),
            )
        }
        Err(_) => ("unknown".to_owned(), String::new()),
    };
    let date = if date.is_empty() {
        "Thu, 01 Jan 1970 00:00:00 +0000".to_owned()
    } else {
        date
    };
    Ok(format!(
        "{NAME} ({version}) unstable; urgency=medium\n\n  \
         * Built by `cargo xtask package` from commit {commit}.\n\n \
         -- {MAINTAINER}  {date}\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_unit_runs_the_packaged_lbd() {
        let unit = read(&workspace::root().join("packaging/lbd.service")).unwrap();
        assert_eq!(
            unit.lines().filter(|l| *l == UNIT_EXEC_START).count(),
            1,
            "packaging/lbd.service should have exactly one `{UNIT_EXEC_START}`"
        );
        let packaged = unit.replace(UNIT_EXEC_START, PACKAGE_EXEC_START);
        assert!(!packaged.contains("/usr/local/sbin/lbd"));
    }

    #[test]
    fn the_description_is_a_control_field() {
        let d = read(&workspace::root().join("packaging/debian/description")).unwrap();
        let mut lines = d.lines();
        let first = lines.next().unwrap();
        assert!(first.starts_with("Description: "), "{first}");
        assert!(first.len() <= 80, "the synopsis is too long: {first}");
        for line in lines {
            assert!(
                line.starts_with(' '),
                "an extended line without its space: {line:?}"
            );
            assert!(line.len() <= 80, "{line:?}");
        }
        assert!(d.ends_with('\n'));
    }

    #[test]
    fn the_changelog_is_dated_by_the_commit() {
        let c = changelog("1.2.3").unwrap();
        assert!(
            c.starts_with("lb (1.2.3) unstable; urgency=medium\n"),
            "{c}"
        );
        assert!(c.contains(&format!("\n -- {MAINTAINER}  ")), "{c}");
    }
}
