//! One `[[volume.extent]]`: its layout key (`backend`, `zero`, `mirror`
//! or `stripe`) and that layout's settings, checked with the line of each
//! key so that an error points at what to fix.

use super::parse_ctx::{ParseCtx, Quantity};
use super::{BackendConfig, ConfigError};
use crate::map::{Extent, Leg, MapError, TargetSpec, CHUNK_MIN, DEFAULT_REGION, REGION_MAX, REGION_MIN};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExtent {
    start: Option<Spanned<Quantity>>,
    length: Spanned<Quantity>,
    backend: Option<Spanned<String>>,
    backend_offset: Option<Spanned<Quantity>>,
    zero: Option<Spanned<bool>>,
    mirror: Option<Spanned<Vec<Spanned<RawLeg>>>>,
    region: Option<Spanned<Quantity>>,
    stripe: Option<Spanned<Vec<Spanned<RawLeg>>>>,
    chunk: Option<Spanned<Quantity>>,
}

/// A mirror leg or stripe member: `{ backend = "a", backend_offset = 0 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLeg {
    backend: Spanned<String>,
    backend_offset: Option<Spanned<Quantity>>,
}

/// Config lines of one extent's keys (the header's where a key is absent).
pub(super) struct ExtentLines {
    start: usize,
    length: usize,
    /// The layout key (`backend`, `zero`, `mirror`, `stripe`) and its line.
    layout_key: &'static str,
    layout: usize,
    /// `backend_offset` for a linear extent, else the layout key's line
    /// (the legs' offsets are on it).
    pub(super) backend_offset: usize,
    /// `region` (mirror; the layout key's line when defaulted).
    region: usize,
    pub(super) header: usize,
}

/// The one layout key an extent has, with its value.
#[derive(Clone, Copy)]
enum Key<'r> {
    Backend(&'r Spanned<String>),
    Zero,
    Mirror(&'r Spanned<Vec<Spanned<RawLeg>>>),
    Stripe(&'r Spanned<Vec<Spanned<RawLeg>>>),
}

impl Key<'_> {
    fn name(&self) -> &'static str {
        match self {
            Key::Backend(_) => "backend",
            Key::Zero => "zero",
            Key::Mirror(_) => "mirror",
            Key::Stripe(_) => "stripe",
        }
    }
}

/// The volume an extent belongs to, as its checks need it.
pub(super) struct VolumeCtx<'a> {
    pub(super) name: &'a str,
    pub(super) read_only: bool,
    pub(super) backends: &'a [BackendConfig],
}

/// Parses extent `index`, which starts at `next_start` unless it says.
pub(super) fn parse_extent(
    ctx: &ParseCtx<'_>,
    v: &VolumeCtx<'_>,
    index: usize,
    e: &Spanned<RawExtent>,
    next_start: u64,
) -> Result<(Extent, ExtentLines), ConfigError> {
    let r = e.get_ref();
    let name = v.name;
    let field = |f: &str| format!("volume '{name}' extent {index}: {f}");
    let start = r.start.as_ref().map(|s| ctx.size(s, &field("start"))).transpose()?.unwrap_or(next_start);
    let length = ctx.size(&r.length, &field("length"))?;
    let zero = r.zero.as_ref().filter(|z| *z.get_ref());
    let keys: Vec<(Key<'_>, std::ops::Range<usize>)> = [
        r.backend.as_ref().map(|b| (Key::Backend(b), b.span())),
        zero.map(|z| (Key::Zero, z.span())),
        r.mirror.as_ref().map(|m| (Key::Mirror(m), m.span())),
        r.stripe.as_ref().map(|s| (Key::Stripe(s), s.span())),
    ]
    .into_iter()
    .flatten()
    .collect();
    let (key, layout_span) = match keys.as_slice() {
        [one] => one.clone(),
        [] => return Err(ctx.err(e, &field("backend"), "missing: give `backend = \"NAME\"`, `zero = true`, `mirror = [...]` or `stripe = [...]`")),
        [first, second, ..] => {
            let (a, b) = (first.0.name(), second.0.name());
            let msg = format!("an extent has exactly one of `backend`, `zero = true`, `mirror` and `stripe`, not both `{a}` and `{b}`");
            return Err(ctx.err_at(ctx.line(second.1.start), Some(field(b)), msg));
        }
    };
    let layout_key = key.name();
    let at = |s: Option<std::ops::Range<usize>>| ctx.line(s.unwrap_or(e.span()).start);
    let layout = at(Some(layout_span));
    // Keys that belong to another layout are refused rather than ignored
    // (a zero extent's backend_offset always was ignored, and still is).
    if let (Some(o), Key::Mirror(_) | Key::Stripe(_)) = (&r.backend_offset, &key) {
        return Err(ctx.err(o, &field("backend_offset"), format!("not for a {layout_key} extent: give each leg its own backend_offset")));
    }
    if let (Some(q), false) = (&r.region, matches!(key, Key::Mirror(_))) {
        return Err(ctx.err(q, &field("region"), "`region` is only for mirror extents"));
    }
    if let (Some(q), false) = (&r.chunk, matches!(key, Key::Stripe(_))) {
        return Err(ctx.err(q, &field("chunk"), "`chunk` is only for stripe extents"));
    }
    let backend = |b: &Spanned<String>, f: &str| -> Result<String, ConfigError> {
        let store = b.get_ref();
        let found = v.backends.iter().find(|x| &x.spec.name == store).ok_or_else(|| ctx.err(b, &field(f), format!("no backend named '{store}'")))?;
        if found.spec.read_only && !v.read_only {
            return Err(ctx.err(b, &field(f), format!("backend '{store}' is read-only but volume '{name}' is not")));
        }
        Ok(store.clone())
    };
    let legs = |key: &str, raw: &[Spanned<RawLeg>]| -> Result<Vec<Leg>, ConfigError> {
        let leg = |(i, l): (usize, &Spanned<RawLeg>)| {
            let l = l.get_ref();
            let store = backend(&l.backend, &format!("{key}[{i}].backend"))?;
            let offset = l.backend_offset.as_ref().map(|o| ctx.size(o, &field(&format!("{key}[{i}].backend_offset")))).transpose()?.unwrap_or(0);
            Ok(Leg { store, offset })
        };
        raw.iter().enumerate().map(leg).collect()
    };
    let mut region_line = layout;
    let target = match key {
        Key::Backend(b) => {
            let offset = r.backend_offset.as_ref().map(|o| ctx.size(o, &field("backend_offset"))).transpose()?.unwrap_or(0);
            TargetSpec::Linear { store: backend(b, "backend")?, offset }
        }
        Key::Zero => TargetSpec::Zero,
        Key::Mirror(raw) => {
            // One leg is a valid table (a split mirror) but not something
            // to configure: it would be a linear extent with extra steps.
            if raw.get_ref().len() < 2 {
                return Err(ctx.err(raw, &field("mirror"), format!("a mirror needs at least two legs, got {}", raw.get_ref().len())));
            }
            let region = match &r.region {
                None => DEFAULT_REGION,
                Some(q) => {
                    region_line = at(Some(q.span()));
                    let region = ctx.size(q, &field("region"))?;
                    if !region.is_power_of_two() || !(REGION_MIN..=REGION_MAX).contains(&region) {
                        return Err(ctx.err(q, &field("region"), format!("{region} must be a power of two from 64KiB to 16MiB")));
                    }
                    region
                }
            };
            TargetSpec::Mirror { legs: legs("mirror", raw.get_ref())?, region }
        }
        Key::Stripe(raw) => {
            let n = raw.get_ref().len() as u64;
            if n < 2 {
                return Err(ctx.err(raw, &field("stripe"), format!("a stripe needs at least two members, got {n}")));
            }
            let q = r.chunk.as_ref().ok_or_else(|| ctx.err(raw, &field("chunk"), "missing: a stripe needs `chunk = SIZE` (a power of two, at least 4KiB)"))?;
            let chunk = ctx.size(q, &field("chunk"))?;
            if !chunk.is_power_of_two() || chunk < CHUNK_MIN {
                return Err(ctx.err(q, &field("chunk"), format!("{chunk} must be a power of two of at least 4KiB")));
            }
            let row = chunk.saturating_mul(n);
            if length % row != 0 {
                let msg = format!("stripe length {length} is not a multiple of chunk × N ({chunk} × {n} = {row})");
                return Err(ctx.err(&r.length, &field("length"), msg));
            }
            TargetSpec::Stripe { members: legs("stripe", raw.get_ref())?, chunk }
        }
    };
    let lines = ExtentLines {
        start: at(r.start.as_ref().map(|s| s.span())),
        length: at(Some(r.length.span())),
        layout_key,
        layout,
        backend_offset: if matches!(key, Key::Backend(_)) { at(r.backend_offset.as_ref().map(|s| s.span())) } else { layout },
        region: region_line,
        header: at(None),
    };
    Ok((Extent { start, length, target }, lines))
}

/// A mirror's bitmap counts regions of the volume, so every mirror extent
/// of a volume uses one region size.
pub(super) fn check_regions(ctx: &ParseCtx<'_>, name: &str, extents: &[Extent], lines: &[ExtentLines]) -> Result<(), ConfigError> {
    let regions = extents.iter().enumerate().filter_map(|(i, e)| match &e.target {
        TargetSpec::Mirror { region, .. } => Some((i, *region)),
        _ => None,
    });
    let mut first: Option<(usize, u64)> = None;
    for (index, region) in regions {
        match first {
            None => first = Some((index, region)),
            Some((i, r)) if r != region => {
                let msg = format!("{region} differs from extent {i}'s {r}: the mirror extents of a volume share one region");
                return Err(ctx.err_at(lines[index].region, Some(format!("volume '{name}' extent {index}: region")), msg));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A table check's error, at the line and field of the extent key at fault.
pub(super) fn extent_err(ctx: &ParseCtx<'_>, name: &str, lines: &[ExtentLines], err: MapError) -> ConfigError {
    let (index, field) = match &err {
        MapError::ZeroLength { index } => (*index, "length"),
        MapError::NotContiguous { index, .. } => (*index, "start"),
        MapError::Misaligned { index, field, .. } => (*index, *field),
        MapError::Overflow { index } => (*index, "length"),
        MapError::UnknownStore { index, .. } | MapError::OutsideStore { index, .. } | MapError::Layout { index, .. } => {
            (*index, lines.get(*index).map_or("backend", |l| l.layout_key))
        }
        _ => (0, "extent"),
    };
    let Some(l) = lines.get(index) else {
        return ctx.err_at(1, Some(format!("volume '{name}'")), err.to_string());
    };
    let line = match field {
        "start" => l.start,
        "length" => l.length,
        "backend_offset" => l.backend_offset,
        "backend" | "zero" | "mirror" | "stripe" => l.layout,
        _ => l.header,
    };
    ctx.err_at(line, Some(format!("volume '{name}' extent {index}: {field}")), err.to_string())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    const BACKENDS: &str = "[[backend]]\nname = \"a\"\nmemory = true\nsize = \"16MiB\"\n\
[[backend]]\nname = \"b\"\nmemory = true\nsize = \"16MiB\"\nspare = true\n";

    /// Parses BACKENDS (9 lines) + a volume whose extent's layout keys
    /// start at line 14.
    fn parse(extent: &str) -> Result<Config, crate::config::ConfigError> {
        let text = format!("{BACKENDS}[[volume]]\nname = \"v\"\n[[volume.extent]]\nlength = \"1MiB\"\n{extent}");
        Config::parse(&text, "t.toml", Path::new(""))
    }

    fn fails(extent: &str, line: usize, field: &str, needle: &str) {
        let e = parse(extent).unwrap_err();
        assert_eq!((e.line, e.field.as_deref()), (Some(line), Some(field)), "{e}");
        assert!(e.message.contains(needle), "{e}");
        assert!(e.to_string().starts_with(&format!("t.toml:{line}: {field}: ")), "{e}");
    }

    const A_B: &str = "[ { backend = \"a\", backend_offset = 0 }, { backend = \"b\" } ]";

    #[test]
    fn mirror_and_stripe_parse() {
        let c = parse(&format!("mirror = {A_B}\nregion = \"256KiB\"\n")).unwrap();
        assert!(matches!(&c.volumes[0].extents[0].target, crate::map::TargetSpec::Mirror { legs, region: 262144 } if legs.len() == 2));
        let c = parse(&format!("mirror = {A_B}\n")).unwrap();
        assert!(matches!(&c.volumes[0].extents[0].target, crate::map::TargetSpec::Mirror { region: crate::map::DEFAULT_REGION, .. }));
        let c = parse(&format!("stripe = {A_B}\nchunk = \"64KiB\"\n")).unwrap();
        assert!(matches!(&c.volumes[0].extents[0].target, crate::map::TargetSpec::Stripe { members, chunk: 65536 } if members[1].store == "b"));
        assert!(c.backends[1].spare && !c.backends[0].spare);
    }

    #[test]
    fn each_layout_error_names_its_line_and_field() {
        fails("stripe = [ { backend = \"a\" }, { backend = \"b\" } ]\nchunk = \"1MiB\"\n", 13, "volume 'v' extent 0: length", "not a multiple of chunk × N");
        fails(&format!("stripe = {A_B}\nchunk = \"48KiB\"\n"), 15, "volume 'v' extent 0: chunk", "power of two");
        fails(&format!("stripe = {A_B}\nchunk = 1024\n"), 15, "volume 'v' extent 0: chunk", "at least 4KiB");
        fails(&format!("stripe = {A_B}\n"), 14, "volume 'v' extent 0: chunk", "missing");
        fails("stripe = [ { backend = \"a\" }, { backend = \"x\" } ]\nchunk = 4096\n", 14, "volume 'v' extent 0: stripe[1].backend", "no backend named 'x'");
        fails("stripe = [ { backend = \"a\" } ]\nchunk = 4096\n", 14, "volume 'v' extent 0: stripe", "at least two members");
        fails("stripe = [ { backend = \"a\" }, { backend = \"a\", backend_offset = \"1MiB\" } ]\nchunk = 4096\n", 14, "volume 'v' extent 0: stripe", "twice");
        fails(&format!("mirror = {A_B}\nchunk = \"64KiB\"\n"), 15, "volume 'v' extent 0: chunk", "only for stripe");
        fails(&format!("stripe = {A_B}\nregion = \"1MiB\"\n"), 15, "volume 'v' extent 0: region", "only for mirror");
        fails("mirror = [ { backend = \"a\" } ]\n", 14, "volume 'v' extent 0: mirror", "at least two legs");
        fails(&format!("mirror = {A_B}\nregion = \"3MiB\"\n"), 15, "volume 'v' extent 0: region", "power of two");
        fails(&format!("backend = \"a\"\nmirror = {A_B}\n"), 15, "volume 'v' extent 0: mirror", "exactly one of");
        fails(&format!("zero = true\nstripe = {A_B}\nchunk = 4096\n"), 15, "volume 'v' extent 0: stripe", "exactly one of");
        fails(&format!("mirror = {A_B}\nbackend_offset = 0\n"), 15, "volume 'v' extent 0: backend_offset", "each leg");
        let e = parse("mirror = [ { backend = \"a\" }, { backend = \"b\", offset = 0 } ]\n").unwrap_err();
        assert_eq!(e.line, Some(14), "{e}");
        assert!(e.message.contains("unknown field `offset`"), "{e}");
    }

    #[test]
    fn mirror_extents_of_a_volume_share_one_region() {
        let second = "[[volume.extent]]\nlength = \"1MiB\"\nmirror = [ { backend = \"a\", backend_offset = \"1MiB\" }, { backend = \"b\", backend_offset = \"1MiB\" } ]\n";
        fails(&format!("mirror = {A_B}\n{second}region = \"2MiB\"\n"), 18, "volume 'v' extent 1: region", "share one region");
        assert!(parse(&format!("mirror = {A_B}\n{second}")).is_ok());
    }
}
