//! Run with `cargo run --release -p icache-chaos -- --seconds 600` (the full
//! run: every backend, 10 minutes of faults each), or one backend and a seed:
//! `cargo run --release -p icache-chaos -- --backend redis --seconds 60 --seed 42`.
//! `cargo test -p icache-chaos` is the CI schedule (8 s of faults + 2 s calm
//! per backend, about a minute in all). `--help` lists the options.
//!
//! Three OS processes share one backend (memory: one process, as the memory
//! backend lives in a process), each with writer and reader threads. Writers
//! commit to a shared file database under `flock`, then bump the item's token;
//! readers note which bumps had completed before they began, render a page of
//! nested cached blocks (or one item block), and count a **stale read** if
//! it shows less. Renders are sometimes slow (20–80 ms) or panic on purpose.
//!
//! Meanwhile a schedule drawn from the seed injects, one fault at a time with
//! 0.2–1.5 s of calm between them:
//!
//! | backend | faults |
//! |---|---|
//! | memory (`max_bytes=65536`) | tokens forgotten (evictions), all tokens forgotten (no flush exists), filler values |
//! | redis (`maxmemory 4mb`) | proxy refuse / hang / freeze, kill -9 and restart empty, kill -9 and restart from an older `SAVE`, `CLIENT PAUSE`, keys deleted, `FLUSHALL`, filler |
//! | memcached (`-m 4`) | proxy refuse / hang / freeze, kill -9 and restart, keys deleted, `flush_all`, filler |
//! | redis-cluster (3 masters) | node kill -9 and restart, `CLIENT PAUSE` of a node, keys deleted, `FLUSHALL` on every node (no proxies: a cluster tells clients its nodes' real ports) |
//! | memcached-pool (3 servers) | proxy faults on one server, a server leaving for 1–4 s and returning with its old data, kill -9 and restart of one, keys deleted, `flush_all`, filler |
//!
//! Clients use `timeout_ms=100&connect_timeout_ms=100&lease_ms=1000`. Every bump and every
//! read (its renders included) must finish within `--hung-ms` (3 s).
//!
//! The run fails (exit code 1) on any stale or malformed read, hung call,
//! panic other than the injected ones (or an injected one that never reached
//! its caller), stuck thread or child process, or if it checked nothing: no
//! reads, no completed bumps, no cache hits or no backend faults. A failing
//! run prints its seed and the command that replays it. The seed fixes the
//! fault schedule and every thread's choices, not how the OS interleaves
//! them: a replay usually, not always, fails the same way. `--faults` keeps
//! only some fault kinds, to find which one breaks something.
//!
//! `--writers db` (network backends): the bumps come from PostgreSQL's outbox
//! (`icache::db`). Writer processes only commit UPDATEs to a watched table,
//! three relay processes bump, readers render the table's rows, and a second
//! schedule SIGKILLs writers and relays (`kill9_writer`, `kill9_relay`) and
//! restarts them. Reads are checked against what the relays had applied
//! (recorded by their `after_bump` hook); at the end the outbox must be empty
//! and every item's read through the cache must show its last commit.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(icache_chaos::main_with_args(&args));
}
