//! The wasmtime [`Engine`], its epoch ticker, and the on-disk cache of
//! compiled components.
//!
//! Loading a component is the slow part of starting or swapping a service
//! (cranelift compiles it to machine code), so [`Runtime::load`] keeps the
//! compiled code on disk, keyed by the engine's compatibility hash and the
//! SHA-256 of the component's bytes. A second start of the same component on
//! the same host build deserialises it instead of compiling.

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

/// The engine shared by every generation of every service in this process.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    cache: Option<PathBuf>,
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
    /// cache directory, or `None` to compile every time.
    pub fn new(cache: Option<PathBuf>) -> Result<Runtime> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
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
                Ok(component) => return Ok((component, true)),
                Err(e) => {
                    tracing::warn!(entry = %entry.display(), "ignoring unusable compile cache entry: {e:#}")
                }
            }
        }
        let component = self.compile(path, bytes)?;
        if let Err(e) = store_in_cache(&entry, &component) {
            tracing::warn!(entry = %entry.display(), "cannot write compile cache: {e:#}");
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
        let dir = self.cache.as_ref()?;
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
