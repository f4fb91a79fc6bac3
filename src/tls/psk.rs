//! psktool's key file: one `identity:hexkey` per line, as nbdkit, qemu and
//! libnbd read it.

use super::TlsError;
use std::collections::HashMap;
use std::path::Path;

/// Pre-shared keys by identity.
#[derive(Clone, Default)]
pub struct PskKeys {
    keys: HashMap<String, Vec<u8>>,
}

impl std::fmt::Debug for PskKeys {
    // Never print a key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PskKeys({} identities)", self.keys.len())
    }
}

/// Longest key OpenSSL's PSK callbacks take (PSK_MAX_PSK_LEN).
const MAX_KEY: usize = 256;

impl PskKeys {
    pub fn load(path: &Path) -> Result<PskKeys, TlsError> {
        let text = std::fs::read_to_string(path).map_err(|e| TlsError::file(path, e))?;
        PskKeys::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<PskKeys, TlsError> {
        let mut keys = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let err = |message: String| TlsError::PskLine { path: path.to_path_buf(), line: i + 1, message };
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            // The key is the part after the last ':' (hex has no ':').
            let Some((identity, hex)) = line.rsplit_once(':') else {
                return Err(err("expected identity:hexkey".into()));
            };
            if identity.is_empty() {
                return Err(err("empty identity".into()));
            }
            let key = decode_hex(hex).ok_or_else(|| err("the key is not an even number of hex digits".into()))?;
            if key.is_empty() || key.len() > MAX_KEY {
                return Err(err(format!("key of {} bytes (1 to {MAX_KEY})", key.len())));
            }
            if keys.insert(identity.to_string(), key).is_some() {
                return Err(err(format!("identity '{identity}' appears twice")));
            }
        }
        if keys.is_empty() {
            return Err(TlsError::file(path, "no keys in the file"));
        }
        Ok(PskKeys { keys })
    }

    pub fn get(&self, identity: &str) -> Option<&[u8]> {
        self.keys.get(identity).map(|k| k.as_slice())
    }

    /// Any identity (the client side sends the first).
    pub fn first(&self) -> Option<(&str, &[u8])> {
        let mut ids: Vec<_> = self.keys.iter().collect();
        ids.sort();
        ids.first().map(|(i, k)| (i.as_str(), k.as_slice()))
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.trim();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_psktool_lines_and_names_bad_ones() {
        let p = Path::new("keys.psk");
        let keys = PskKeys::parse("alice:00ff10\n\n# comment\nbob:0a0B\n", p).unwrap();
        assert_eq!(keys.get("alice"), Some(&[0, 0xff, 0x10][..]));
        assert_eq!(keys.get("bob"), Some(&[0x0a, 0x0b][..]));
        assert_eq!(keys.first().unwrap().0, "alice");
        for (text, line) in [("alice\n", 1), ("a:00\nb:0g\n", 2), ("a:001\n", 1), (":00\n", 1), ("a:00\na:01\n", 2)] {
            match PskKeys::parse(text, p) {
                Err(TlsError::PskLine { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(PskKeys::parse("\n", p).is_err());
        assert!(!format!("{keys:?}").contains("ff"), "keys are never printed");
    }
}
