//! The data path's errors: `DatapathError`, and `LinkError` for XDP links (also `lbd decap`'s), whose causes keep the whole
//! chain of aya's and the kernel's messages, and the small adapters that make one.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this lbd was built without its XDP program (AYA_BUILD_SKIP was set): rebuild it normally"
    )]
    NoProgram,
    // The causes are kept as text with their whole chain (aya's errors keep the errno in
    // their sources), so a message says everything once, however it is printed.
    #[error("{what}: {cause}")]
    Io { what: String, cause: String },
    #[error("loading the XDP program: {0}")]
    Load(String),
    #[error("{what}: {cause}")]
    Program { what: String, cause: String },
    #[error("{what}: {cause}")]
    Map { what: String, cause: String },
    /// Attaching, pinning or replacing an XDP link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("{0}")]
    Other(String),
}

/// What went wrong with an XDP link. Each message names the interface or pin and the cause.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No mode worked: each tried mode with the kernel's answer.
    #[error("{interface} cannot take {program} ({})", .tried.join("; "))]
    Attach {
        interface: String,
        program: &'static str,
        tried: Vec<String>,
    },
    #[error("{interface}: taking the XDP link: {cause}")]
    Take { interface: String, cause: String },
    #[error(
        "{interface}: the kernel attached XDP without a bpf_link ({cause}); lb needs bpf_link support to stay attached after it exits"
    )]
    NoBpfLink { interface: String, cause: String },
    #[error("pinning the link of {interface} at {}: {cause}", .path.display())]
    Pin {
        interface: String,
        path: PathBuf,
        cause: String,
    },
    /// The pinned link could not be opened, is not an XDP link, or refused the new program.
    #[error("{what} {}: {cause}", .path.display())]
    Pinned {
        what: &'static str,
        path: PathBuf,
        cause: String,
    },
}

pub(crate) type Result<T> = std::result::Result<T, DatapathError>;

/// An error and its sources, each message once: "failed to create map `X`: Operation not
/// permitted (os error 1)".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Wrappers often repeat their source's message; keep what is new.
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DatapathError {
    let what = what.into();
    move |e| DatapathError::Io {
        what,
        cause: error_chain(&e),
    }
}

/// Whether a map operation failed only because the key was not there (aya reports a missing
/// key as `KeyNotFound` for some calls and as the syscall's ENOENT for others).
pub(crate) fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

pub(crate) fn map_err(
    what: impl Into<String>,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    let what = what.into();
    move |e| DatapathError::Map {
        what,
        cause: error_chain(&e),
    }
}

pub(crate) fn prog_err(
    what: impl Into<String>,
) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    let what = what.into();
    move |e| DatapathError::Program {
        what,
        cause: error_chain(&e),
    }
}

impl From<aya::EbpfError> for DatapathError {
    fn from(e: aya::EbpfError) -> Self {
        DatapathError::Load(error_chain(&e))
    }
}
