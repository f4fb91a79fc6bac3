//! `[cluster]`: the etcd endpoints, the cluster's name (its key prefix),
//! this node's id and its node-to-node endpoint, the membership lease's
//! TTL and the failsafe window. Parsed and checked here; `crate::cluster` runs it.

use super::parse_ctx::{valid_name, ParseCtx, Quantity};
use super::{BackendConfig, ClusterConfig, ConfigError, VolumeConfig};
use crate::defaults;
use crate::endpoint::Endpoint;
use serde::Deserialize;
use std::time::Duration;
use toml::Spanned;

/// etcd keeps leases of at least ~1.5 s whatever is asked (its election
/// timeout); below 2 s the serving window would be too short to renew in.
const LEASE_TTL_MIN: Duration = Duration::from_secs(2);
/// Above this a dead node holds its membership, and a coordinator's
/// fencing waits, longer than a Linux NBD client's 30 s request timeout.
const LEASE_TTL_MAX: Duration = Duration::from_secs(20);
/// A dead node delays cluster changes by its lease plus the failsafe
/// window: ten minutes is already far past any etcd restart.
const FAILSAFE_MAX: Duration = Duration::from_secs(600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    etcd: Spanned<Vec<Spanned<String>>>,
    name: Spanned<String>,
    node: Spanned<String>,
    peer: Spanned<String>,
    lease_ttl: Option<Spanned<Quantity>>,
    failsafe: Option<Spanned<Quantity>>,
}

pub(super) fn parse_cluster(ctx: &ParseCtx<'_>, raw: Option<&Spanned<RawCluster>>, pools: usize) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(item) = raw else { return Ok(None) };
    let c = item.get_ref();
    let line = ctx.line(item.span().start);
    if c.etcd.get_ref().is_empty() {
        return Err(ctx.err(&c.etcd, "cluster.etcd", "at least one etcd endpoint is needed"));
    }
    let mut etcd = Vec::new();
    for e in c.etcd.get_ref() {
        etcd.push(etcd_endpoint(e.get_ref()).map_err(|m| ctx.err(e, "cluster.etcd", m))?);
    }
    for (field, v) in [("cluster.name", &c.name), ("cluster.node", &c.node)] {
        if !valid_name(v.get_ref()) || v.get_ref().contains('/') {
            return Err(ctx.err(v, field, format!("'{}' is not a valid name (letters, digits, - _ . : @ +)", v.get_ref())));
        }
    }
    let peer: Endpoint = c.peer.get_ref().parse().map_err(|e: crate::endpoint::EndpointError| ctx.err(&c.peer, "cluster.peer", e.to_string()))?;
    if !matches!(peer, Endpoint::Tcp(_)) {
        return Err(ctx.err(&c.peer, "cluster.peer", "nodes reach each other over TCP: write tcp:HOST:PORT"));
    }
    let lease_ttl = match &c.lease_ttl {
        None => defaults::CLUSTER_LEASE_TTL,
        Some(q) => {
            let d = ctx.duration(q, "cluster.lease_ttl")?;
            if d.subsec_nanos() != 0 {
                return Err(ctx.err(q, "cluster.lease_ttl", "etcd counts leases in whole seconds: write e.g. \"5s\""));
            }
            if !(LEASE_TTL_MIN..=LEASE_TTL_MAX).contains(&d) {
                return Err(ctx.err(q, "cluster.lease_ttl", format!("{d:?} is out of range {LEASE_TTL_MIN:?}..={LEASE_TTL_MAX:?}")));
            }
            d
        }
    };
    let failsafe = match &c.failsafe {
        None => defaults::CLUSTER_FAILSAFE,
        Some(q) => {
            let d = ctx.duration(q, "cluster.failsafe")?;
            if d > FAILSAFE_MAX {
                return Err(ctx.err(q, "cluster.failsafe", format!("{d:?} is longer than {FAILSAFE_MAX:?} (\"0s\" turns failsafe off)")));
            }
            d
        }
    };
    if pools > 0 {
        // Thin allocation commits to a node-local metadata file; two nodes
        // allocating from one pool would hand out the same chunk.
        return Err(ctx.err_at(line, Some("cluster".into()), "storage pools ([[pool]]) are single-node: they cannot be used with [cluster] yet"));
    }
    Ok(Some(ClusterConfig { etcd, name: c.name.get_ref().clone(), node: c.node.get_ref().clone(), peer, lease_ttl, failsafe, serve: None, line }))
}

/// `nodes = [...]` on backends: only with `[cluster]`, and every extent
/// must have a node that reaches all of its stores (that node serves it;
/// the others forward to it).
pub(super) fn check_reach(ctx: &ParseCtx<'_>, cluster: Option<&ClusterConfig>, backends: &[BackendConfig], volumes: &[VolumeConfig]) -> Result<(), ConfigError> {
    let limited = backends.iter().find(|b| b.nodes.is_some());
    if cluster.is_none() {
        return match limited {
            Some(b) => Err(ctx.err_at(b.line, Some(format!("backend '{}': nodes", b.spec.name)), "`nodes` says which cluster nodes reach a store: it needs a [cluster] section")),
            None => Ok(()),
        };
    }
    if limited.is_none() {
        return Ok(());
    }
    for v in volumes {
        for (i, e) in v.extents.iter().enumerate() {
            let stores: Vec<&BackendConfig> = e.target.store_ranges(e.length).into_iter().filter_map(|(s, _)| backends.iter().find(|b| b.spec.name == s)).collect();
            let mut common: Option<Vec<&String>> = None;
            for b in &stores {
                if let Some(nodes) = &b.nodes {
                    common = Some(match common {
                        None => nodes.iter().collect(),
                        Some(c) => c.into_iter().filter(|n| nodes.contains(n)).collect(),
                    });
                }
            }
            if common.is_some_and(|c| c.is_empty()) {
                let reach: Vec<String> = stores.iter().map(|b| format!("'{}' on {}", b.spec.name, b.nodes.as_ref().map_or("every node".into(), |n| n.join(", ")))).collect();
                let at = v.extent_lines.get(i).copied().unwrap_or(v.line);
                return Err(ctx.err_at(at, Some(format!("volume '{}' extent {i}", v.name)), format!("no node reaches every store of the extent ({})", reach.join("; "))));
            }
        }
    }
    Ok(())
}

/// `http://HOST:PORT` (etcd's client URL), normalized. TLS to etcd is not
/// built in yet.
pub fn etcd_endpoint(url: &str) -> Result<String, String> {
    let rest = match url.split_once("://") {
        Some(("http", rest)) => rest,
        Some(("https", _)) => return Err(format!("'{url}': TLS to etcd is not supported yet; use http:// on a trusted network")),
        _ => return Err(format!("'{url}' is not an etcd client URL (http://HOST:PORT)")),
    };
    let host_port = rest.trim_end_matches('/');
    match host_port.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host_port.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(format!("http://{host_port}")),
        _ => Err(format!("'{url}' is not an etcd client URL (http://HOST:PORT)")),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    const OK: &str = "[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nname = \"prod\"\nnode = \"n1\"\npeer = \"tcp:127.0.0.1:10910\"\n";

    fn parse(text: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(text, "t.toml", Path::new(""))
    }

    #[test]
    fn the_issue_example_parses_with_its_defaults() {
        let c = parse(&format!("{OK}lease_ttl = \"5s\"\n")).unwrap().cluster.unwrap();
        assert_eq!((c.name.as_str(), c.node.as_str(), c.etcd[0].as_str()), ("prod", "n1", "http://127.0.0.1:2379"));
        assert_eq!(c.lease_ttl, std::time::Duration::from_secs(5));
        assert_eq!(parse(OK).unwrap().cluster.unwrap().lease_ttl, crate::defaults::CLUSTER_LEASE_TTL);
        assert_eq!(parse(OK).unwrap().cluster.unwrap().failsafe, crate::defaults::CLUSTER_FAILSAFE);
        assert_eq!(parse(&format!("{OK}failsafe = \"0s\"\n")).unwrap().cluster.unwrap().failsafe, std::time::Duration::ZERO);
        assert!(parse("").unwrap().cluster.is_none());
    }

    #[test]
    fn bad_fields_are_named_with_their_line() {
        let cases = [
            (OK.replace("http://127.0.0.1:2379", "127.0.0.1:2379"), 2, "cluster.etcd", "not an etcd client URL"),
            (OK.replace("http://127.0.0.1:2379", "https://e:2379"), 2, "cluster.etcd", "TLS to etcd"),
            (OK.replace("[\"http://127.0.0.1:2379\"]", "[]"), 2, "cluster.etcd", "at least one"),
            (OK.replace("\"n1\"", "\"n/1\""), 4, "cluster.node", "not a valid name"),
            (OK.replace("tcp:127.0.0.1:10910", "unix:/x"), 5, "cluster.peer", "over TCP"),
            (format!("{OK}lease_ttl = \"1500ms\"\n"), 6, "cluster.lease_ttl", "whole seconds"),
            (format!("{OK}lease_ttl = \"1s\"\n"), 6, "cluster.lease_ttl", "out of range"),
            (format!("{OK}lease_ttl = 60\n"), 6, "cluster.lease_ttl", "out of range"),
            (format!("{OK}failsafe = 700\n"), 6, "cluster.failsafe", "longer than"),
        ];
        for (text, line, field, words) in cases {
            let e = parse(&text).unwrap_err();
            assert_eq!((e.line, e.field.as_deref()), (Some(line), Some(field)), "{e}");
            assert!(e.message.contains(words), "{e}");
        }
        let e = parse(&OK.replace("peer = \"tcp:127.0.0.1:10910\"\n", "")).unwrap_err();
        assert!(e.message.contains("peer"), "{e}");
    }

    #[test]
    fn mirrors_are_allowed_in_cluster_mode() {
        let text = format!("{OK}[[backend]]\nname = \"a\"\npath = \"/tmp/a\"\nsize = \"1GiB\"\n[[backend]]\nname = \"b\"\npath = \"/tmp/b\"\nsize = \"1GiB\"\n[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"1MiB\"\nmirror = [ {{ backend = \"a\" }}, {{ backend = \"b\" }} ]\n");
        let config = parse(&text).unwrap();
        assert_eq!(config.volumes[0].extents[0].target.legs().map(<[_]>::len), Some(2));
    }

    #[test]
    fn pools_are_refused_in_cluster_mode() {
        let text = format!("{OK}[[backend]]\nname = \"b\"\npath = \"/tmp/b\"\nsize = \"1GiB\"\n[[pool]]\nname = \"p\"\nbackends = [\"b\"]\n");
        let e = parse(&text).unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (Some(1), Some("cluster")), "{e}");
        assert!(e.message.contains("single-node"), "{e}");
    }

    #[test]
    fn backend_nodes_need_a_cluster_and_a_node_reaching_every_store_of_an_extent() {
        let stores = "[[backend]]\nname = \"a\"\npath = \"/tmp/a\"\nsize = \"1GiB\"\nnodes = [\"n1\"]\n[[backend]]\nname = \"b\"\npath = \"/tmp/b\"\nsize = \"1GiB\"\nnodes = [\"n2\", \"n3\"]\n";
        let stripe = "[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"2MiB\"\nstripe = [ { backend = \"a\" }, { backend = \"b\" } ]\nchunk = \"64KiB\"\n";
        let c = parse(&format!("{OK}{stores}")).unwrap();
        assert_eq!(c.backends[0].nodes.as_deref(), Some(&["n1".to_string()][..]));
        assert!(c.backends[0].reachable_from("n1") && !c.backends[0].reachable_from("n2"));
        assert_eq!(c.cluster.unwrap().serve.map(|e| e.to_string()).as_deref(), Some("tcp:127.0.0.1:10809"), "the default listener is published");
        let e = parse(&format!("{OK}{stores}{stripe}")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("volume 'v' extent 0"), "{e}");
        assert!(e.message.contains("no node reaches every store") && e.message.contains("'a' on n1; 'b' on n2, n3"), "{e}");
        let e = parse(stores).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("backend 'a': nodes"), "{e}");
        assert!(e.message.contains("needs a [cluster]"), "{e}");
        for (list, words) in [("[]", "an empty list"), ("[\"n1\", \"n1\"]", "listed twice"), ("[\"n/1\"]", "not a valid node id")] {
            let e = parse(&format!("{OK}{}", stores.replacen("[\"n1\"]", list, 1))).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("backend.nodes"), "{e}");
            assert!(e.message.contains(words), "{e}");
        }
    }
}
