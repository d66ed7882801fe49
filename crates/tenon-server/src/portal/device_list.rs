//! The device list and the overview's numbers, from memory: the world's device metadata (host
//! name, primary user, users seen, configuration version) and the check-in index's last-seen
//! times. No database read per page view, so a search over 100,000 devices is a scan of a
//! `HashMap` under a short read lock, and only the page shown is copied out.

use crate::device_health::BitlockerBucket;
use crate::device_key::cmp_ci;
use crate::state::{DeviceMeta, World};
use std::cmp::Ordering;
use std::collections::HashSet;

/// Rows per page unless the query says otherwise, and the most it may say.
pub const DEFAULT_PER_PAGE: usize = 50;
pub const MAX_PER_PAGE: usize = 200;
/// A device not seen for this long is stale (the overview and `filter=stale`).
pub const STALE_SECS: i64 = 7 * 24 * 3600;
pub const RECENT_SECS: i64 = 24 * 3600;
/// Longer searches are cut (a search box is for a name, not a document).
const MAX_QUERY: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Hostname,
    User,
    LastSeen,
    Version,
}

impl SortKey {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "hostname" => Self::Hostname,
            "user" => Self::User,
            "last_seen" => Self::LastSeen,
            "version" => Self::Version,
            _ => return None,
        })
    }

    pub fn word(self) -> &'static str {
        match self {
            Self::Hostname => "hostname",
            Self::User => "user",
            Self::LastSeen => "last_seen",
            Self::Version => "version",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Active devices.
    Active,
    SeenRecently,
    Stale,
    WithoutPrimary,
    Decommissioned,
    /// Active devices whose primary user is not the user seen most often (as
    /// `tenonctl devices list --primary-mismatch`).
    PrimaryMismatch,
    /// Active devices whose last report puts BitLocker in this bucket.
    Bitlocker(BitlockerBucket),
    /// Active devices whose last sync reported an error or a failed policy.
    Failing,
    EntraPending,
    EntraFailed,
}

/// `filter=bitlocker-...` words, one per bucket.
fn bitlocker_word(b: BitlockerBucket) -> &'static str {
    match b {
        BitlockerBucket::EncryptedEscrowed => "bitlocker-encrypted",
        BitlockerBucket::Encrypting => "bitlocker-encrypting",
        BitlockerBucket::ActionRequired => "bitlocker-action-required",
        BitlockerBucket::NotCapable => "bitlocker-not-capable",
        BitlockerBucket::Failed => "bitlocker-failed",
        BitlockerBucket::NotRequired => "bitlocker-not-required",
    }
}

impl Filter {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "" | "active" => Self::Active,
            "seen-24h" => Self::SeenRecently,
            "stale" => Self::Stale,
            "without-primary" => Self::WithoutPrimary,
            "decommissioned" => Self::Decommissioned,
            "primary-mismatch" => Self::PrimaryMismatch,
            "failing" => Self::Failing,
            "entra-pending" => Self::EntraPending,
            "entra-failed" => Self::EntraFailed,
            other => {
                return BitlockerBucket::ALL.into_iter().find(|b| bitlocker_word(*b) == other).map(Self::Bitlocker)
            }
        })
    }

    pub fn word(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::SeenRecently => "seen-24h",
            Self::Stale => "stale",
            Self::WithoutPrimary => "without-primary",
            Self::Decommissioned => "decommissioned",
            Self::PrimaryMismatch => "primary-mismatch",
            Self::Bitlocker(b) => bitlocker_word(b),
            Self::Failing => "failing",
            Self::EntraPending => "entra-pending",
            Self::EntraFailed => "entra-failed",
        }
    }

    fn admits(self, m: &DeviceMeta, last_seen: Option<i64>, now: i64) -> bool {
        match self {
            Self::Active => m.active,
            Self::SeenRecently => m.active && last_seen.is_some_and(|t| now - t <= RECENT_SECS),
            Self::Stale => m.active && last_seen.is_none_or(|t| now - t > STALE_SECS),
            Self::WithoutPrimary => m.active && m.primary.is_none(),
            Self::Decommissioned => !m.active,
            Self::PrimaryMismatch => {
                m.active && m.top_user.as_ref().is_some_and(|(_, top)| m.primary.as_ref() != Some(top))
            }
            Self::Bitlocker(b) => m.active && m.health.bitlocker == Some(b),
            Self::Failing => m.active && m.health.failing,
            Self::EntraPending => m.active && m.health.entra_pending,
            Self::EntraFailed => m.active && m.health.entra_failed,
        }
    }
}

/// What the list shows: from the query string, every part optional and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListQuery {
    /// Lower-cased search text (host name, user or id); empty: everything.
    pub q: String,
    pub filter: Filter,
    pub sort: SortKey,
    pub descending: bool,
    /// 1-based.
    pub page: usize,
    pub per_page: usize,
}

impl ListQuery {
    /// From `q`, `filter`, `sort`, `dir`, `page`, `per`; a value that does not parse falls back to
    /// its default (a hand-edited URL still shows a list).
    pub fn from_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Self {
        let mut lq = ListQuery {
            q: String::new(),
            filter: Filter::Active,
            sort: SortKey::Hostname,
            descending: false,
            page: 1,
            per_page: DEFAULT_PER_PAGE,
        };
        for (k, v) in pairs {
            match k {
                // Control characters cannot be typed into the search box, and the search key
                // separates its fields with one.
                "q" => {
                    lq.q =
                        v.trim().chars().filter(|c| !c.is_control()).take(MAX_QUERY).collect::<String>().to_lowercase()
                }
                "filter" => lq.filter = Filter::parse(v).unwrap_or(Filter::Active),
                "sort" => lq.sort = SortKey::parse(v).unwrap_or(SortKey::Hostname),
                "dir" => lq.descending = v == "desc",
                "page" => lq.page = v.parse().ok().filter(|p| *p >= 1).unwrap_or(1),
                "per" => {
                    lq.per_page = v.parse().ok().map(|p: usize| p.clamp(1, MAX_PER_PAGE)).unwrap_or(DEFAULT_PER_PAGE)
                }
                _ => {}
            }
        }
        lq
    }
}

/// One row of the list, copied out of the world.
#[derive(Clone, Debug)]
pub struct Row {
    pub id: String,
    pub hostname: String,
    pub primary: Option<String>,
    pub primary_name: Option<String>,
    pub last_seen: Option<i64>,
    pub version: u64,
    pub active: bool,
}

pub struct Listing {
    pub rows: Vec<Row>,
    /// Devices that match, over all pages.
    pub total: usize,
    pub page: usize,
    pub pages: usize,
}

/// Puts in `v[start..end]` the elements a full sort by `cmp` would put there, sorted, in time
/// linear in `v.len()` (plus sorting the page); the rest of `v` is left in no particular order.
/// `cmp` must be a total order for the page to be well defined.
fn select_page<T>(v: &mut [T], start: usize, end: usize, mut cmp: impl FnMut(&T, &T) -> Ordering) {
    let end = end.min(v.len());
    if start >= end {
        return;
    }
    if start > 0 {
        v.select_nth_unstable_by(start, &mut cmp);
    }
    let rest = &mut v[start..];
    if end - start < rest.len() {
        rest.select_nth_unstable_by(end - start - 1, &mut cmp);
    }
    rest[..end - start].sort_unstable_by(cmp);
}

/// The primary user's display name, from the directory record.
pub fn display_name(world: &World, upn: &tenon_core::ids::Upn) -> Option<String> {
    display_name_ref(world, upn).map(str::to_string)
}

fn display_name_ref<'w>(world: &'w World, upn: &tenon_core::ids::Upn) -> Option<&'w str> {
    world.directory.users.get(upn).and_then(|u| u.record.get("displayName")).and_then(|v| v.as_str())
}

/// Every directory user's display name, lower-cased into one buffer, so that a search by name is
/// one substring scan of that buffer rather than a pass over the users' records. Built for one
/// directory ([`NameIndex::is_for`]): every directory write bumps `World::dir_gen`, and a directory
/// loaded anew is another `Arc`.
pub struct NameIndex {
    dir_gen: u64,
    /// The address of the directory's `Arc` it was built from (compared, never followed).
    directory: usize,
    /// The names, each followed by the key separator (which no name and no search holds).
    text: String,
    /// Where each name ends in `text`, ascending; `upns[i]` is the user of the name ending at `ends[i]`.
    ends: Vec<usize>,
    upns: Vec<tenon_core::ids::Upn>,
}

impl NameIndex {
    pub fn build(world: &World) -> Self {
        let mut text = String::new();
        let mut ends = Vec::with_capacity(world.directory.users.len());
        let mut upns = Vec::with_capacity(world.directory.users.len());
        for (upn, u) in &world.directory.users {
            if let Some(name) = u.record.get("displayName").and_then(|v| v.as_str()) {
                crate::device_key::push_clean(&mut text, name);
                ends.push(text.len());
                upns.push(upn.clone());
                text.push(crate::device_key::FIELD_SEPARATOR);
            }
        }
        Self { dir_gen: world.dir_gen, directory: std::sync::Arc::as_ptr(&world.directory) as usize, text, ends, upns }
    }

    /// Built from `world`'s directory as it is now.
    pub fn is_for(&self, world: &World) -> bool {
        self.dir_gen == world.dir_gen && self.directory == std::sync::Arc::as_ptr(&world.directory) as usize
    }

    /// The users whose display name holds `q` (lower-case, without control characters).
    fn matching<'a>(&'a self, finder: &memchr::memmem::Finder<'_>) -> HashSet<&'a tenon_core::ids::Upn> {
        finder
            .find_iter(self.text.as_bytes())
            // A match lies within one name (no name and no query holds the separator), so the
            // first name ending after it is its own; `get`, not indexing, all the same.
            .filter_map(|at| self.upns.get(self.ends.partition_point(|end| *end <= at)))
            .collect()
    }
}

/// One search, prepared once for the whole fleet.
struct Search<'a> {
    finder: memchr::memmem::Finder<'a>,
    q: &'a str,
    /// `q` could begin a device id (lower-case hex digits and dashes).
    id_like: bool,
    /// Users whose display name holds `q`: their devices match too.
    named: HashSet<&'a tenon_core::ids::Upn>,
}

impl<'a> Search<'a> {
    fn new(q: &'a str, names: &'a NameIndex) -> Self {
        let finder = memchr::memmem::Finder::new(q.as_bytes());
        let named = names.matching(&finder);
        Self { finder, q, id_like: q.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'), named }
    }

    /// Host name, primary user or a user seen holds `q`, or the id starts with it, or the
    /// primary user's display name holds it.
    fn matches(&self, id: &str, m: &DeviceMeta) -> bool {
        self.finder.find(m.key.text()).is_some()
            || (self.id_like && id.starts_with(self.q))
            || (!self.named.is_empty() && m.primary.as_ref().is_some_and(|p| self.named.contains(p)))
    }
}

/// A device that passed the filter and the search: what ordering it needs, inline, so that
/// selecting the page compares integers and follows no pointer unless two ranks tie.
struct Hit<'w> {
    rank: u128,
    id: &'w str,
    meta: &'w DeviceMeta,
}

/// Filters, searches, sorts (ties by id, so pages are stable) and cuts out one page. `names` is
/// asked for the display names only when there is a search, and must be for `world`.
pub fn list(world: &World, names: impl FnOnce() -> std::sync::Arc<NameIndex>, lq: &ListQuery, now: i64) -> Listing {
    let names = (!lq.q.is_empty()).then(names);
    debug_assert!(names.as_ref().is_none_or(|n| n.is_for(world)));
    let search = names.as_deref().map(|n| Search::new(&lq.q, n));
    // The time is read per device only where the filter or the order needs it; the page's rows
    // get theirs below.
    let needs_seen = matches!(lq.filter, Filter::SeenRecently | Filter::Stale) || lq.sort == SortKey::LastSeen;
    let mut hits: Vec<Hit> = world
        .devices
        .iter()
        .filter_map(|(id, m)| {
            debug_assert!(m.key_is_fresh(), "device {id}: its search key was not refreshed after a change");
            let seen = if needs_seen { m.slot.last_seen() } else { None };
            let admitted = lq.filter.admits(m, seen, now) && search.as_ref().is_none_or(|s| s.matches(id, m));
            admitted.then(|| Hit {
                rank: match lq.sort {
                    SortKey::Hostname => m.key.host_rank(),
                    SortKey::User => m.key.user_rank(),
                    // Offset so that every time ranks above "never" (0).
                    SortKey::LastSeen => seen.map_or(0, |t| (i128::from(t) - i128::from(i64::MIN) + 1) as u128),
                    SortKey::Version => u128::from(m.version),
                },
                id,
                meta: m,
            })
        })
        .collect();
    let order = |a: &Hit, b: &Hit| {
        // Equal ranks of names may still be different names (longer than the rank holds).
        let o = a.rank.cmp(&b.rank).then_with(|| match lq.sort {
            SortKey::Hostname => cmp_ci(&a.meta.hostname, &b.meta.hostname),
            SortKey::User => {
                a.meta.primary.as_ref().map(|u| u.as_str()).cmp(&b.meta.primary.as_ref().map(|u| u.as_str()))
            }
            SortKey::LastSeen | SortKey::Version => Ordering::Equal,
        });
        let o = if lq.descending { o.reverse() } else { o };
        o.then_with(|| a.id.cmp(b.id))
    };
    let total = hits.len();
    let pages = total.div_ceil(lq.per_page).max(1);
    let page = lq.page.min(pages);
    // Only the page shown is sorted: selecting its rows is linear in the hits, where sorting them
    // all (100,000 host names for the first page) took most of the request. The order is total
    // (ties by id), so the page is the one a full sort would give.
    let start = (page - 1) * lq.per_page;
    let end = (start + lq.per_page).min(total);
    select_page(&mut hits, start, end, order);
    let rows = hits[start..end]
        .iter()
        .map(|h| Row {
            id: h.id.to_string(),
            hostname: h.meta.hostname.clone(),
            primary: h.meta.primary.as_ref().map(|u| u.as_str().to_string()),
            primary_name: h.meta.primary.as_ref().and_then(|u| display_name(world, u)),
            last_seen: h.meta.slot.last_seen(),
            version: h.meta.version,
            active: h.meta.active,
        })
        .collect();
    Listing { rows, total, page, pages }
}

/// The overview's numbers.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Counts {
    pub active: usize,
    pub seen_recently: usize,
    pub stale: usize,
    pub without_primary: usize,
    pub primary_mismatch: usize,
    pub decommissioned: usize,
    /// Per bucket, in [`BitlockerBucket::ALL`]'s order.
    pub bitlocker: [usize; BitlockerBucket::ALL.len()],
    /// Distinct Delivery Optimization groups reported by active devices.
    pub do_groups: usize,
    pub failing: usize,
    pub entra_pending: usize,
    pub entra_failed: usize,
}

/// One pass over the devices: the overview at 100,000 devices costs one scan of memory.
pub fn counts(world: &World, now: i64) -> Counts {
    let mut c = Counts::default();
    let mut groups = HashSet::new();
    for m in world.devices.values() {
        let seen = m.slot.last_seen();
        let admits = |f: Filter| f.admits(m, seen, now) as usize;
        c.active += admits(Filter::Active);
        c.seen_recently += admits(Filter::SeenRecently);
        c.stale += admits(Filter::Stale);
        c.without_primary += admits(Filter::WithoutPrimary);
        c.primary_mismatch += admits(Filter::PrimaryMismatch);
        c.decommissioned += admits(Filter::Decommissioned);
        c.failing += admits(Filter::Failing);
        c.entra_pending += admits(Filter::EntraPending);
        c.entra_failed += admits(Filter::EntraFailed);
        if m.active {
            if let Some(i) = m.health.bitlocker.and_then(|b| BitlockerBucket::ALL.iter().position(|x| *x == b)) {
                c.bitlocker[i] += 1;
            }
            if let Some(g) = &m.health.delivery_optimization {
                groups.insert(g.group_id.as_str());
            }
        }
    }
    c.do_groups = groups.len();
    c
}

/// The overview's BitLocker line: (filter word, label, count) per bucket.
pub fn bitlocker_cards(c: &Counts) -> Vec<(&'static str, &'static str, usize)> {
    BitlockerBucket::ALL.iter().zip(c.bitlocker).map(|(b, n)| (bitlocker_word(*b), b.label(), n)).collect()
}

/// Delivery Optimization groups from memory: group id -> (gateway MAC, gateway IP, devices as
/// (id, host name) sorted by host name). Active devices only, as `tenonctl networks list`.
pub type Networks = std::collections::BTreeMap<String, (Option<String>, Option<String>, Vec<(String, String)>)>;

pub fn networks(world: &World) -> Networks {
    let mut out = Networks::new();
    for (id, m) in world.devices.iter().filter(|(_, m)| m.active) {
        let Some(g) = &m.health.delivery_optimization else { continue };
        let e = out.entry(g.group_id.clone()).or_default();
        // As the API: the gateway is what a member of the group last said.
        e.0 = g.gateway_mac.clone().or(e.0.take());
        e.1 = g.gateway_ip.clone().or(e.1.take());
        e.2.push((id.clone(), m.hostname.clone()));
    }
    for (_, _, devices) in out.values_mut() {
        devices.sort_by(|a, b| cmp_ci(&a.1, &b.1).then_with(|| a.0.cmp(&b.0)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_parse_leniently() {
        let check = |q: &str, expected: (&str, Filter, SortKey, bool, usize, usize)| {
            let pairs: Vec<_> = url::form_urlencoded::parse(q.as_bytes()).collect();
            let lq = ListQuery::from_pairs(pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref())));
            assert_eq!((lq.q.as_str(), lq.filter, lq.sort, lq.descending, lq.page, lq.per_page), expected, "{q}");
        };
        check("", ("", Filter::Active, SortKey::Hostname, false, 1, 50));
        check(
            "q=+PC-1+&sort=last_seen&dir=desc&page=3&per=10",
            ("pc-1", Filter::Active, SortKey::LastSeen, true, 3, 10),
        );
        check(
            "filter=stale&sort=bogus&page=0&per=100000",
            ("", Filter::Stale, SortKey::Hostname, false, 1, MAX_PER_PAGE),
        );
        check("filter=nope&page=x&per=-1", ("", Filter::Active, SortKey::Hostname, false, 1, 50));
        check(
            "filter=bitlocker-action-required",
            ("", Filter::Bitlocker(BitlockerBucket::ActionRequired), SortKey::Hostname, false, 1, 50),
        );
        check("filter=primary-mismatch", ("", Filter::PrimaryMismatch, SortKey::Hostname, false, 1, 50));
    }

    #[test]
    fn select_page_is_the_page_of_a_full_sort() {
        // A scrambled list with many equal keys, ordered by (key, value) like the list's ties by id.
        let v: Vec<(u32, u32)> = (0..1000u32).map(|i| ((i * 7919) % 37, (i * 104_729) % 1000)).collect();
        let mut sorted = v.clone();
        sorted.sort();
        for (start, end) in [(0, 50), (0, 1), (50, 100), (950, 1000), (990, 1000), (999, 1000), (0, 1000), (400, 437)] {
            for desc in [false, true] {
                let cmp = |a: &(u32, u32), b: &(u32, u32)| if desc { b.cmp(a) } else { a.cmp(b) };
                let mut got = v.clone();
                select_page(&mut got, start, end, cmp);
                let want: Vec<_> = if desc { sorted.iter().rev().copied().collect() } else { sorted.clone() };
                assert_eq!(got[start..end], want[start..end], "{start}..{end} desc={desc}");
            }
        }
        let mut empty: Vec<u32> = vec![];
        select_page(&mut empty, 0, 0, u32::cmp);
    }

    #[test]
    fn display_names_match_in_any_case_and_only_within_one_name() {
        use tenon_core::ids::Upn;
        let mut world = World::default();
        for (upn, name) in
            [("anna@contoso.com", "Anna Script"), ("bjoern@contoso.com", "ÄRGER Björn"), ("x@contoso.com", "")]
        {
            std::sync::Arc::make_mut(&mut world.directory).users.insert(
                Upn::parse(upn).unwrap(),
                tenon_core::directory::User { record: serde_json::json!({"displayName": name}), ..Default::default() },
            );
        }
        let names = NameIndex::build(&world);
        let find = |q: &str| {
            let mut v: Vec<String> = names
                .matching(&memchr::memmem::Finder::new(q.as_bytes()))
                .into_iter()
                .map(|u| u.as_str().to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(find("script"), ["anna@contoso.com"]);
        assert_eq!(find("ärger b"), ["bjoern@contoso.com"]);
        assert_eq!(find("n"), ["anna@contoso.com", "bjoern@contoso.com"]);
        assert!(find("scriptär").is_empty(), "no match across two names");
        assert!(find("nobody").is_empty());
        assert!(names.is_for(&world));
        world.dir_gen += 1;
        assert!(!names.is_for(&world), "a directory write makes it stale");
    }
}
