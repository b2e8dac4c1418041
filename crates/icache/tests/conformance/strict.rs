//! `near=tracking&strict=true`: a bump returns only once no process trusts a
//! table without it. A writer process bumps, then tells a reader process
//! through a pipe; the reader, whose link to Redis is slow (its answers and
//! invalidations arrive late), must see the bump on its very next read.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use icache::ICache;
use icache_test_support::{RedisServer, SlowProxy};

/// The environment variable that turns this test binary into the writer.
const WRITER_ENV: &str = "ICACHE_TEST_STRICT_WRITER_URL";
/// The bound both processes are configured with.
const MAX_LAG_MS: u64 = 60;
/// How late the reader's answers and invalidations arrive.
const LINK_DELAY: Duration = Duration::from_millis(20);

/// The writer process: for each line on stdin, bump `movies` and print
/// `done <generation>`.
#[test]
fn strict_writer_process() {
    let Ok(url) = std::env::var(WRITER_ENV) else {
        return; // run as a normal test: nothing to do
    };
    let cache = ICache::from_url(&url).expect("writer opens");
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        let generation = cache.incr("movies").expect("bump");
        writeln!(out, "done {generation}").expect("pipe to the reader");
        out.flush().expect("pipe to the reader");
    }
}

/// Runs `rounds` bump → pipe → read rounds with both processes on
/// `options`; returns the stale reads and the mean time from asking for a
/// bump to hearing it is done.
fn rounds(options: &str, rounds: usize) -> Option<(usize, Duration)> {
    let redis = RedisServer::start()?;
    let slow = SlowProxy::start(redis.port(), LINK_DELAY);
    let reader = ICache::from_url(&format!("{}/?{options}", slow.redis_url())).expect("reader");
    let exe = std::env::current_exe().expect("this test binary");
    let mut writer = Command::new(exe)
        .args([
            "strict::strict_writer_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WRITER_ENV, format!("{}/?{options}", redis.url()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the writer process");
    let mut to_writer = writer.stdin.take().expect("stdin piped");
    let mut from_writer = BufReader::new(writer.stdout.take().expect("stdout piped"));

    // The tracking connection is up before the first round.
    reader.get_sum(&["movies"]).expect("get_sum");
    std::thread::sleep(Duration::from_millis(300));
    let mut stale = 0;
    let mut bump_time = Duration::ZERO;
    for _ in 0..rounds {
        // The reader knows the current generation (in its table).
        reader.get_sum(&["movies"]).expect("get_sum");
        let asked = Instant::now();
        writeln!(to_writer, "bump").expect("pipe to the writer");
        to_writer.flush().expect("pipe to the writer");
        let generation: u64 = loop {
            let mut line = String::new();
            if from_writer
                .read_line(&mut line)
                .expect("pipe from the writer")
                == 0
            {
                panic!("the writer process ended");
            }
            // The harness's "test … ... " may start the first line.
            if let Some((_, g)) = line.trim().rsplit_once("done ") {
                break g.parse().expect("a generation");
            }
        };
        bump_time += asked.elapsed();
        // The next read after the bump's news.
        if reader.get_sum(&["movies"]).expect("get_sum") != generation {
            stale += 1;
        }
    }
    drop(to_writer);
    let _ = writer.wait();
    Some((stale, bump_time / rounds as u32))
}

/// With `strict=true`: 0 stale reads in 500 rounds, though the reader's
/// link is slow, and the bumps take about `max_lag_ms` longer.
#[test]
fn strict_bumps_are_seen_by_the_next_read_of_another_process() {
    let options = format!("near=tracking&max_lag_ms={MAX_LAG_MS}&strict=true");
    let Some((stale, bump)) = rounds(&options, 500) else {
        return;
    };
    assert_eq!(stale, 0, "stale reads with strict=true");
    assert!(
        bump >= Duration::from_millis(MAX_LAG_MS),
        "a strict bump took {bump:?}, less than max_lag_ms"
    );
}

/// The same test without `strict`: the reader trusts a table the slow
/// link has not updated yet, and serves the old generation. This is what
/// the test above would catch.
#[test]
fn without_strict_the_same_test_sees_stale_reads() {
    let options = format!("near=tracking&max_lag_ms={MAX_LAG_MS}");
    let Some((stale, _)) = rounds(&options, 500) else {
        return;
    };
    assert!(
        stale > 50,
        "only {stale} stale reads of 500 without strict: the test does not discriminate"
    );
}

/// `strict=true` keeps hits free: a hit makes no round trip, and
/// `max_lag()` is zero.
#[test]
fn strict_hits_make_no_round_trip() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let proxy = icache_test_support::Proxy::start(redis.port());
    let cache = ICache::from_url(&format!(
        "{}/?near=tracking&max_lag_ms={MAX_LAG_MS}&strict=true",
        proxy.redis_url()
    ))
    .expect("opens");
    assert_eq!(cache.max_lag(), Duration::ZERO);
    let started = Instant::now();
    cache.incr("movies").expect("bump");
    assert!(started.elapsed() >= Duration::from_millis(MAX_LAG_MS));
    // Warm: the generation is in the table, the tracking connection trusted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let v = cache.get_sum(&["movies"]).expect("get_sum");
        let trips = proxy.round_trips();
        cache.get_sum(&["movies"]).expect("get_sum");
        if proxy.round_trips() == trips || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Reads only: none of them may reach the server (the tracking thread's
    // pings do, every max_lag/4, so count over a short window).
    let trips = proxy.round_trips();
    for _ in 0..1000 {
        assert_eq!(cache.get_sum(&["movies"]).expect("get_sum"), v);
    }
    let made = proxy.round_trips() - trips;
    assert!(made <= 3, "{made} round trips for 1000 strict reads");
}
