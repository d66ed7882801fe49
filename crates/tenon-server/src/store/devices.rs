//! The devices' rows as the server keeps them in memory: credential hash, envelope, primary
//! user, who signs in. Read at start for every device, and for the devices another server
//! changed.

use super::Conn;
use anyhow::Context;
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tenon_core::ids::Upn;

/// One device as loaded.
pub struct DeviceRow {
    pub id: String,
    /// As enrolled, then as the last report said (kept in memory for the portal's device list).
    pub hostname: String,
    pub credential_sha256: [u8; 32],
    pub active: bool,
    pub primary: Option<Upn>,
    pub version: u64,
    pub sha256: String,
    pub envelope: String,
    pub expires_at: i64,
    pub enrolled_at: i64,
    pub has_reported: bool,
    pub signed_in: BTreeSet<Upn>,
    /// Everyone seen signing in on it (`device_users`).
    pub users: BTreeSet<Upn>,
    /// Install requests by package name (`devices.package_requests`).
    pub package_requests: BTreeMap<String, u64>,
    /// From the last report's policies and error (`devices.policies`, `devices.last_error`).
    pub health: crate::device_health::DeviceHealth,
    /// The user seen most often (`device_users.sightings`, ties to the smallest name), with their
    /// count: the portal's primary-user mismatch, as `tenonctl devices list --primary-mismatch`.
    pub top_user: Option<(i64, Upn)>,
}

/// Everyone seen on a device, and who most often.
type SeenUsers = (BTreeSet<Upn>, Option<(i64, Upn)>);

/// Keeps the user with the most sightings (ties: the smallest name, as the API orders them).
pub fn note_sightings(top: &mut Option<(i64, Upn)>, upn: &Upn, sightings: i64) {
    let replace = match top {
        None => true,
        Some((n, u)) => u == upn || sightings > *n || (sightings == *n && upn.as_str() < u.as_str()),
    };
    if replace {
        *top = Some((sightings, upn.clone()));
    }
}

const COLUMNS: &str =
    "SELECT id, credential_sha256, status, primary_user, e.config_version, e.config_sha256, e.envelope,
            e.envelope_expires_at, enrolled_at, last_report_at, signed_in_users, package_requests, hostname,
            policies, last_error
     FROM devices JOIN device_envelopes e ON e.device_id = devices.id";

/// Ids per `IN (...)` list.
const IDS_PER_QUERY: usize = 500;

/// Every device (`ids` = None) or the given ones.
pub async fn load(conn: &mut Conn, ids: Option<&[String]>) -> anyhow::Result<Vec<DeviceRow>> {
    let mut out = Vec::new();
    let mut users: HashMap<String, SeenUsers> = HashMap::new();
    let mut add_user = |row: &sqlx::any::AnyRow| {
        if let Ok(u) = Upn::parse(row.get::<&str, _>(1)) {
            let e = users.entry(row.get(0)).or_default();
            note_sightings(&mut e.1, &u, row.get(2));
            e.0.insert(u);
        }
    };
    match ids {
        None => {
            for row in sqlx::query(COLUMNS).fetch_all(&mut *conn).await? {
                out.push(device_row(&row)?);
            }
            for row in sqlx::query("SELECT device_id, upn, sightings FROM device_users").fetch_all(&mut *conn).await? {
                add_user(&row);
            }
        }
        Some(ids) => {
            for part in ids.chunks(IDS_PER_QUERY) {
                let list = placeholders(part.len());
                let sql = format!("{COLUMNS} WHERE devices.id IN ({list})");
                let mut q = sqlx::query(&sql);
                for id in part {
                    q = q.bind(id);
                }
                for row in q.fetch_all(&mut *conn).await? {
                    out.push(device_row(&row)?);
                }
                let sql = format!("SELECT device_id, upn, sightings FROM device_users WHERE device_id IN ({list})");
                let mut q = sqlx::query(&sql);
                for id in part {
                    q = q.bind(id);
                }
                for row in q.fetch_all(&mut *conn).await? {
                    add_user(&row);
                }
            }
        }
    }
    for d in &mut out {
        if let Some((u, top)) = users.remove(&d.id) {
            d.users = u;
            d.top_user = top;
        }
    }
    Ok(out)
}

/// `$1, $2, ..., $n`.
pub fn placeholders(n: usize) -> String {
    (1..=n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

fn device_row(row: &sqlx::any::AnyRow) -> anyhow::Result<DeviceRow> {
    let id: String = row.get(0);
    let credential_sha256: [u8; 32] = hex::decode(row.get::<&str, _>(1))
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("the stored credential hash of device {id} is damaged"))?;
    let signed_in = row
        .get::<Option<&str>, _>(10)
        .and_then(|s| serde_json::from_str::<Vec<String>>(s).ok())
        .unwrap_or_default()
        .iter()
        .filter_map(|u| Upn::parse(u).ok())
        .collect();
    Ok(DeviceRow {
        credential_sha256,
        active: row.get::<&str, _>(2) == "active",
        primary: row.get::<Option<&str>, _>(3).map(Upn::parse).transpose()?,
        version: row.get::<i64, _>(4) as u64,
        sha256: row.get(5),
        envelope: row.get(6),
        expires_at: row.get(7),
        enrolled_at: row.get(8),
        has_reported: row.get::<Option<i64>, _>(9).is_some(),
        signed_in,
        users: BTreeSet::new(),
        package_requests: row.get::<Option<&str>, _>(11).and_then(|s| serde_json::from_str(s).ok()).unwrap_or_default(),
        hostname: row.get(12),
        health: crate::device_health::DeviceHealth::from_stored(row.get(13), row.get(14)),
        top_user: None,
        id,
    })
}

/// Last-seen times, so that the index (and the metrics' last-seen buckets) know them at once.
pub async fn last_seen(conn: &mut Conn) -> sqlx::Result<Vec<(String, i64)>> {
    Ok(sqlx::query("SELECT device_id, last_seen FROM device_last_seen")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_seen_most_wins_ties_to_the_smallest_name() {
        let u = |s: &str| Upn::parse(s).unwrap();
        let mut top = None;
        for (upn, n, expected) in [
            ("ben@x.com", 1, "ben@x.com"),
            ("anna@x.com", 1, "anna@x.com"),
            ("ben@x.com", 2, "ben@x.com"),
            ("anna@x.com", 2, "anna@x.com"),
            ("cleo@x.com", 1, "anna@x.com"),
            ("anna@x.com", 3, "anna@x.com"),
        ] {
            note_sightings(&mut top, &u(upn), n);
            assert_eq!(top.as_ref().map(|(_, t)| t.as_str()), Some(expected), "after {upn} {n}");
        }
    }
}
