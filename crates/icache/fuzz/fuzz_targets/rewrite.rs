//! The template rewrite must never panic, and what it accepts must keep the
//! template's line count.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(src) = std::str::from_utf8(data) {
        if let Ok(out) = icache::minijinja::rewrite("fuzz.html", src) {
            assert_eq!(out.matches('\n').count(), src.matches('\n').count());
        }
    }
});
