//! memcached under a hostile or broken server, and the pool under faults
//! (issue 10: TTLs, answers, pool epochs).

#[allow(unused_imports)]
use crate::support;
