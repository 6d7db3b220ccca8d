//! What clients may hold of lbd: its servers (metrics, control socket) serve a bounded number of
//! connections at a time and close those that stay idle or open too long, so no number of idle
//! or slow clients can take the file descriptors lbd's health checks need; and lbd's soft limit
//! of open files is raised to the hard one at start.
//!
//! A server at its connection cap stops accepting: further clients wait in the kernel's listen
//! backlog, holding none of lbd's descriptors, until a connection ends.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

/// The bounds of one server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub connections: usize,
    /// A connection on which nothing was read or written for this long is closed.
    pub idle: Duration,
    /// A connection is closed at its first read or write after this long, whatever it does.
    pub lifetime: Duration,
}

/// The metrics server: a scraper or two, and people with curl.
pub const METRICS: Limits = Limits {
    connections: 64,
    idle: Duration::from_secs(10),
    lifetime: Duration::from_secs(60),
};

/// The control socket (root only): lbctl sends one request per connection; a request may wait
/// several seconds for a backend's next hop to resolve.
pub const CONTROL: Limits = Limits {
    connections: 64,
    idle: Duration::from_secs(60),
    lifetime: Duration::from_secs(300),
};

/// Raises this process's soft limit of open files to its hard limit (a shell or a service
/// manager without `LimitNOFILE` leaves 1,024: fewer than lbd may need with many checked
/// backends). Returns the limits before and after.
pub fn raise_open_files() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}

/// A listener that serves at most `limits.connections` connections at once, each closed once
/// idle or old (see [`Limits`]).
pub struct Bounded<L> {
    inner: L,
    permits: Arc<Semaphore>,
    limits: Limits,
}

impl<L> Bounded<L> {
    pub fn new(inner: L, limits: Limits) -> Self {
        Bounded {
            inner,
            permits: Arc::new(Semaphore::new(limits.connections)),
            limits,
        }
    }
}

impl<L: axum::serve::Listener> axum::serve::Listener for Bounded<L>
where
    L::Io: Unpin,
{
    type Io = BoundedIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // Not before a connection ends: until then new clients wait in the listen backlog.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (io, addr) = self.inner.accept().await;
        (BoundedIo::new(io, permit, self.limits), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection of a [`Bounded`] listener: frees its place when dropped, and fails its reads
/// and writes (which makes the server close it) once idle or old.
pub struct BoundedIo<T> {
    inner: T,
    _permit: OwnedSemaphorePermit,
    idle_after: Duration,
    idle: Pin<Box<Sleep>>,
    end: Pin<Box<Sleep>>,
}

impl<T> BoundedIo<T> {
    fn new(inner: T, permit: OwnedSemaphorePermit, limits: Limits) -> Self {
        let now = Instant::now();
        BoundedIo {
            inner,
            _permit: permit,
            idle_after: limits.idle,
            idle: Box::pin(tokio::time::sleep_until(now + limits.idle)),
            end: Box::pin(tokio::time::sleep_until(now + limits.lifetime)),
        }
    }

    /// Before an operation: an error when the connection has lived too long.
    fn check_age(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.end.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection open too long",
            ));
        }
        Ok(())
    }

    /// After an operation: progress restarts the idle clock; waiting past it is an error.
    fn after<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Ready(r) => {
                let deadline = Instant::now() + self.idle_after;
                self.idle.as_mut().reset(deadline);
                Poll::Ready(r)
            }
            Poll::Pending if self.idle.as_mut().poll(cx).is_ready() => Poll::Ready(Err(
                io::Error::new(io::ErrorKind::TimedOut, "connection idle too long"),
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BoundedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_age(cx)?;
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.after(cx, r)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BoundedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_age(cx)?;
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const TEST: Limits = Limits {
        connections: 2,
        idle: Duration::from_millis(300),
        lifetime: Duration::from_secs(2),
    };

    #[tokio::test]
    async fn at_most_n_connections_and_idle_ones_are_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut bounded = Bounded::new(listener, TEST);
        let mut clients = vec![];
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let accepted = std::time::Instant::now();
        let (mut a, _) = bounded.accept().await;
        let (_b, _) = bounded.accept().await;
        // The third waits in the backlog until one of the two ends.
        let third = tokio::time::timeout(Duration::from_millis(200), bounded.accept()).await;
        assert!(third.is_err(), "a third connection was accepted");

        // The first one is idle: its read fails after `idle`, not before.
        let mut buf = [0u8; 8];
        let e = a.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            accepted.elapsed() >= Duration::from_millis(250),
            "{:?}",
            accepted.elapsed()
        );
        drop(a);
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(1), bounded.accept())
            .await
            .expect("the third is accepted once the first is gone");

        // Traffic keeps a connection open past `idle`...
        let client = &mut clients[2];
        for _ in 0..4 {
            client.write_all(b"x").await.unwrap();
            assert_eq!(c.read(&mut buf).await.unwrap(), 1);
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        // ...but not past `lifetime`.
        tokio::time::sleep(TEST.lifetime).await;
        client.write_all(b"x").await.unwrap();
        let e = c.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        let (_, after) = raise_open_files().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(after, lim.rlim_max);
    }
}
