//! Run with: `cargo run --release -p icache-demo` then open http://127.0.0.1:3000/
//!
//! Flags (or environment): `--addr` (`ICACHE_DEMO_ADDR`, default
//! 127.0.0.1:3000), `--data-dir` (`ICACHE_DEMO_DATA`, default `./data`), and
//! `--cache-url` (`ICACHE_URL`) for the cache (default: in-process), and
//! `--purge-url` (`ICACHE_PURGE_URL`) for the proxy in front to purge after
//! each bump (Varnish: `http://127.0.0.1:PORT`; see
//! `icache_http::Purger::from_url`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The seed's movies site on icache.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "ICACHE_DEMO_ADDR", default_value = icache_demo::DEFAULT_ADDR)]
    addr: SocketAddr,
    /// Directory of the SQLite database (created and seeded on first start).
    #[arg(long, env = "ICACHE_DEMO_DATA", default_value = "data")]
    data_dir: PathBuf,
    /// Cache URL: memory://, redis://…, memcached://… (default: in-process).
    #[arg(long, env = "ICACHE_URL")]
    cache_url: Option<String>,
    /// Proxy to purge after each bump: http://127.0.0.1:PORT (Varnish with
    /// deploy/varnish/icache.vcl), fastly://SERVICE?token=…,
    /// cloudflare://ZONE?token=… (default: none).
    #[arg(long, env = "ICACHE_PURGE_URL")]
    purge_url: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    // The recorder goes in before the cache opens, so icache reports to it.
    icache_demo::prometheus();
    let cache = match args.cache_url.as_deref() {
        Some(url) if !url.trim().is_empty() => icache::ICache::from_url(url),
        _ => Ok(icache::ICache::memory()),
    };
    let cache = match cache {
        Ok(c) => c,
        Err(e) => {
            eprintln!("icache-demo: {e}");
            return ExitCode::from(2);
        }
    };
    // Checked once at startup: a cache that does not answer is said here
    // (the site still runs, rendering uncached), not only in later warnings.
    if let Err(e) = cache.ping_async().await {
        tracing::warn!(
            "the cache at {} does not answer: {e}; pages render uncached until it does",
            cache.url()
        );
    }
    let started = std::time::Instant::now();
    let state = match icache_demo::open(&args.data_dir, cache.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "icache-demo: cannot open the database in {}: {e}",
                args.data_dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    if let Some(url) = args.purge_url.as_deref().filter(|u| !u.trim().is_empty()) {
        match icache_http::Purger::from_url(url.trim()) {
            Ok(purger) => {
                tracing::info!("purging {url} after each bump");
                state.set_purger(purger);
            }
            Err(e) => {
                eprintln!("icache-demo: ICACHE_PURGE_URL: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let listener = match tokio::net::TcpListener::bind(args.addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("icache-demo: cannot listen on {}: {e}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        "movies site on http://{} (cache: {}, data: {}, ready in {:?})",
        args.addr,
        cache.url(),
        args.data_dir.display(),
        started.elapsed()
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match axum::serve(listener, icache_demo::app(state))
        .with_graceful_shutdown(shutdown)
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("icache-demo: {e}");
            ExitCode::FAILURE
        }
    }
}
