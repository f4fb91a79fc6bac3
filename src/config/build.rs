//! Opening what a checked configuration describes.

use super::{Config, ConfigError};
use crate::backend::{file_identity, open_backend, Backend};
use crate::map::{validate_stores, MapError};
use crate::volume::{Catalog, Translation, Volume, VolumeSpec};
use std::collections::HashMap;
use std::sync::Arc;

/// Opens every backend and builds every volume at generation 1. Two backend
/// names for the same file share one open handle, which is allowed only if
/// both are declared `shared = true`.
pub fn build_catalog(config: &Config) -> Result<Catalog, ConfigError> {
    let file = config.file_name();
    let mut stores: HashMap<String, Arc<dyn Backend>> = HashMap::new();
    let mut by_identity: HashMap<(u64, u64), (String, bool)> = HashMap::new();
    for b in &config.backends {
        let at = |message: String, field: &str| ConfigError {
            file: file.clone(),
            line: Some(b.line),
            field: Some(format!("backend '{}': {field}", b.spec.name)),
            message,
        };
        let identity = b.spec.path.as_deref().and_then(file_identity);
        if let Some((first, first_shared)) = identity.and_then(|id| by_identity.get(&id)) {
            if !(b.shared && *first_shared) {
                return Err(at(
                    format!("same file as backend '{first}'; declare both `shared = true` to map one file under two names"),
                    "path",
                ));
            }
            let handle = stores[first].clone();
            stores.insert(b.spec.name.clone(), handle);
            continue;
        }
        let backend = open_backend(&b.spec).map_err(|e| at(e.to_string(), "path"))?;
        let identity = identity.or_else(|| b.spec.path.as_deref().and_then(file_identity));
        if let Some(id) = identity {
            by_identity.insert(id, (b.spec.name.clone(), b.shared));
        }
        stores.insert(b.spec.name.clone(), backend);
    }
    let sizes: HashMap<String, u64> = stores.iter().map(|(n, s)| (n.clone(), s.size())).collect();
    let mut volumes = std::collections::BTreeMap::new();
    for v in &config.volumes {
        let table = v.table(1);
        validate_stores(&table, &sizes).map_err(|err| {
            let index = match &err {
                MapError::OutsideStore { index, .. } | MapError::UnknownStore { index, .. } => *index,
                _ => 0,
            };
            ConfigError {
                file: file.clone(),
                line: Some(v.extent_lines[index]),
                field: Some(format!("volume '{}' extent {index}: length", v.name)),
                message: err.to_string(),
            }
        })?;
        let translation = Translation::new(table, &stores).map_err(|e| ConfigError {
            file: file.clone(),
            line: Some(v.line),
            field: Some(format!("volume '{}'", v.name)),
            message: e.to_string(),
        })?;
        if let Some(store) = translation.stores().iter().find(|s| v.block_size < s.info().min_io) {
            return Err(ConfigError {
                file: file.clone(),
                line: Some(v.line),
                field: Some(format!("volume '{}': block_size", v.name)),
                message: format!("block_size {} is below the {}-byte I/O unit of a direct backend", v.block_size, store.info().min_io),
            });
        }
        let spec = VolumeSpec { name: v.name.clone(), description: v.description.clone(), read_only: v.read_only, block_size: v.block_size };
        volumes.insert(v.name.clone(), Arc::new(Volume::new(spec, translation)));
    }
    let default_export = config.server.default_export.clone().or_else(|| config.volumes.first().map(|v| v.name.clone()));
    Ok(Catalog { stores, volumes, default_export })
}
