# Varnish in front of an icache site (Varnish 7.1 with varnish-modules:
# Debian/Ubuntu packages `varnish` and `varnish-modules`).
#
# Pages are cached with no TTL: a page stays until a token it read is bumped,
# and the bump purges it (icache_http::Purger sends `PURGE` with the
# `xkey-purge` header, one surrogate key per token). So only pages the app
# tagged (icache_http::PageLayer's `Surrogate-Key` or `xkey` header) are
# stored: anything else has no purge and would need a timeout.
#
#   varnishd -F -a 127.0.0.1:8080 -f deploy/varnish/icache.vcl -s malloc,256m
#   (as root add `-j none -n /tmp/varnish-icache`)

vcl 4.1;

import xkey;

# The app (the demo listens on 127.0.0.1:3000).
backend default {
    .host = "127.0.0.1";
    .port = "3000";
}

# Who may purge: loopback only (the app and the outbox relay run beside
# Varnish; put their addresses here otherwise).
acl purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    # Set only here, never trusted from the client.
    unset req.http.X-Icache-Session;

    if (req.method == "PURGE") {
        if (client.ip !~ purgers) {
            return (synth(403, "PURGE is accepted from loopback only"));
        }
        if (!req.http.xkey-purge) {
            return (synth(400, "PURGE needs an xkey-purge header (the surrogate keys to purge)"));
        }
        return (synth(200, "Purged " + xkey.purge(req.http.xkey-purge)));
    }
    if (req.method != "GET" && req.method != "HEAD") {
        return (pass);
    }
    if (req.http.Authorization) {
        return (pass);
    }
    # A session cookie (any cookie whose name contains "sess": sessionid,
    # PHPSESSID, _session, ...; edit the pattern for yours): the page is
    # looked up, but served from the cache only if it varies on Cookie
    # (vcl_hit), and a page fetched for it is stored only if it does.
    # Other cookies (analytics) are not part of any page.
    if (req.http.Cookie ~ "(?i)(^|;)\s*[^=;]*sess[^=;]*=") {
        set req.http.X-Icache-Session = "1";
    }
    # Not Varnish's builtin (which passes every request with a cookie).
    return (hash);
}

sub vcl_hit {
    if (req.http.X-Icache-Session && obj.http.Vary !~ "(?i)(^|,)\s*cookie\s*(,|$)") {
        return (pass);
    }
}

sub vcl_backend_response {
    if (bereq.uncacheable) {
        return (deliver);
    }
    if (beresp.http.Surrogate-Key && !beresp.http.xkey) {
        # vmod xkey reads the `xkey` header of the stored object.
        set beresp.http.xkey = beresp.http.Surrogate-Key;
    }
    if (beresp.status == 200
        && beresp.http.xkey
        && !beresp.http.Set-Cookie
        && beresp.http.Cache-Control !~ "(?i)(private|no-store)"
        && beresp.http.Vary != "*"
        && (!bereq.http.X-Icache-Session || beresp.http.Vary ~ "(?i)(^|,)\s*cookie\s*(,|$)")) {
        # "Indefinitely": the purge is the invalidation. The app's
        # `Cache-Control: no-cache` is for browsers (they revalidate here,
        # and Varnish answers 304 from the stored ETag).
        set beresp.ttl = 3650d;
        set beresp.grace = 0s;
        # Stored gzipped once, served as stored to the clients that accept
        # it (every browser) and unzipped for the rest: a page costs its
        # compressed bytes on every hit, and the app never compresses.
        if (!beresp.http.Content-Encoding
            && beresp.http.Content-Type ~ "(?i)^(text/|application/(json|javascript|xml))") {
            set beresp.do_gzip = true;
        }
        return (deliver);
    }
    # Not ours to keep (untagged, personal, an error): fetched every time;
    # a short hit-for-miss marker keeps requests from queueing behind it.
    set beresp.ttl = 10s;
    set beresp.grace = 0s;
    set beresp.uncacheable = true;
    return (deliver);
}

sub vcl_deliver {
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
    # The keys are between the app and Varnish.
    unset resp.http.xkey;
    unset resp.http.Surrogate-Key;
}
