//! Test TLS credentials made by tests/tls/make-pki.sh with openssl and
//! psktool: a CA, a server certificate for localhost/127.0.0.1, client
//! certificates for alice and bob, one for "alice" from another CA, and PSK
//! files (see the script).

use super::{debian_path, require, run_ok};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Pki {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        require("openssl", "openssl");
        require("psktool", "gnutls-bin");
        let dir = tempfile::tempdir().expect("tempdir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/make-pki.sh");
        run_ok(Command::new("bash").arg(script).arg(dir.path()));
        Pki { root: dir.path().to_path_buf(), _dir: dir }
    }

    /// `server/`, `alice/`, `bob/`, `stranger/`, `keys.psk`, `wrong.psk`.
    pub fn path(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }

    /// `[server]` keys for TLS in `mode` with both certificates and PSK.
    pub fn server_keys(&self, mode: &str) -> String {
        format!("tls = \"{mode}\"\ntls_certificates = \"{}\"\ntls_psk = \"{}\"\n", self.path("server"), self.path("keys.psk"))
    }

    /// A directory holding just `keys.psk` (qemu's tls-creds-psk layout).
    pub fn qemu_psk_dir(&self) -> String {
        let dir = self.root.join("qemu-psk");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(self.root.join("keys.psk"), dir.join("keys.psk")).unwrap();
        dir.display().to_string()
    }
}

/// A fresh set of credentials in a temporary directory (valid 7 days).
pub fn make_pki() -> tempfile::TempDir {
    require("openssl", "openssl");
    require("psktool", "gnutls-bin");
    let dir = tempfile::tempdir().expect("tempdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls/make-pki.sh");
    run_ok(Command::new("bash").arg(script).arg(dir.path()).env("PATH", debian_path()));
    dir
}

/// `[server]` keys that require TLS with both kinds of credentials from
/// `pki` (goes first in a `TestServer` body).
pub fn tls_require(pki: &Path) -> String {
    format!(
        "tls = \"require\"\ntls_psk = \"{}\"\ntls_certificates = \"{}\"\n\n",
        pki.join("keys.psk").display(),
        pki.join("server").display()
    )
}
