"""The same Django page with {% icache %} and with Django's own {% cache %}.

    python crates/icache-django/bench/django_bench.py [--rounds 15] [--pages 100] [--out bench/DJANGO.md]

Needs the package installed (``pip install ./crates/icache-django``), Django
5.2, and for Django's own Redis and memcached backends ``redis`` and
``pymemcache`` from the package index. Starts its own ``redis-server`` and
``memcached`` on free loopback ports and stops them.

The page: 10 blocks, each a 200-item loop, every block a HIT (warmed first).
For each backend both tags run in the same process, interleaved round by
round (A, B, A, B, …) so that the machine's noise falls on both; the ratio is
the median page time of Django's tag over the median of icache's.

``--near-url URL`` adds a row for an extra icache URL on the same Redis, for
options such as ``?near=tracking`` (the near cache): ``{port}`` in it is
replaced by the bench's Redis port. The default adds
``redis://127.0.0.1:{port}/0?near=tracking``; a build whose core does not
know that option says so in the report instead of a number.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BLOCKS = 10
ITEMS = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str):
    program = shutil.which("redis-server" if kind == "redis" else "memcached")
    if not program:
        sys.exit(f"django_bench: {kind} is not installed")
    port = free_port()
    tmp = tempfile.mkdtemp(prefix=f"icache-bench-{kind}-")
    if kind == "redis":
        args = [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--dir", tmp]
    else:
        args = [program, "-u", "root", "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port, tmp
        except OSError:
            time.sleep(0.02)
    proc.kill()
    sys.exit(f"django_bench: {kind} did not start")


def page(tag: str) -> str:
    """10 blocks, each a 200-item loop; `tag` opens a block with its key."""
    blocks = []
    for i in range(BLOCKS):
        body = ("<ul>{% for m in movies %}<li>{{ m.title }} ({{ m.year }}) {{ m.rating|floatformat:1 }}"
                "</li>{% endfor %}</ul>")
        blocks.append(tag.replace("{i}", str(i)) + body + ("{% endicache %}" if "icache" in tag else "{% endcache %}"))
    return "{% load cache icache %}<html><body>" + "\n".join(blocks) + "</body></html>"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--pages", type=int, default=100, help="pages rendered per round and tag")
    ap.add_argument("--near-url", default="redis://127.0.0.1:{port}/0?near=tracking")
    ap.add_argument("--out", help="write the Markdown report here")
    ap.add_argument("--append", action="store_true", help="append a run to --out instead of replacing it")
    ap.add_argument("--title", default="", help="a heading for this run (which build, which core)")
    args = ap.parse_args()

    redis_proc, redis_port, redis_tmp = start("redis")
    mc_proc, mc_port, _ = start("memcached")
    try:
        rows = run(args, redis_port, mc_port)
    finally:
        for p in (redis_proc, mc_proc):
            p.terminate()
            p.wait(5)
        shutil.rmtree(redis_tmp, ignore_errors=True)
    report = render_report(args, rows)
    print(report)
    if args.out:
        with open(args.out, "a" if args.append else "w") as f:
            f.write(report)


def run(args, redis_port: int, mc_port: int):
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        INSTALLED_APPS=["django_icache"],
        CACHES={
            "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                      "LOCATION": f"redis://127.0.0.1:{redis_port}/0"},
            "memcached": {"BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
                          "LOCATION": f"127.0.0.1:{mc_port}"},
        },
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}],
        LOGGING_CONFIG=None,
    )
    django.setup()
    from django.template import engines
    from django.test.utils import override_settings

    from django_icache import icache

    engine = engines["django"]
    movies = [{"title": f"Movie {i}", "year": 1950 + i % 70, "rating": (i * 37 % 100) / 10} for i in range(ITEMS)]
    ctx = {"movies": movies, "user": {"id": 7}}
    uncached = engine.from_string(page("<div>").replace("{% endcache %}", "</div>"))
    ours = engine.from_string(page("{% icache 'movies' user.id %}"))

    scenarios = [
        ("LocMem", "default", {"ICACHE_CACHE": "default"}),
        ("Redis", "redis", {"ICACHE_CACHE": "redis"}),
        ("memcached", "memcached", {"ICACHE_CACHE": "memcached"}),
        ("Redis, near=tracking", "redis", {"ICACHE_URL": args.near_url.format(port=redis_port)}),
    ]
    rows = []
    for label, alias, icache_settings in scenarios:
        theirs = engine.from_string(page("{% cache 3600 'block{i}' user.id using='" + alias + "' %}"))
        with override_settings(**icache_settings):
            try:
                url = icache.url
            except Exception as e:  # noqa: BLE001
                rows.append({"label": label, "error": f"{type(e).__name__}: {e}"})
                continue
            expected = uncached.render(ctx).replace("<div>", "").replace("</div>", "")
            for t in (ours, theirs):  # warm: every block a hit from now on
                t.render(ctx)
                assert t.render(ctx) == expected, f"{label}: output differs from the uncached page"
            hits = icache.stats()["hits"]
            times = {"icache": [], "django": [], "uncached": []}
            for _ in range(args.rounds):
                for name, t in (("icache", ours), ("django", theirs), ("uncached", uncached)):
                    n = args.pages if name != "uncached" else max(5, args.pages // 10)
                    start = time.perf_counter()
                    for _ in range(n):
                        t.render(ctx)
                    times[name].append((time.perf_counter() - start) / n)
            assert icache.stats()["misses"] == 0 or icache.stats()["hits"] - hits >= args.rounds * args.pages * BLOCKS
            med = {k: statistics.median(v) for k, v in times.items()}
            per_round = statistics.median(d / i for d, i in zip(times["django"], times["icache"]))
            rows.append({"label": label, "url": url, "backend": icache.backend, "med": med,
                         "ratio": med["django"] / med["icache"], "per_round": per_round})
    return rows


TARGETS = {"LocMem": 2.0, "Redis": 1.3, "memcached": 1.3, "Redis, near=tracking": 10.0}


def render_report(args, rows) -> str:
    import django

    out = [""] if args.append else [
        "# Django: `{% icache %}` against Django's own `{% cache %}`",
        "",
        "Written by `python crates/icache-django/bench/django_bench.py --out bench/DJANGO.md`, never by hand.",
        "",
    ]
    if args.title:
        out += [f"## {args.title}", ""]
    out += [
        f"The page: {BLOCKS} blocks, each a {ITEMS}-item loop; every block a hit (both tags warmed first, "
        "output checked equal to the uncached page). Both tags on the same backend, in one process, "
        f"interleaved round by round: {args.rounds} rounds of {args.pages} pages per tag. Times are the "
        "median page time; the ratio is Django's over icache's (higher is better for icache). "
        "The machine is shared and noisy: the ratios, measured side by side, are the result; "
        "absolute times are indicative.",
        "",
        f"Python {platform.python_version()}, Django {django.get_version()}, {os.cpu_count()} CPUs.",
        "",
        "| backend | icache URL | icache page | Django `{% cache %}` page | uncached page | ratio (median of rounds) | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        target = TARGETS[r["label"]]
        if "error" in r:
            out.append(f"| {r['label']} | – | – | – | – | – | {target:g}× | not measured |")
            why = r["error"]
            if 'unknown option "near"' in why:
                why = ("this build's core has no `near=` option (the near cache, issue 12, is not in it); "
                       "run the bench on a build that has it. The core said: " + why)
            notes.append(f"* **{r['label']}**: not measured: {why}")
            continue
        m = r["med"]
        met = "yes" if r["ratio"] >= target else "**no**"
        out.append(
            f"| {r['label']} | `{r['url']}` | {m['icache'] * 1e6:,.0f} µs | {m['django'] * 1e6:,.0f} µs | "
            f"{m['uncached'] * 1e6:,.0f} µs | **{r['ratio']:.2f}×** ({r['per_round']:.2f}×) | {target:g}× | {met} |"
        )
    out.append("")
    out.extend(notes)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
