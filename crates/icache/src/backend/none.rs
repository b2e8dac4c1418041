//! `none://`: no cache at all. Every block renders, nothing is stored; for
//! development, and to measure a site with its cache off.

use std::sync::Arc;
use std::time::Duration;

use super::{Backend, Fetched};
use crate::codec::Entry;
use crate::error::Result;
use crate::keys::Key;

#[derive(Debug)]
pub(crate) struct Nothing;

impl Backend for Nothing {
    fn fetch(&self, tokens: &[&str], entries: &[Key<'_>]) -> Result<Fetched> {
        Ok(Fetched {
            // Every generation reads as 1: versions are stable, and since
            // nothing is ever stored, every lookup is a miss.
            gens: vec![Some(1); tokens.len()],
            entries: vec![None; entries.len()],
            instance: None,
        })
    }

    fn init_gens(&self, gens: &[Key<'_>], _fresh: &[u64]) -> Result<Vec<u64>> {
        Ok(vec![1; gens.len()])
    }

    fn incr_gens(&self, gens: &[Key<'_>], _fresh: &[u64]) -> Result<Vec<u64>> {
        Ok(vec![1; gens.len()])
    }

    fn set(&self, _: Key<'_>, _: Arc<Entry>, _: Option<Duration>, _: Option<&str>) -> Result<bool> {
        Ok(true)
    }

    fn delete(&self, _: Key<'_>) -> Result<bool> {
        Ok(false)
    }

    fn ping(&self) -> Result<()> {
        Ok(())
    }

    fn server_stats(&self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }

    fn name(&self) -> &'static str {
        "none"
    }

    fn stores(&self) -> bool {
        false
    }
}
