//! A Rust service on the same cache as a Django site, for the cross-language
//! tests of `django_icache` (`tests/test_cross_language.py`):
//!
//! ```text
//! rust_peer URL incr TOKEN...                  bump; prints each new generation
//! rust_peer URL fragment NAME BODY TOKEN...    fragment(NAME, TOKENS, || BODY);
//!                                              prints the output; stderr says
//!                                              "rendered" when BODY was used
//! rust_peer URL get-versioned KEY TOKEN...     get_versioned(KEY, get_sum(TOKENS));
//!                                              prints the text, exit 4 when None
//! rust_peer URL set-versioned-bytes KEY HEX TOKEN...
//!                                              set_versioned_bytes(KEY, HEX decoded,
//!                                              get_sum(TOKENS))
//! ```

use std::process::ExitCode;

use icache::ICache;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rust_peer: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let [url, command, rest @ ..] = args else {
        return Err("usage: rust_peer URL incr|fragment|get-versioned ...".into());
    };
    let cache = ICache::from_url(url).map_err(|e| e.to_string())?;
    let refs: Vec<&str> = rest.iter().map(String::as_str).collect();
    match (command.as_str(), refs.as_slice()) {
        ("incr", tokens) if !tokens.is_empty() => {
            for g in cache.incr_many(tokens).map_err(|e| e.to_string())? {
                println!("{g}");
            }
        }
        ("fragment", [name, body, tokens @ ..]) => {
            let mut rendered = false;
            let out = cache.fragment(name, tokens, || {
                rendered = true;
                Ok::<_, String>((*body).to_string())
            })?;
            print!("{out}");
            eprintln!("{}", if rendered { "rendered" } else { "hit" });
        }
        ("get-versioned", [key, tokens @ ..]) => {
            let version = cache.get_sum(tokens).map_err(|e| e.to_string())?;
            match cache
                .get_versioned(key, version)
                .map_err(|e| e.to_string())?
            {
                Some(text) => print!("{text}"),
                None => return Ok(ExitCode::from(4)),
            }
        }
        ("set-versioned-bytes", [key, hex, tokens @ ..]) => {
            let bytes = decode_hex(hex)?;
            let version = cache.get_sum(tokens).map_err(|e| e.to_string())?;
            cache
                .set_versioned_bytes(key, bytes, version)
                .map_err(|e| e.to_string())?;
        }
        _ => return Err(format!("unknown command or missing arguments: {command}")),
    }
    Ok(ExitCode::SUCCESS)
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits in {hex:?}"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("not hex at {i} in {hex:?}"))
        })
        .collect()
}
