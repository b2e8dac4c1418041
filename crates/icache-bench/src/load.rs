//! A small HTTP/1.1 load generator: keep-alive connections, one per client
//! thread, each sending `GET` requests back to back over a list of paths for
//! a fixed time. Enough for the demo site (Content-Length or chunked bodies);
//! no dependency on oha or wrk being installed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::timing::quantile;

/// What one load run measured.
#[derive(Debug, Clone)]
pub struct Load {
    /// Requests completed inside the measured window.
    pub requests: u64,
    /// Requests per second over the window.
    pub rps: f64,
    /// Median latency, microseconds.
    pub p50_us: u64,
    /// 99th percentile latency, microseconds.
    pub p99_us: u64,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// One keep-alive connection to the site.
pub struct Client {
    port: u16,
    conn: Option<(BufReader<TcpStream>, TcpStream)>,
    line: Vec<u8>,
    /// The last response body (reused between requests).
    pub body: Vec<u8>,
    /// Extra request header lines, each ending in `\r\n`.
    pub headers: String,
}

impl Client {
    /// A client of `127.0.0.1:port`; connects on the first request.
    pub fn new(port: u16) -> Self {
        Client {
            port,
            conn: None,
            line: Vec::new(),
            body: Vec::new(),
            headers: String::new(),
        }
    }

    /// `GET path`; returns the status. The body is in `self.body`.
    pub fn get(&mut self, path: &str) -> io::Result<u16> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(("127.0.0.1", self.port))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            let writer = stream.try_clone()?;
            self.conn = Some((BufReader::with_capacity(64 * 1024, stream), writer));
        }
        let result = self.exchange(path);
        if !matches!(result, Ok((_, true))) {
            // An error or `Connection: close`: a new connection next time.
            self.conn = None;
        }
        result.map(|(status, _)| status)
    }

    /// Sends one request and reads its response: (status, keep-alive).
    fn exchange(&mut self, path: &str) -> io::Result<(u16, bool)> {
        let Some((reader, writer)) = self.conn.as_mut() else {
            return Err(bad("not connected"));
        };
        write!(
            writer,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{}\r\n",
            self.headers
        )?;
        let line = &mut self.line;
        let mut next_line = |reader: &mut BufReader<TcpStream>| -> io::Result<String> {
            line.clear();
            reader.read_until(b'\n', line)?;
            if !line.ends_with(b"\n") {
                return Err(bad("connection closed mid-response"));
            }
            Ok(String::from_utf8_lossy(line).trim_end().to_owned())
        };
        let status_line = next_line(reader)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let (mut length, mut chunked, mut keep_alive) = (None, false, true);
        loop {
            let header = next_line(reader)?;
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                "connection" => keep_alive = !value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        self.body.clear();
        if status == 304 || status == 204 || status < 200 {
            // No body, whatever the headers say (RFC 9112 §6.3).
        } else if chunked {
            loop {
                let size_line = next_line(reader)?;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| bad(format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !next_line(reader)?.is_empty() {}
                    break;
                }
                let start = self.body.len();
                self.body.resize(start + size, 0);
                reader.read_exact(&mut self.body[start..])?;
                next_line(reader)?;
            }
        } else if let Some(n) = length {
            self.body.resize(n, 0);
            reader.read_exact(&mut self.body)?;
        } else {
            reader.read_to_end(&mut self.body)?;
            keep_alive = false;
        }
        Ok((status, keep_alive))
    }
}

/// Runs `clients` threads against `127.0.0.1:port` over `paths` (each
/// client starts at a different place in the list): `warmup` unmeasured,
/// then `duration` measured. Any status but 200 aborts with an error.
pub fn run(
    port: u16,
    clients: usize,
    paths: &[String],
    warmup: Duration,
    duration: Duration,
) -> io::Result<Load> {
    let requests: Vec<(String, String)> =
        paths.iter().map(|p| (p.clone(), String::new())).collect();
    run_requests(port, clients, &requests, 200, warmup, duration)
}

/// [`run`] over (path, extra header lines) pairs, each answer expected to
/// have status `expect` (304 for revalidations).
pub fn run_requests(
    port: u16,
    clients: usize,
    requests: &[(String, String)],
    expect: u16,
    warmup: Duration,
    duration: Duration,
) -> io::Result<Load> {
    let paths = requests;
    let go = Barrier::new(clients);
    let results: Vec<io::Result<(u64, Vec<u64>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|id| {
                let go = &go;
                s.spawn(move || -> io::Result<(u64, Vec<u64>)> {
                    let mut client = Client::new(port);
                    let mut latencies = Vec::with_capacity(64 * 1024);
                    let mut next = id * paths.len() / clients.max(1);
                    go.wait();
                    let started = Instant::now();
                    let (from, until) = (started + warmup, started + warmup + duration);
                    let mut done = 0u64;
                    loop {
                        let sent = Instant::now();
                        if sent >= until {
                            break;
                        }
                        let (path, headers) = &paths[next % paths.len()];
                        next += 1;
                        if client.headers != *headers {
                            client.headers.clone_from(headers);
                        }
                        let status = client.get(path)?;
                        if status != expect {
                            return Err(bad(format!("GET {path} answered {status}, not {expect}")));
                        }
                        let now = Instant::now();
                        // Only requests sent and answered inside the window.
                        if sent >= from && now <= until {
                            done += 1;
                            latencies.push(now.duration_since(sent).as_micros() as u64);
                        }
                    }
                    Ok((done, latencies))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(bad("a load client thread panicked")))
            })
            .collect()
    });
    let mut requests = 0;
    let mut all = Vec::new();
    for r in results {
        let (n, lat) = r?;
        requests += n;
        all.extend(lat);
    }
    all.sort_unstable();
    Ok(Load {
        requests,
        rps: requests as f64 / duration.as_secs_f64(),
        p50_us: quantile(&all, 0.50),
        p99_us: quantile(&all, 0.99),
    })
}
