//! Ratings invalidate through the database: the site's request code bumps
//! nothing; the `ratings` triggers do, for the site and for any other writer.

use std::time::{Duration, Instant};

use icache::ICache;
use icache_demo::testing::{Site, movie_order};

#[test]
fn a_rating_is_bumped_by_the_database_and_read_back_at_once() {
    let cache = ICache::memory();
    let site = Site::start(cache.clone());
    let before = movie_order(&site.get("/users/3").body, "personal");
    let last = *before.last().expect("a movie");
    let version = cache.get_sum(&["movies", "3"]).expect("version");
    let r = site.post_form("/users/3/rate", &format!("movie_id={last}&rating=5"));
    assert_eq!(r.status, 303, "{}", r.body);
    // Applied before the answer: the bumps went through the outbox.
    assert_eq!(
        cache.get_sum(&["movies", "3"]).expect("version"),
        version.wrapping_add(2)
    );
    let page = site.get("/users/3").body;
    assert!(
        page.contains("the database bumped"),
        "the note says who bumped"
    );
    assert!(page.contains("<code class=\"bumped\">3</code>"));
    assert!(page.contains("<code class=\"bumped\">movies</code>"));
    assert!(
        movie_order(&page, "personal")
            .iter()
            .position(|m| *m == last)
            < before.iter().position(|m| *m == last)
    );
    let status =
        icache::db::status(&format!("sqlite://{}", site.db_path().display())).expect("status");
    assert_eq!(status.pending, 0);
    assert_eq!(status.watched.len(), 2, "{status}");
}

#[test]
fn a_writer_outside_the_site_invalidates_the_right_pages() {
    let cache = ICache::memory();
    let site = Site::start(cache.clone());
    let user3 = movie_order(&site.get("/users/3").body, "personal");
    let user4 = cache.generations(&["4"]).expect("generation");
    // Another program (no icache code in it) reverses user 3's ratings.
    let conn = rusqlite::Connection::open(site.db_path()).expect("open");
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    conn.execute(
        "UPDATE ratings SET rating = 6 - rating WHERE user_id = 3",
        [],
    )
    .expect("update");
    // The site's relay polls every second.
    let start = Instant::now();
    loop {
        let now = movie_order(&site.get("/users/3").body, "personal");
        if now != user3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "user 3's page never changed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Only user 3's token (and `movies`) moved: user 4's did not.
    assert_eq!(cache.generations(&["4"]).expect("generation"), user4);
}
