#!/usr/bin/env bash
# Runs every test of the workspace against real servers.
#
# Installs what the tests need when it is missing (Debian/Ubuntu packages):
# redis-server (with redis-cli), memcached, openssl for the TLS test,
# chromium + chromium-driver for the browser test, postgresql and
# postgresql-client for the outbox tests, varnish + varnish-modules
# (vmod xkey) for the Varnish tests. The tests start their own
# servers on free loopback ports; nothing is left running.
set -euo pipefail
# (pipefail: a failing `cargo test` fails the script even through `tee`.)
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v memcached >/dev/null 2>&1 || need+=(memcached)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v varnishd >/dev/null 2>&1 || need+=(varnish)
# vmod xkey (the repo's deploy/varnish/icache.vcl imports it).
ls /usr/lib/*/varnish/vmods/libvmod_xkey.so >/dev/null 2>&1 || need+=(varnish-modules)
# PostgreSQL for icache::db (the server's binaries live in
# /usr/lib/postgresql/*/bin, off PATH; the tests run them as its postgres user).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
if [ ${#need[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${need[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# No compiler warning in a user's build, whatever features they pick: each
# feature alone, none, and all together.
for features in "" minijinja redis memcached askama maud tera postgres sqlite "redis,memcached,minijinja,askama,maud,tera,postgres,sqlite"; do
  out="$(cargo check -q -p icache --no-default-features --features "$features" --message-format short 2>&1 || true)"
  if printf '%s\n' "$out" | grep -E '(warning|error)' >/dev/null; then
    printf '%s\n' "$out" >&2
    echo "scripts/test.sh: icache with features [$features] does not build cleanly" >&2
    exit 1
  fi
done
cargo test --workspace --all-features "$@" 2>&1 | tee "$log"

# The Django drop-in (crates/icache-django): build and install the package
# with maturin, then run its pytest suite (Django 5.2 LTS, the same real
# servers on free loopback ports). Python packages go into a venv of their
# own (target/django-venv), installed from the package index when missing.
venv="${ICACHE_DJANGO_VENV:-target/django-venv}"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pyneed=()
"$py" -c 'import maturin' >/dev/null 2>&1 || pyneed+=("maturin>=1.9,<2")
"$py" -c 'import django, sys; sys.exit(django.VERSION[:2] != (5, 2))' >/dev/null 2>&1 || pyneed+=("Django==5.2.*")
"$py" -c 'import pytest' >/dev/null 2>&1 || pyneed+=(pytest)
# psycopg 3 (with its libpq wheel): Django's PostgreSQL driver, for the
# outbox tests of django_icache on a real server.
"$py" -c 'import psycopg' >/dev/null 2>&1 || pyneed+=("psycopg[binary]>=3.1")
if [ ${#pyneed[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${pyneed[*]} (pip, into $venv)" >&2
  "$py" -m pip install -q "${pyneed[@]}"
fi
PATH="$venv/bin:$PATH" "$py" -m pip install -q --no-build-isolation --no-deps --force-reinstall ./crates/icache-django
pylog="$(mktemp)"
trap 'rm -f "$log" "$pylog"' EXIT
pystatus=0
(cd crates/icache-django && "$py" -m pytest tests -q -p no:cacheprovider) 2>&1 | tee "$pylog" || pystatus=$?

# A short bounded fuzzing run keeps the cargo-fuzz targets building and
# finding nothing (set ICACHE_SKIP_FUZZ=1 to skip it).
if [ "${ICACHE_SKIP_FUZZ:-0}" != "1" ]; then
  bash scripts/fuzz.sh "${ICACHE_FUZZ_SECONDS:-10}"
fi

# One closing line over every test binary (cargo prints one per binary) and
# the pytest suite (its last line: "N passed, N failed, N error… in Ts").
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     FILENAME == ARGV[2] && /^[0-9]+ [a-z]+.* in [0-9.]+s/ { pp = 0; pf = 0
       for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) pp += $i; if ($(i+1) ~ /^(failed|errors?)/) pf += $i } }
     END { printf "tests: %d passed, %d failed\n", p + pp, f + pf }' "$log" "$pylog"
exit "$pystatus"
