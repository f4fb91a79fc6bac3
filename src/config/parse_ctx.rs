//! What every step of parsing the config needs: line numbers for
//! messages, sizes and durations with units, relative paths.

use super::units::{parse_duration, parse_size};
use super::ConfigError;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// An integer or a string with a unit.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Quantity {
    Int(i64),
    Text(String),
}

/// What every parse step needs: the text (for line numbers), the file
/// name (for messages) and the directory relative paths are resolved in.
pub(super) struct ParseCtx<'a> {
    pub(super) text: &'a str,
    pub(super) file: &'a str,
    pub(super) base: &'a Path,
}

impl ParseCtx<'_> {
    pub(super) fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())].bytes().filter(|b| *b == b'\n').count() + 1
    }

    pub(super) fn err<T>(&self, span: &Spanned<T>, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError { file: self.file.into(), line: Some(self.line(span.span().start)), field: Some(field.into()), message: message.into() }
    }

    pub(super) fn err_at(&self, line: usize, field: Option<String>, message: impl Into<String>) -> ConfigError {
        ConfigError { file: self.file.into(), line: Some(line), field, message: message.into() }
    }

    pub(super) fn size(&self, q: &Spanned<Quantity>, field: &str) -> Result<u64, ConfigError> {
        match q.get_ref() {
            Quantity::Int(n) if *n >= 0 => Ok(*n as u64),
            Quantity::Int(n) => Err(self.err(q, field, format!("{n} is negative"))),
            Quantity::Text(t) => parse_size(t).map_err(|m| self.err(q, field, m.to_string())),
        }
    }

    pub(super) fn duration(&self, q: &Spanned<Quantity>, field: &str) -> Result<std::time::Duration, ConfigError> {
        match q.get_ref() {
            Quantity::Int(n) if *n >= 0 => Ok(std::time::Duration::from_secs(*n as u64)),
            Quantity::Int(n) => Err(self.err(q, field, format!("{n} is negative"))),
            Quantity::Text(t) => parse_duration(t).map_err(|m| self.err(q, field, m.to_string())),
        }
    }

    pub(super) fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    pub(super) fn count(&self, v: &Option<Spanned<i64>>, field: &str, default: usize, max: i64) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if (1..=max).contains(n.get_ref()) => Ok(*n.get_ref() as usize),
            Some(n) => Err(self.err(n, field, format!("{} is out of range 1..={max}", n.get_ref()))),
        }
    }
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:@+".contains(c))
}

