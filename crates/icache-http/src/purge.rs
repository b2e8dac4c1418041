//! Purger (in the next commit).
