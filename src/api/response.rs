//! The envelope of every answer on the control socket.

use super::{ApiError, ErrorKind};
use serde::{Deserialize, Serialize};

/// `{"ok":true,"result":...}` or `{"ok":false,"error":"...","kind":"..."}`.
/// `error` stays a plain string (older clients print it as is); `kind` was
/// added beside it and is absent in answers of older servers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
}

impl Response {
    pub fn ok(result: impl Serialize) -> Response {
        match serde_json::to_value(result) {
            Ok(v) => Response { ok: true, result: Some(v), error: None, kind: None },
            Err(e) => Response::err(ApiError::new(ErrorKind::Internal, format!("cannot encode result: {e}"))),
        }
    }

    pub fn err(e: ApiError) -> Response {
        Response { ok: false, result: None, error: Some(e.message), kind: Some(e.kind) }
    }

    /// The result, or the error this response carries (`other` when an
    /// older server sent no kind).
    pub fn into_result(self) -> Result<serde_json::Value, ApiError> {
        if self.ok {
            Ok(self.result.unwrap_or(serde_json::Value::Null))
        } else {
            Err(ApiError::new(self.kind.unwrap_or(ErrorKind::Other), self.error.unwrap_or_else(|| "unknown error".into())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_stays_a_string_and_kind_is_added() {
        let v = serde_json::to_value(Response::err(ApiError::new(ErrorKind::NotFound, "no volume named 'x'"))).unwrap();
        assert_eq!(v, serde_json::json!({"ok": false, "error": "no volume named 'x'", "kind": "not_found"}));
        let old: Response = serde_json::from_str(r#"{"ok":false,"error":"boom"}"#).unwrap();
        assert_eq!(old.into_result().unwrap_err().kind, ErrorKind::Other);
    }
}
