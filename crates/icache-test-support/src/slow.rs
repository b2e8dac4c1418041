//! A TCP proxy that delays what the server sends: a slow link to the cache
//! (another rack, a congested network), with requests passing at once.
//!
//! Each chunk the server sends is held for the delay counted from when the
//! proxy read it, then written in order: the link keeps its throughput, only
//! its latency grows (unlike sleeping in the copy loop, which would add the
//! delay once per chunk and fall ever further behind).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{PROXY_POLL, loopback};

struct Shared {
    target_port: u16,
    /// Microseconds every server → client chunk is held back.
    delay_us: AtomicU64,
    stop: AtomicBool,
}

/// A proxy on a free port of 127.0.0.1 to `127.0.0.1:target_port` that delays
/// every byte from the server by [`delay`](SlowProxy::set_delay). Its threads
/// stop when it is dropped.
pub struct SlowProxy {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl SlowProxy {
    /// Starts a proxy to `127.0.0.1:target_port` whose answers arrive `delay`
    /// late.
    pub fn start(target_port: u16, delay: Duration) -> SlowProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("slow proxy: bind a listener on 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("slow proxy: local address of its listener")
            .port();
        listener
            .set_nonblocking(true)
            .expect("slow proxy: make its listener non-blocking");
        let shared = Arc::new(Shared {
            target_port,
            delay_us: AtomicU64::new(micros(delay)),
            stop: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name(format!("slow-proxy-{port}"))
            .spawn(move || accept_loop(&listener, &accept_shared))
            .expect("slow proxy: spawn its accept thread");
        SlowProxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    /// The port the proxy listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT` through this proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Changes the delay of what the server sends from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_us.store(micros(delay), Ordering::SeqCst);
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.accept.take() {
            let _ = handle.join();
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => connection(client, shared),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => thread::sleep(PROXY_POLL),
        }
    }
}

/// Starts the threads of one connection: requests copied at once, answers
/// read at once and written when due.
fn connection(client: TcpStream, shared: &Arc<Shared>) {
    let Ok(server) =
        TcpStream::connect_timeout(&loopback(shared.target_port), Duration::from_secs(1))
    else {
        return;
    };
    let setup = || -> io::Result<[TcpStream; 4]> {
        client.set_nonblocking(false)?;
        for s in [&client, &server] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(PROXY_POLL))?;
        }
        Ok([
            client.try_clone()?,
            server.try_clone()?,
            server.try_clone()?,
            client.try_clone()?,
        ])
    };
    let Ok([from_client, to_server, from_server, to_client]) = setup() else {
        return;
    };
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let up = Arc::clone(shared);
    let down = Arc::clone(shared);
    let spawned = [
        thread::Builder::new()
            .name("slow-proxy-up".into())
            .spawn(move || copy_now(from_client, to_server, &up)),
        thread::Builder::new()
            .name("slow-proxy-down-read".into())
            .spawn(move || read_stamped(from_server, &tx, &down)),
        thread::Builder::new()
            .name("slow-proxy-down-write".into())
            .spawn(move || write_when_due(to_client, &rx)),
    ];
    if spawned.iter().any(Result::is_err) {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    }
}

fn copy_now(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let mut buf = vec![0u8; 64 * 1024];
    while !shared.stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if is_retry(&e) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

fn read_stamped(mut from: TcpStream, tx: &mpsc::Sender<(Instant, Vec<u8>)>, shared: &Shared) {
    let mut buf = vec![0u8; 64 * 1024];
    while !shared.stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let due =
                    Instant::now() + Duration::from_micros(shared.delay_us.load(Ordering::SeqCst));
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e) if is_retry(&e) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    // Dropping the sender ends the writer once it has written what is queued.
}

fn write_when_due(mut to: TcpStream, rx: &mpsc::Receiver<(Instant, Vec<u8>)>) {
    while let Ok((due, bytes)) = rx.recv() {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if to.write_all(&bytes).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}
