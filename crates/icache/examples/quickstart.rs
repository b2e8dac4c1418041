//! The seed's movies example, on the in-process cache (or `ICACHE_URL`).
//!
//! Run with: `cargo run -p icache --example quickstart`
//! (or `ICACHE_URL=redis://127.0.0.1:6379 cargo run -p icache --features redis --example quickstart`)

use std::time::Instant;

use icache::ICache;

/// Stands in for an expensive database query and template render.
fn render_ratings(user: u32, movies: &[(&str, u8)]) -> String {
    let mut sorted = movies.to_vec();
    sorted.sort_by_key(|m| std::cmp::Reverse(m.1));
    let mut html = format!("<ul class=\"user-{user}\">");
    for (title, stars) in sorted {
        html.push_str(&format!("<li>{title}: {stars}★</li>"));
    }
    html.push_str("</ul>");
    std::thread::sleep(std::time::Duration::from_millis(20));
    html
}

/// The reader: version first, then (on a miss) data and render, then store.
fn page(cache: &ICache, user: u32, movies: &[(&str, u8)]) -> icache::Result<(String, bool)> {
    let user_token = format!("user:{user}");
    let tokens = ["movies-personal-rating", "movies", user_token.as_str()];
    let key = format!("movies-personal-rating#{user}");
    let version = cache.get_sum(&tokens)?;
    if let Some(html) = cache.get_versioned(&key, version)? {
        return Ok((html.to_string(), true));
    }
    let html = render_ratings(user, movies);
    cache.set_versioned(&key, html.as_str(), version)?;
    Ok((html, false))
}

/// One request for user 42's page, timed.
fn request(cache: &ICache, round: u32, movies: &[(&str, u8)]) -> icache::Result<()> {
    let t = Instant::now();
    let (html, hit) = page(cache, 42, movies)?;
    println!(
        "request {round}: {} in {:?}: {html}",
        if hit { "hit " } else { "miss" },
        t.elapsed()
    );
    Ok(())
}

fn main() -> icache::Result<()> {
    let cache = ICache::from_env()?;
    println!("icache on {} ({})", cache.backend_name(), cache.url());
    // Check the cache once at startup: a wrong URL or a server that is down
    // is said here, not found later in a log of fail-open warnings.
    if let Err(e) = cache.ping() {
        eprintln!("warning: the cache does not answer ({e}); pages will render uncached");
    }
    let mut movies = vec![("Alien", 4), ("Brazil", 5), ("Cube", 2)];

    for round in 1..=3 {
        request(&cache, round, &movies)?;
    }

    // A writer changes the data, commits, then bumps the token.
    movies[2].1 = 5;
    cache.incr("movies")?;
    println!("-- rated Cube 5★ and bumped 'movies' --");

    for round in 4..=5 {
        request(&cache, round, &movies)?;
    }
    Ok(())
}
