//! The "database" every process shares: a file of `2 × items` u64 slots,
//! `data[i]` then `completed[i]`, read and written under `flock`.
//!
//! A writer commits (`data[i] += 1` under the exclusive lock), bumps the token,
//! and only if the bump returned `Ok` records `completed[i] = max(completed[i],
//! v)`. A reader notes `completed[i]` before it begins: the promise says it
//! must then see at least that value.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One handle on the shared file. Each thread opens its own: `flock` locks
/// belong to an open file, so separate opens exclude each other even within
/// one process.
pub(crate) struct Db {
    file: File,
    items: usize,
}

impl Db {
    /// Creates the file with every slot at 0.
    pub(crate) fn create(path: &Path, items: usize) -> io::Result<()> {
        let file = File::create(path)?;
        file.set_len((2 * items * 8) as u64)
    }

    pub(crate) fn open(path: &Path, items: usize) -> io::Result<Db> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Db { file, items })
    }

    fn read_slot(&self, slot: usize) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        self.file.read_exact_at(&mut buf, (slot * 8) as u64)?;
        Ok(u64::from_le_bytes(buf))
    }

    fn write_slot(&self, slot: usize, v: u64) -> io::Result<()> {
        self.file.write_all_at(&v.to_le_bytes(), (slot * 8) as u64)
    }

    /// Runs `f` under the exclusive lock; the lock is released even if `f` fails.
    fn exclusive<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.file.lock()?;
        let out = f();
        self.file.unlock()?;
        out
    }

    fn shared<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.file.lock_shared()?;
        let out = f();
        self.file.unlock()?;
        out
    }

    /// The commit: `data[i] += 1`; returns the new value.
    pub(crate) fn commit(&self, i: usize) -> io::Result<u64> {
        self.exclusive(|| {
            let v = self.read_slot(i)? + 1;
            self.write_slot(i, v)?;
            Ok(v)
        })
    }

    /// Records that the bump after the commit of `v` completed.
    pub(crate) fn complete(&self, i: usize, v: u64) -> io::Result<()> {
        let slot = self.items + i;
        self.exclusive(|| {
            if self.read_slot(slot)? < v {
                self.write_slot(slot, v)?;
            }
            Ok(())
        })
    }

    /// `completed[i]` for each of `items`.
    pub(crate) fn completed(&self, items: &[usize]) -> io::Result<Vec<u64>> {
        self.shared(|| {
            items
                .iter()
                .map(|&i| self.read_slot(self.items + i))
                .collect()
        })
    }

    /// `data[i]`: what a render shows.
    pub(crate) fn data(&self, i: usize) -> io::Result<u64> {
        self.shared(|| self.read_slot(i))
    }
}

#[cfg(test)]
mod tests {
    use super::Db;

    #[test]
    fn commit_and_complete() {
        let dir = std::env::temp_dir().join(format!("icache-chaos-db-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("db");
        Db::create(&path, 4).expect("create");
        let db = Db::open(&path, 4).expect("open");
        assert_eq!(db.commit(2).expect("commit"), 1);
        assert_eq!(db.commit(2).expect("commit"), 2);
        db.complete(2, 2).expect("complete");
        db.complete(2, 1).expect("complete");
        assert_eq!(db.completed(&[2, 3]).expect("read"), vec![2, 0]);
        assert_eq!(db.data(2).expect("read"), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
