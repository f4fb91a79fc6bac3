//! `fault`: injected store errors for drills and tests (`nbdvirt fault`).

use serde::{Deserialize, Serialize};

/// The error an injected fault returns, or `off` to end it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultErrorArg {
    Eio,
    Enospc,
    Off,
}

impl FaultErrorArg {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultErrorArg::Eio => "eio",
            FaultErrorArg::Enospc => "enospc",
            FaultErrorArg::Off => "off",
        }
    }
}

/// Which operations fail: reads, writes (write, trim, write_zeroes; and
/// flush when the error is EIO), or both (the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultScopeArg {
    Reads,
    Writes,
    #[default]
    Both,
}

/// The answer to a `fault` request: the backend's fault now in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultReport {
    pub backend: String,
    /// The active fault ("eio on reads"), `None` when off.
    pub fault: Option<String>,
    /// Other backend names on the same file: one store, so they fail too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_with: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_and_old_answers_parse() {
        let r = FaultReport { backend: "b".into(), fault: Some("eio on reads".into()), shared_with: vec![] };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v, serde_json::json!({"backend": "b", "fault": "eio on reads"}));
        assert_eq!(serde_json::from_value::<FaultReport>(v).unwrap(), r);
    }
}
