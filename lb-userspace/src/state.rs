//! The desired state lbd works towards, and what it keeps on disk between runs.

use std::{
    fs,
    io::{self, Write},
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use lb_common::Addr;

/// The seed file in `daemon.state_dir`.
pub const SEED_FILE: &str = "hash_seed";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: io::Error,
    },
    #[error(
        "{path} does not hold a hash seed of 32 hex digits; fix or delete it (clients then move once)"
    )]
    BadSeed { path: String },
}

/// Creates `state_dir` (mode 0700) when it is missing.
pub fn prepare_state_dir(state_dir: &Path) -> Result<(), StateError> {
    if !state_dir.exists() {
        fs::create_dir_all(state_dir).map_err(|source| StateError::Io {
            what: "creating",
            path: state_dir.display().to_string(),
            source,
        })?;
        let _ = fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

/// The hash seed: the config's, else the one kept in `state_dir`, else a new random one that is
/// then kept there (so restarts keep every client on its backend).
pub fn hash_seed(configured: Option<[u64; 2]>, state_dir: &Path) -> Result<[u64; 2], StateError> {
    prepare_state_dir(state_dir)?;
    if let Some(seed) = configured {
        return Ok(seed);
    }
    let path = state_dir.join(SEED_FILE);
    let shown = path.display().to_string();
    match fs::read_to_string(&path) {
        Ok(text) => {
            lb_common::hash::parse_seed(text.trim()).ok_or(StateError::BadSeed { path: shown })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let seed: [u64; 2] = [rand::random(), rand::random()];
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|source| StateError::Io {
                    what: "creating",
                    path: shown.clone(),
                    source,
                })?;
            writeln!(f, "{}", seed_hex(&seed)).map_err(|source| StateError::Io {
                what: "writing",
                path: shown,
                source,
            })?;
            Ok(seed)
        }
        Err(source) => Err(StateError::Io {
            what: "reading",
            path: shown,
            source,
        }),
    }
}

pub fn seed_hex(seed: &[u64; 2]) -> String {
    format!("{:016x}{:016x}", seed[0], seed[1])
}

/// An address as the data path stores it: wire-order words, IPv4 in the first.
pub fn to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            core::array::from_fn(|i| {
                u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
            })
        }
    }
}

pub fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        lb_common::FAMILY_V4
    } else {
        lb_common::FAMILY_V6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_is_generated_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("lb-seed-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = hash_seed(None, &dir).unwrap();
        let b = hash_seed(None, &dir).unwrap();
        assert_eq!(a, b);
        let mode = fs::metadata(dir.join(SEED_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(hash_seed(Some([1, 2]), &dir).unwrap(), [1, 2]);
        fs::write(dir.join(SEED_FILE), "nonsense").unwrap();
        assert!(hash_seed(None, &dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn addresses_are_wire_words() {
        let a = to_addr("192.0.2.1".parse().unwrap());
        assert_eq!(a[0].to_ne_bytes(), [192, 0, 2, 1]);
        let b = to_addr("2001:db8::1".parse().unwrap());
        assert_eq!(b[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(b[3].to_ne_bytes(), [0, 0, 0, 1]);
    }
}
