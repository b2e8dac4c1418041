//! Test support: the site on a free loopback port, and a tiny HTTP client.
//!
//! Used by this crate's end-to-end tests and by `icache-cli`'s. Kept in the
//! library (hidden from docs) so both share one copy.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use icache::ICache;

use crate::AppState;

/// The site, serving on `127.0.0.1:<free port>` from its own runtime and its
/// own temporary data directory (removed on drop).
pub struct Site {
    /// The port it listens on.
    pub port: u16,
    /// Its state (the cache handle, the database).
    pub state: AppState,
    dir: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Site {
    /// Starts the site on `cache`.
    pub fn start(cache: ICache) -> Site {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "icache-demo-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let state = crate::open(&dir, cache).expect("open the site");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        runtime.spawn(crate::serve(listener, state.clone()));
        Site {
            port,
            state,
            dir,
            runtime: Some(runtime),
        }
    }

    /// The site's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The site's SQLite file (for a writer outside the site).
    pub fn db_path(&self) -> PathBuf {
        self.dir.join("movies.db")
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Response {
        self.request(&format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        ))
    }

    /// `POST path` with a form body.
    pub fn post_form(&self, path: &str, body: &str) -> Response {
        self.post(path, "application/x-www-form-urlencoded", body)
    }

    /// `POST path` with any content type.
    pub fn post(&self, path: &str, content_type: &str, body: &str) -> Response {
        self.request(&format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    }

    fn request(&self, raw: &str) -> Response {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to the site");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(raw.as_bytes()).expect("send");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).expect("read");
        parse(&buf)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn parse(buf: &[u8]) -> Response {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The number in `<dd id="NAME">N</dd>` of the stats panel.
pub fn stat(body: &str, name: &str) -> u64 {
    let tag = format!("<dd id=\"{name}\">");
    body.split_once(&tag)
        .and_then(|(_, rest)| rest.split_once('<'))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the stats panel"))
}

/// The movie ids of a list (`<li data-movie="ID">`), in page order, inside the
/// element with `id="LIST"`.
pub fn movie_order(body: &str, list: &str) -> Vec<i64> {
    let start = format!("id=\"{list}\"");
    let Some((_, rest)) = body.split_once(&start) else {
        return Vec::new();
    };
    let rest = rest.split_once("</ol>").map_or(rest, |(l, _)| l);
    rest.split("<li data-movie=\"")
        .skip(1)
        .filter_map(|s| s.split_once('"').and_then(|(id, _)| id.parse().ok()))
        .collect()
}
