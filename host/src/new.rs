//! `wasmhost new`: a guest project to start from, in Rust, Python or
//! JavaScript.
//!
//! Each project is a working service (it echoes lines back, numbered, and
//! carries its count and each connection's unfinished line across a swap in
//! the state format `NAME/1`), with a `build` script, a unit test of its
//! logic and a README. It is self-contained, so it builds anywhere: it
//! carries a copy of the WIT contract (`guest-wit/service.wit`), and a Rust
//! project a copy of the guest SDK (`vendor/wasmhost-guest`), both taken
//! from this wasmhost build. The Python and JavaScript toolchains are
//! pinned to the versions this repository's own guests are built and
//! tested with.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// componentize-py, as `guests/kv-py/requirements.txt` pins it.
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// componentize-js, as `guests/chat-js/package.json` pins it.
pub const COMPONENTIZE_JS: &str = "0.23.0";
/// The WASI shim componentize-js imports without declaring it (0.26 no
/// longer reads WIT files by absolute path), as `guests/chat-js` pins it.
pub const PREVIEW2_SHIM: &str = "0.25.0";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

impl Lang {
    fn name(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
        }
    }
}

const WIT: &str = include_str!("../../guest-wit/service.wit");

/// (path in the project, contents, executable)
type File = (&'static str, &'static str, bool);

const RUST: &[File] = &[
    (
        "Cargo.toml",
        include_str!("../templates/rust/Cargo.toml"),
        false,
    ),
    (
        "src/lib.rs",
        include_str!("../templates/rust/lib.rs"),
        false,
    ),
    ("build", include_str!("../templates/rust/build"), true),
    (
        "README.md",
        include_str!("../templates/rust/README.md"),
        false,
    ),
    (".gitignore", "target/\n*.wasm\n", false),
    ("vendor/wasmhost-guest/Cargo.toml", SDK_MANIFEST, false),
    (
        "vendor/wasmhost-guest/src/lib.rs",
        include_str!("../../guests/sdk/src/lib.rs"),
        false,
    ),
    (
        "vendor/wasmhost-guest/src/host.rs",
        include_str!("../../guests/sdk/src/host.rs"),
        false,
    ),
    (
        "vendor/wasmhost-guest/src/input.rs",
        include_str!("../../guests/sdk/src/input.rs"),
        false,
    ),
    (
        "vendor/wasmhost-guest/src/runtime.rs",
        include_str!("../../guests/sdk/src/runtime.rs"),
        false,
    ),
    (
        "vendor/wasmhost-guest/src/state.rs",
        include_str!("../../guests/sdk/src/state.rs"),
        false,
    ),
    (
        "vendor/wasmhost-guest/src/testing.rs",
        include_str!("../../guests/sdk/src/testing.rs"),
        false,
    ),
];

/// The SDK's manifest outside this workspace (the in-tree one inherits the
/// workspace's fields).
const SDK_MANIFEST: &str = r#"[package]
name = "wasmhost-guest"
description = "The wasmhost Rust guest SDK (copied by `wasmhost new`)"
version = "0.1.0"
edition = "2024"
publish = false

[dependencies]
wit-bindgen = "0.46"
"#;

const PYTHON: &[File] = &[
    ("app.py", include_str!("../templates/python/app.py"), false),
    (
        "service.py",
        include_str!("../templates/python/service.py"),
        false,
    ),
    (
        "test_service.py",
        include_str!("../templates/python/test_service.py"),
        false,
    ),
    (
        "requirements.txt",
        include_str!("../templates/python/requirements.txt"),
        false,
    ),
    ("build", include_str!("../templates/python/build"), true),
    (
        "README.md",
        include_str!("../templates/python/README.md"),
        false,
    ),
    (".gitignore", ".venv/\n__pycache__/\n*.wasm\n", false),
];

const JS: &[File] = &[
    ("app.js", include_str!("../templates/js/app.js"), false),
    (
        "service.js",
        include_str!("../templates/js/service.js"),
        false,
    ),
    ("test.mjs", include_str!("../templates/js/test.mjs"), false),
    (
        "build.mjs",
        include_str!("../templates/js/build.mjs"),
        false,
    ),
    (
        "package.json",
        include_str!("../templates/js/package.json"),
        false,
    ),
    ("build", include_str!("../templates/js/build"), true),
    (
        "README.md",
        include_str!("../templates/js/README.md"),
        false,
    ),
    (".gitignore", "node_modules/\n*.wasm\n", false),
];

/// Checks a project name: it names the crate or package, the component and
/// the state format, so it is kept to what all of them accept.
pub fn check_name(name: &str) -> Result<()> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !ok {
        bail!(
            "`{name}` cannot name a service: use lower-case letters, digits and `-`, starting \
             with a letter (at most 64), e.g. `my-service`"
        );
    }
    Ok(())
}

/// Writes the project for `name` in `lang` into `dir` (which must not exist
/// or be empty). Returns the files written.
pub fn create(name: &str, lang: Lang, dir: &Path) -> Result<Vec<PathBuf>> {
    check_name(name)?;
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} exists and is not empty: choose another name or --dir",
                dir.display()
            );
        }
    }
    let files = match lang {
        Lang::Rust => RUST,
        Lang::Python => PYTHON,
        Lang::Js => JS,
    };
    let wit: File = ("guest-wit/service.wit", WIT, false);
    let mut written = Vec::new();
    for &(path, template, executable) in files.iter().chain([&wit]) {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&target, fill(template, name))
            .with_context(|| format!("cannot write {}", target.display()))?;
        if executable {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
        }
        written.push(target);
    }
    Ok(written)
}

fn fill(template: &str, name: &str) -> String {
    template
        .replace("{{name}}", name)
        .replace("{{crate}}", &name.replace('-', "_"))
        .replace("{{componentize_py}}", COMPONENTIZE_PY)
        .replace("{{componentize_js}}", COMPONENTIZE_JS)
        .replace("{{preview2_shim}}", PREVIEW2_SHIM)
}

/// What `wasmhost new` prints after creating the project.
pub fn next_steps(name: &str, lang: Lang, dir: &Path) -> String {
    let test = match lang {
        Lang::Rust => "cargo test",
        Lang::Python => "python3 -m unittest",
        Lang::Js => "node --test",
    };
    let build = "./build";
    format!(
        "created {name}, a {} wasmhost service, in {}\n\nnext:\n  cd {}\n  {build:<22} # writes \
         {name}.wasm\n  {test:<22} # unit tests of the logic\n  wasmhost serve {name}.wasm \
         --listen 127.0.0.1:7000\n",
        lang.name(),
        dir.display(),
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["echo", "my-service", "kv2"] {
            check_name(good).unwrap();
        }
        for bad in ["", "Echo", "2kv", "a_b", "a/b", "trailing-", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pins_match_the_repository_guests() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let py = std::fs::read_to_string(root.join("guests/kv-py/requirements.txt")).unwrap();
        assert!(
            py.contains(&format!("componentize-py=={COMPONENTIZE_PY}")),
            "{py}"
        );
        let js = std::fs::read_to_string(root.join("guests/chat-js/package.json")).unwrap();
        assert!(
            js.contains(&format!(
                "\"@bytecodealliance/componentize-js\": \"{COMPONENTIZE_JS}\""
            )),
            "{js}"
        );
        assert!(
            js.contains(&format!(
                "\"@bytecodealliance/preview2-shim\": \"{PREVIEW2_SHIM}\""
            )),
            "{js}"
        );
    }

    #[test]
    fn a_project_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("svc");
        let files = create("svc", Lang::Python, &project).unwrap();
        assert!(files.iter().any(|f| f.ends_with("guest-wit/service.wit")));
        let build = std::fs::read_to_string(project.join("build")).unwrap();
        assert!(build.contains("svc.wasm") && !build.contains("{{"));
        let err = create("svc", Lang::Rust, &project).unwrap_err();
        assert!(err.to_string().contains("is not empty"), "{err}");
    }
}
