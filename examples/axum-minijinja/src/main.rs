//! Run with: `cargo run -p axum-minijinja-example`, then open http://127.0.0.1:3001/

use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache = icache::ICache::from_env()?;
    if let Err(e) = cache.ping_async().await {
        eprintln!("warning: the cache does not answer ({e}); pages render uncached");
    }
    let app = axum_minijinja_example::app(axum_minijinja_example::state(cache, Arc::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    println!("http://127.0.0.1:3001/");
    axum::serve(listener, app).await?;
    Ok(())
}
