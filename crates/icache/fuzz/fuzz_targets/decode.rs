//! The entry decoder must never panic, whatever bytes sit under our keys.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    icache::__fuzz::decode(data);
});
