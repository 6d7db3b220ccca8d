//! The harness's `unsafe`: thin, commented wrappers around the few system calls the standard
//! library does not offer (setns, kill, a bound non-blocking connect, raw IP sends, CPU
//! affinity). Every other module of the library calls these, or aya for bpf(2). Outside the
//! library, a few commented `unsafe` blocks remain where a test or benchmark needs a call this
//! module has no wrapper for (the control benchmark's datagram socket, lb-demo's signal
//! handling, hygiene's interface index from inside a namespace thread).

use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::Context;

/// True when the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the *calling thread* into the network namespace referred to by `ns` (an open
/// `/run/netns/NAME`). Other threads of the process are not affected.
pub fn setns_net(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; CLONE_NEWNET only changes this thread's namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `sig` to process `pid`.
pub fn kill(pid: u32, sig: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Index of interface `name` in the calling thread's network namespace.
pub fn if_nametoindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(idx)
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// TCP connect from `src` (port chosen by the kernel; `None`: any address) to `dst`, giving up
/// after `timeout`. The socket is created in the calling thread's network namespace and stays
/// there whichever thread uses it afterwards. The returned stream is in blocking mode.
pub fn tcp_connect_from(
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let domain = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = cvt(unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(src) = src {
        let one: libc::c_int = 1;
        // SAFETY: valid fd, pointer to a c_int with its correct length. Delays the port choice
        // to connect() so that many connections from one source address do not exhaust ports.
        cvt(unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })?;
        let (sa, len) = sockaddr(SocketAddr::new(src, 0));
        // SAFETY: `sa` is a properly initialised sockaddr of length `len`.
        cvt(unsafe {
            libc::bind(
                sock.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                len,
            )
        })?;
    }
    let (sa, len) = sockaddr(dst);
    // SAFETY: as above.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = cvt(unsafe { libc::poll(&mut pfd, 1, ms) })?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out after {timeout:?}"),
            ));
        }
        let mut soerr: libc::c_int = 0;
        let mut l = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd, output buffer of the advertised length.
        cvt(unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut soerr as *mut _ as *mut libc::c_void,
                &mut l,
            )
        })?;
        if soerr != 0 {
            return Err(io::Error::from_raw_os_error(soerr));
        }
    }
    let stream = TcpStream::from(sock);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Sends `payload` as one IP packet of protocol `proto` to `dst` through a raw socket: the
/// kernel writes the IP header (the source is the address of the route's interface). Sent from
/// the calling thread's network namespace.
pub fn send_ip(dst: IpAddr, proto: i32, payload: &[u8]) -> io::Result<()> {
    let domain = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = cvt(unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let (sa, len) = sockaddr(SocketAddr::new(dst, 0));
    // SAFETY: a valid fd, a buffer of payload.len() bytes and a sockaddr of length `len`.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets SO_RCVBUF of `stream` to `bytes` (the kernel doubles it for its bookkeeping). This
/// turns receive-buffer autotuning off, so the window the peer may fill stays small: a reader
/// that pauses stalls the sender instead of letting it finish into a large buffer.
pub fn set_recv_buffer(stream: &TcpStream, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer size out of range"))?;
    // SAFETY: valid fd (borrowed from the stream), pointer to a c_int with its correct length.
    cvt(unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &v as *const _ as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

// ---- threads: CPU affinity and nice value, for the benchmarks ------------------------------

/// Pins the calling thread to CPU `cpu`.
pub fn pin_thread(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data (all-zero is the empty set); CPU_SET writes inside it;
    // sched_setaffinity(0, ...) affects only the calling thread and reads the set we own.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("pinning to CPU {cpu}"));
    }
    Ok(())
}

/// Sets the calling thread's nice value (Linux: per thread), so other work on its CPU takes
/// less of it during a measurement.
pub fn nice_thread(nice: i32) -> anyhow::Result<()> {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id reads nothing.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setting nice {nice}"));
    }
    Ok(())
}

/// Pins the calling thread to one CPU until dropped, then gives it back the CPUs it had.
pub struct Pinned {
    before: libc::cpu_set_t,
}

impl Pinned {
    pub fn to(cpu: usize) -> anyhow::Result<Pinned> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity(0, ...) fills the set we own for
        // the calling thread.
        let before = unsafe {
            let mut set: libc::cpu_set_t = mem::zeroed();
            if libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(io::Error::last_os_error()).context("reading the CPU affinity");
            }
            set
        };
        pin_thread(cpu)?;
        Ok(Pinned { before })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: restores the calling thread's affinity from the set saved in `to`.
        unsafe {
            libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &self.before);
        }
    }
}
