//! [`Identity`]: which model file this is, by content: the sha256 of the
//! GGUF, which names the model's cache folders (its steering vectors, its
//! saved prompt prefixes). Hashing half a gigabyte takes about a second, so
//! it is done in slices of background work, and remembered: a memo keyed
//! by the file's path, size, modification time and inode answers at once
//! when none of them changed (a changed file is hashed anew).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes of the model file hashed per slice (about 10 ms).
const HASH_SLICE: usize = 4 << 20;

/// What the memo remembers of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    path: String,
    size: u64,
    modified_ns: u128,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        let meta = std::fs::metadata(path)?;
        let modified_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string();
        Ok(Stamp { path, size: meta.len(), modified_ns, inode })
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Memo {
    stamp: Stamp,
    sha256: String,
}

enum State {
    Known(String),
    Hashing { file: File, hasher: Sha256, buf: Vec<u8>, done: u64, total: u64, stamp: Stamp },
    Failed(String),
}

/// The model file's identity, known or being worked out.
pub(super) struct Identity {
    state: State,
    /// Where the memo of this file lives.
    memo: PathBuf,
}

impl Identity {
    /// Known at once when the memo under `cache_dir` matches the file;
    /// otherwise hashing starts.
    pub fn start(model_path: &Path, cache_dir: &Path) -> Identity {
        let stamp = match Stamp::of(model_path) {
            Ok(stamp) => stamp,
            Err(e) => {
                return Identity { state: State::Failed(format!("cannot read the model file to identify it: {e}")), memo: PathBuf::new() }
            }
        };
        let key: String = Sha256::digest(stamp.path.as_bytes()).iter().take(16).map(|b| format!("{b:02x}")).collect();
        let memo = cache_dir.join("identity").join(format!("{key}.json"));
        let remembered = std::fs::read(&memo)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Memo>(&bytes).ok())
            .filter(|m| m.stamp == stamp && m.sha256.len() == 64);
        let state = match remembered {
            Some(m) => {
                tracing::debug!(sha256 = %m.sha256, "model identity from the memo");
                State::Known(m.sha256)
            }
            None => match File::open(model_path) {
                Ok(file) => State::Hashing { file, hasher: Sha256::new(), buf: vec![0u8; HASH_SLICE], done: 0, total: stamp.size, stamp },
                Err(e) => State::Failed(format!("cannot read the model file to identify it: {e}")),
            },
        };
        Identity { state, memo }
    }

    /// Work is left.
    pub fn busy(&self) -> bool {
        matches!(self.state, State::Hashing { .. })
    }

    /// The sha256 (hex) once known; Err with why it cannot be.
    pub fn sha256(&self) -> Option<Result<&str, &str>> {
        match &self.state {
            State::Known(hash) => Some(Ok(hash)),
            State::Failed(why) => Some(Err(why)),
            State::Hashing { .. } => None,
        }
    }

    /// MiB hashed, of all, while hashing.
    pub fn progress(&self) -> Option<(u64, u64)> {
        match &self.state {
            State::Hashing { done, total, .. } => Some((done >> 20, total >> 20)),
            _ => None,
        }
    }

    /// Hash one slice; when the file is read, remember the result.
    pub fn slice(&mut self) {
        let State::Hashing { file, hasher, buf, done, stamp, .. } = &mut self.state else { return };
        match file.read(buf) {
            Ok(0) => {
                let hash: String = std::mem::take(hasher).finalize().iter().map(|b| format!("{b:02x}")).collect();
                let memo = Memo { stamp: stamp.clone(), sha256: hash.clone() };
                if let Err(e) = write_atomically(&self.memo, &serde_json::to_vec(&memo).unwrap_or_default()) {
                    tracing::debug!("cannot remember the model's identity at {}: {e}", self.memo.display());
                }
                self.state = State::Known(hash);
            }
            Ok(n) => {
                hasher.update(&buf[..n]);
                *done += n as u64;
            }
            Err(e) => self.state = State::Failed(format!("cannot read the model file to identify it: {e}")),
        }
    }

    /// Finish now (for one-shot commands that do not run the engine loop).
    pub fn settle(&mut self) {
        while self.busy() {
            self.slice();
        }
    }
}

/// Write `bytes` to `path` through a temporary file renamed over it.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.partial", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memo_answers_until_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("elpis-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("m.gguf");
        std::fs::write(&model, b"GGUF one").unwrap();
        let mut first = Identity::start(&model, &dir);
        assert!(first.busy(), "nothing remembered yet");
        first.settle();
        let hash = first.sha256().unwrap().unwrap().to_string();
        assert_eq!(hash, Sha256::digest(b"GGUF one").iter().map(|b| format!("{b:02x}")).collect::<String>());
        let again = Identity::start(&model, &dir);
        assert!(!again.busy(), "remembered");
        assert_eq!(again.sha256(), Some(Ok(hash.as_str())));
        // Another content (and size): hashed anew.
        std::fs::write(&model, b"GGUF two, longer").unwrap();
        let mut changed = Identity::start(&model, &dir);
        assert!(changed.busy());
        changed.settle();
        assert_ne!(changed.sha256().unwrap().unwrap(), hash);
        let missing = Identity::start(&dir.join("none.gguf"), &dir);
        assert!(missing.sha256().unwrap().unwrap_err().contains("cannot read"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
