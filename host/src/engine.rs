//! The wasmtime [`Engine`], its epoch ticker, and the on-disk cache of
//! compiled components.
//!
//! Loading a component is the slow part of starting or swapping a service
//! (cranelift compiles it to machine code), so [`Runtime::load`] keeps the
//! compiled code on disk, keyed by the engine's compatibility hash and the
//! SHA-256 of the component's bytes. A second start of the same component on
//! the same host build deserialises it instead of compiling.
//!
//! The cache has a size limit ([`CompileCache::max_bytes`], `--cache-max-size`,
//! default [`DEFAULT_CACHE_MAX_BYTES`]): after each write, the least recently
//! used entries (by modification time, which a cache hit refreshes) are
//! removed until the total fits, never the entry just written. Components
//! built from Python or JavaScript compile to 30-40 MB each, so without a
//! limit every rebuild of such a guest would grow the cache by that much.
//! (wasmtime's own `cache` feature also evicts, but does not say whether a
//! load was a hit, which `status` and the swap report show, and keys its
//! entries per core module rather than per component.)

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine};

/// How often the epoch advances. A guest call yields to tokio at every tick,
/// and its CPU deadline is checked at every tick, so this is the resolution
/// of `--event-timeout-ms`.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The default limit of the compile cache: 1 GiB, room for about 25
/// Python or JavaScript components or thousands of Rust ones.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 1 << 30;

/// Where compiled components are kept, and how much room they may take.
#[derive(Clone, Debug)]
pub struct CompileCache {
    pub dir: PathBuf,
    /// Total size of the entries above which the least recently used are
    /// removed.
    pub max_bytes: u64,
}

/// The engine shared by every generation of every service in this process.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    cache: Option<CompileCache>,
}

/// A component read from disk and compiled, ready to be linked.
pub struct Loaded {
    pub component: Component,
    pub path: PathBuf,
    /// Hex SHA-256 of the component's bytes.
    pub hash: String,
    /// Time spent reading and compiling (or loading from the cache).
    pub compile_time: Duration,
    pub from_cache: bool,
}

impl Runtime {
    /// Builds the engine and starts the epoch ticker. `cache` is the compile
    /// cache, or `None` to compile every time.
    pub fn new(cache: Option<CompileCache>) -> Result<Runtime> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        if std::env::var_os("WASMHOST_PERFMAP").is_some_and(|v| v == "1") {
            // For profiling: `perf` names guest functions from
            // /tmp/perf-PID.map (guests built without `strip`, as
            // `CARGO_PROFILE_GUEST_STRIP=false guests/build` does, keep
            // their own names).
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        spawn_epoch_ticker(&engine);
        Ok(Runtime { engine, cache })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Reads, checks and compiles the component at `path`, using the cache.
    pub fn load(&self, path: &Path) -> Result<Loaded> {
        let started = Instant::now();
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read component {}", path.display()))?;
        check_component_header(path, &bytes)?;
        let hash = hex::encode(Sha256::digest(&bytes));
        let (component, from_cache) = self.compile_cached(path, &bytes, &hash)?;
        Ok(Loaded {
            component,
            path: path.to_path_buf(),
            hash,
            compile_time: started.elapsed(),
            from_cache,
        })
    }

    fn compile_cached(&self, path: &Path, bytes: &[u8], hash: &str) -> Result<(Component, bool)> {
        let Some(entry) = self.cache_entry(hash) else {
            return Ok((self.compile(path, bytes)?, false));
        };
        if let Ok(code) = std::fs::read(&entry) {
            // SAFETY: the cache directory is private to this user (mode 0700)
            // and entries are written only by `store_in_cache` from
            // `Component::serialize` of the same engine configuration; the
            // key includes the engine's compatibility hash, and wasmtime
            // checks the header again.
            match unsafe { Component::deserialize(&self.engine, &code) } {
                Ok(component) => {
                    touch(&entry);
                    return Ok((component, true));
                }
                Err(e) => {
                    tracing::warn!(entry = %entry.display(), "ignoring unusable compile cache entry: {e:#}")
                }
            }
        }
        let component = self.compile(path, bytes)?;
        match store_in_cache(&entry, &component) {
            Ok(()) => {
                let max = self.cache.as_ref().map_or(u64::MAX, |c| c.max_bytes);
                if let Err(e) = evict(&entry, max) {
                    tracing::warn!(dir = %entry.parent().unwrap_or(&entry).display(), "cannot trim the compile cache: {e:#}");
                }
            }
            Err(e) => {
                tracing::warn!(entry = %entry.display(), "cannot write compile cache: {e:#}")
            }
        }
        Ok((component, false))
    }

    fn compile(&self, path: &Path, bytes: &[u8]) -> Result<Component> {
        tracing::info!(component = %path.display(), size = bytes.len(), "compiling component");
        Component::new(&self.engine, bytes)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{} is not a valid WebAssembly component", path.display()))
    }

    fn cache_entry(&self, hash: &str) -> Option<PathBuf> {
        let dir = &self.cache.as_ref()?.dir;
        let mut engine_hash = ShaHasher(Sha256::new());
        std::hash::Hash::hash(
            &self.engine.precompile_compatibility_hash(),
            &mut engine_hash,
        );
        let engine_hash = hex::encode(&engine_hash.0.finalize()[..8]);
        Some(dir.join(format!("{engine_hash}-{hash}.cwasm")))
    }
}

/// The default compile cache directory: `$XDG_CACHE_HOME/wasmhost`, else
/// `$HOME/.cache/wasmhost`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("wasmhost"))
}

/// Writes a compiled component atomically (temporary file, then rename), in
/// a directory created with mode 0700.
fn store_in_cache(entry: &Path, component: &Component) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = entry.parent().context("cache entry has no directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = entry.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, component.serialize()?)?;
    std::fs::rename(&tmp, entry)?;
    Ok(())
}

/// Marks a cache entry as just used, for [`evict`]'s least-recently-used
/// order. Failing to is harmless (the entry only looks older).
fn touch(entry: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(entry) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Removes the least recently used entries of `keep`'s directory until their
/// total size is at most `max_bytes`, never removing `keep` itself (a single
/// entry above the limit stays: the cache then holds just that one).
/// Temporary files of writers that died are removed when older than an hour.
fn evict(keep: &Path, max_bytes: u64) -> Result<()> {
    let dir = keep.parent().context("cache entry has no directory")?;
    let mut entries = Vec::new();
    let mut total = 0u64;
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let path = item.path();
        let Ok(meta) = item.metadata() else { continue };
        let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        let name = item.file_name();
        let name = name.to_string_lossy();
        if name.contains(".tmp") {
            if modified
                .elapsed()
                .is_ok_and(|age| age > Duration::from_secs(3600))
            {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if !name.ends_with(".cwasm") {
            continue;
        }
        total += meta.len();
        if path != keep {
            entries.push((modified, meta.len(), path));
        }
    }
    entries.sort();
    let mut removed = 0;
    for (_, len, path) in entries {
        if total <= max_bytes {
            break;
        }
        // Another process may have removed it first; either way it is gone.
        let _ = std::fs::remove_file(&path);
        total = total.saturating_sub(len);
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, total_bytes = total, "compile cache trimmed to its limit");
    }
    Ok(())
}

/// Gives a clear error for the common wrong files before wasmtime's parser
/// does: not WebAssembly at all, or a core module instead of a component.
fn check_component_header(path: &Path, bytes: &[u8]) -> Result<()> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        bail!(
            "{} is not a WebAssembly file (no `\\0asm` header); pass a component built for the \
             wasmhost:service world, e.g. target/guests/kv.wasm",
            path.display()
        );
    }
    // Bytes 4..8 are the version and layer: a core module has layer 0, a
    // component layer 1.
    if bytes[6..8] == [0, 0] {
        bail!(
            "{} is a core WebAssembly module, not a component; build it for the \
             wasm32-wasip2 target (or wrap it with `wasm-tools component new`)",
            path.display()
        );
    }
    Ok(())
}

/// Feeds `std::hash::Hash` output into SHA-256, so the cache key is stable
/// across host builds that share an engine configuration.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        // Only `finalize` on the inner digest is used.
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a plain thread that
/// holds only a weak reference, so it ends when the engine is dropped.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasmhost-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawning the epoch thread");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn entry(dir: &Path, name: &str, len: usize, age_s: u64) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let file = std::fs::File::options().append(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
        path
    }

    #[test]
    fn eviction_removes_least_recently_used_first_and_keeps_the_new_entry() {
        let dir = tempfile::tempdir().unwrap();
        let oldest = entry(dir.path(), "a-1.cwasm", 400, 300);
        let used_lately = entry(dir.path(), "a-2.cwasm", 400, 200);
        let middle = entry(dir.path(), "a-3.cwasm", 400, 250);
        touch(&used_lately);
        let other = entry(dir.path(), "notes.txt", 5000, 1000);
        let stale_tmp = entry(dir.path(), "a-4.tmp77", 10, 7200);
        let fresh_tmp = entry(dir.path(), "a-5.tmp78", 10, 1);
        let new = entry(dir.path(), "a-6.cwasm", 400, 0);

        evict(&new, 1000).unwrap();
        assert!(!oldest.exists() && !middle.exists(), "the two oldest go");
        assert!(used_lately.exists(), "a hit refreshes an entry");
        assert!(new.exists());
        assert!(other.exists(), "files that are not entries are left alone");
        assert!(!stale_tmp.exists() && fresh_tmp.exists());

        // An entry larger than the whole limit is still kept.
        evict(&new, 10).unwrap();
        assert!(new.exists() && !used_lately.exists());
    }
}
