//! The example on a real port: a hit skips the query, a post invalidates.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum_minijinja_example::{Db, app, state};

/// One HTTP/1.1 request (connection closed after it); the whole response.
fn http(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(request.as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

fn get(port: u16) -> String {
    http(
        port,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
}

#[test]
fn a_hit_skips_the_query_and_a_post_invalidates() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let db = Arc::new(Db::default());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let s = state(icache::ICache::memory(), db.clone());
    rt.spawn(async move { axum::serve(listener, app(s)).await });

    assert!(get(port).contains("<ul id=\"movies\"></ul>"));
    assert!(get(port).contains("<ul id=\"movies\"></ul>"));
    assert_eq!(
        db.queries.load(Ordering::SeqCst),
        1,
        "the second page was a hit"
    );
    let body = "title=Alien";
    let posted = http(
        port,
        &format!(
            "POST /movies HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(posted.starts_with("HTTP/1.1 303"), "{posted}");
    assert!(
        get(port).contains("<li>Alien</li>"),
        "the bump invalidated the list"
    );
    assert_eq!(db.queries.load(Ordering::SeqCst), 2);
}
