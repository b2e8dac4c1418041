//! `fill=lease`: a reader that waits for another process's render takes the
//! entry that process stored. The threads of its own process that joined
//! its wait take that entry too, and they may have begun later: after a bump
//! of a nested token that the entry predates. They must check it against
//! what they must serve, not take it on trust.
//!
//! The chaos run (`icache-chaos --backend memcached-pool`) saw this once, at
//! the start of a run: a page showed an item's old commit after the item's
//! bump had completed. The window is the waiting thread's last look at the
//! entry: it read the nested token's generation before the bump, and a
//! thread of the same process began after the bump and joined it before it
//! handed the entry out. Here a proxy holds the answer to that one read back
//! (the server has answered it), so the window is as long as the test needs.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use icache::ICache;
use icache_test_support::MemcachedServer;

/// What the proxy is told to do, and what it saw.
#[derive(Default)]
struct HoldState {
    /// Armed: the next request that contains these bytes has its answer
    /// held back (once).
    armed: Option<Vec<u8>>,
    /// The server's answer to that request is here, not yet forwarded.
    holding: bool,
    /// Let it go (and everything after it).
    released: bool,
}

#[derive(Default)]
struct HoldShared {
    state: Mutex<HoldState>,
    changed: Condvar,
    stop: AtomicBool,
}

impl HoldShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HoldState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A TCP proxy to one server that can hold back the answer to one chosen
/// request (the request itself reaches the server at once, so the server
/// has answered it, at that moment's state), while every other connection
/// passes.
struct HoldProxy {
    port: u16,
    shared: Arc<HoldShared>,
    accept: Option<JoinHandle<()>>,
}

impl HoldProxy {
    fn start(target_port: u16) -> HoldProxy {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("hold proxy: bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("hold proxy: its address")
            .port();
        listener
            .set_nonblocking(true)
            .expect("hold proxy: non-blocking listener");
        let shared = Arc::new(HoldShared::default());
        let accept_shared = Arc::clone(&shared);
        let accept = thread::spawn(move || {
            while !accept_shared.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, target_port))
                        else {
                            continue;
                        };
                        let _ = client.set_nonblocking(false);
                        connect_pair(client, server, Arc::clone(&accept_shared));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        HoldProxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    fn url(&self, options: &str) -> String {
        format!("memcached://127.0.0.1:{}?{options}", self.port)
    }

    /// Holds back the answer to the next request containing `pattern`.
    fn arm(&self, pattern: &str) {
        let mut st = self.shared.lock();
        st.armed = Some(pattern.as_bytes().to_vec());
        st.holding = false;
        st.released = false;
    }

    /// Waits until the server's answer to the armed request is held here.
    fn wait_holding(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.shared.lock();
        while !st.holding {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    fn release(&self) {
        self.shared.lock().released = true;
        self.shared.changed.notify_all();
    }
}

impl Drop for HoldProxy {
    fn drop(&mut self) {
        self.release();
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Copies both ways between one client and the server. The client → server
/// side marks the connection held when it forwards the armed request; the
/// server → client side then keeps what the server sends until released.
fn connect_pair(client: TcpStream, server: TcpStream, shared: Arc<HoldShared>) {
    let held = Arc::new(AtomicBool::new(false));
    let (Ok(mut client_r), Ok(mut server_w)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let (mut server_r, mut client_w) = (server, client);
    {
        let (held, shared) = (Arc::clone(&held), Arc::clone(&shared));
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = client_r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                {
                    let mut st = shared.lock();
                    let hit = st
                        .armed
                        .as_ref()
                        .is_some_and(|p| buf[..n].windows(p.len()).any(|w| w == &p[..]));
                    if hit {
                        st.armed = None;
                        held.store(true, Ordering::SeqCst);
                    }
                }
                if server_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = server_w.shutdown(Shutdown::Write);
        });
    }
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = server_r.read(&mut buf) {
            if n == 0 {
                break;
            }
            if held.load(Ordering::SeqCst) {
                let mut st = shared.lock();
                st.holding = true;
                shared.changed.notify_all();
                while !st.released && !shared.stop.load(Ordering::SeqCst) {
                    st = shared
                        .changed
                        .wait_timeout(st, Duration::from_millis(20))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                held.store(false, Ordering::SeqCst);
            }
            if client_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = client_w.shutdown(Shutdown::Write);
    });
}

/// Waits until `f` holds (the other threads' progress shows in the
/// handle's counters), or fails the test with `what`.
fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// The item's data, as a database row: written before its bump.
static ITEM_DATA: AtomicU64 = AtomicU64::new(1);

fn render_item() -> Result<String, String> {
    Ok(format!("item={};", ITEM_DATA.load(Ordering::SeqCst)))
}

/// A page block with an item block nested in it, as the chaos readers
/// render: the page's own token is `page`, the item's is nested.
fn read_page(cache: &ICache, page: &str, item: &str) -> Result<String, String> {
    cache.fragment("page", &[page], || {
        cache.fragment("item", &[item], render_item)
    })
}

/// Three readers of one page, in two processes (two handles): the holder
/// renders the page while the waiter (`first`) waits for its entry. The
/// waiter's last look reads the nested item's generation just before a bump
/// of the item; a second thread of the waiter's process (`second`) begins
/// after that bump completed, misses (the item moved), and joins the
/// waiter's flight. It must not get the holder's entry, which shows the
/// item before its commit: it renders, or waits for a render, of its own.
#[test]
fn a_thread_that_joins_a_lease_waiter_after_a_nested_bump_is_not_served_the_old_entry() {
    let Some(server) = MemcachedServer::start() else {
        return;
    };
    let proxy = HoldProxy::start(server.port());
    // Long time-outs: the held answer must not time out, nor the lease run
    // out while the test holds it.
    let options = "prefix=leasefound&lease_ms=20000&timeout_ms=20000";
    let holder = ICache::from_url(&format!("{}?{options}", server.url())).expect("holder handle");
    let waiter = ICache::from_url(&proxy.url(options)).expect("waiter handle");
    let (page, item) = ("lf-page-7", "lf-item-14");
    ITEM_DATA.store(3, Ordering::SeqCst);

    thread::scope(|s| {
        // The holder takes the lease for the page and renders it when told.
        let (rendering_tx, rendering_rx) = mpsc::channel::<()>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let holder = &holder;
        let holding = s.spawn(move || {
            holder.fragment("page", &[page], || {
                let _ = rendering_tx.send(());
                let _ = go_rx.recv();
                holder.fragment("item", &[item], render_item)
            })
        });
        rendering_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the holder renders the page (it holds the lease)");

        // The waiter misses, finds the lease taken, and polls for the entry.
        let first = s.spawn(|| read_page(&waiter, page, item));
        wait_for("the waiter waits for the holder's lease", || {
            waiter.stats().lease_waits == 1
        });

        // Its look at the stored entry reads the item's generation (the one
        // request that names the item: no thread of this process has seen
        // the page's nested tokens yet); the answer is held back here.
        proxy.arm(item);
        go_tx.send(()).expect("tell the holder to render");
        assert_eq!(
            holding.join().expect("the holder's render").as_deref(),
            Ok("item=3;")
        );
        assert!(
            proxy.wait_holding(Duration::from_secs(20)),
            "the waiter never read the item's generation through the proxy"
        );

        // The item's commit, then its bump: completed before `second` begins.
        ITEM_DATA.store(4, Ordering::SeqCst);
        holder.incr(item).expect("bump the item");

        let misses = waiter.stats().misses;
        let second = s.spawn(|| read_page(&waiter, page, item));
        // It misses (the page entry's item moved) and joins the waiter's
        // flight (same page, same version of the page's own tokens).
        wait_for("the second reader misses", || {
            waiter.stats().misses > misses
        });
        thread::sleep(Duration::from_millis(300));
        proxy.release();

        let first = first.join().expect("the waiter");
        // It began before the bump: the holder's entry serves it.
        assert_eq!(first.as_deref(), Ok("item=3;"));
        let second = second.join().expect("the second reader");
        assert_eq!(
            second.as_deref(),
            Ok("item=4;"),
            "a read that began after the item's bump completed got the page as it was before"
        );
    });
}
