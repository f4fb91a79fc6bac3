//! Test credentials made by tests/tls/make-pki.sh (opt in: `use
//! common::pki::*;`): server/, alice/, bob/, stranger/ certificate
//! directories, keys.psk (alice, bob) and wrong.psk (alice, another key).

use super::{debian_path, require, run_ok};
use std::path::Path;
use std::process::Command;

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
