//! The directory's rows: settings, groups, users, memberships, signature templates, packages and
//! their assignments, read
//! into one `tenon_core::directory::Directory` (at start, and when another server changed it).

use super::Conn;
use anyhow::Context;
use sqlx::Row;
use tenon_core::directory::Directory;
use tenon_core::ids::{GroupName, SettingKey, Upn};
use tenon_core::packages::{Assignment, DetectRule, Intent, Kind, Package, Target, Users};
use tenon_core::policy::signatures::{DefaultUse, SignatureTemplate};
use tenon_core::settings::SettingValue;

pub async fn load(conn: &mut Conn) -> anyhow::Result<Directory> {
    let mut directory = Directory::default();
    for row in sqlx::query("SELECT scope_kind, scope_name, key, value FROM settings").fetch_all(&mut *conn).await? {
        let (kind, name, key, value): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let key = SettingKey::parse(&key).context("stored setting key")?;
        let value = if value == "undefined" {
            SettingValue::Undefined
        } else {
            SettingValue::Set(serde_json::from_str(&value).context("stored setting value")?)
        };
        match kind.as_str() {
            "tenant" => {
                directory.tenant.insert(key, value);
            }
            "group" => {
                let g = GroupName::parse(&name)?;
                directory.groups.entry(g).or_default().settings.insert(key, value);
            }
            _ => {
                let u = Upn::parse(&name)?;
                directory.users.entry(u).or_default().settings.insert(key, value);
            }
        }
    }
    for row in sqlx::query("SELECT name, priority FROM groups").fetch_all(&mut *conn).await? {
        let g = GroupName::parse(row.get::<&str, _>(0))?;
        directory.groups.entry(g).or_default().priority = row.get(1);
    }
    for row in sqlx::query("SELECT upn, id, record, source FROM users").fetch_all(&mut *conn).await? {
        let u = Upn::parse(row.get::<&str, _>(0))?;
        let entry = directory.users.entry(u).or_default();
        entry.id = row.get(1);
        entry.record = serde_json::from_str(row.get::<&str, _>(2)).context("stored user record")?;
        entry.source = row.get(3);
    }
    for row in sqlx::query("SELECT upn, group_name FROM user_groups").fetch_all(&mut *conn).await? {
        let u = Upn::parse(row.get::<&str, _>(0))?;
        let g = GroupName::parse(row.get::<&str, _>(1))?;
        directory.users.entry(u).or_default().groups.insert(g);
    }
    for row in sqlx::query("SELECT name, html, txt, default_use, groups, images FROM signatures ORDER BY name")
        .fetch_all(&mut *conn)
        .await?
    {
        let name: String = row.get(0);
        let default = row
            .get::<Option<&str>, _>(3)
            .map(str::parse::<DefaultUse>)
            .transpose()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("stored default use of signature {name:?}"))?;
        directory.signatures.push(SignatureTemplate {
            html: row.get(1),
            txt: row.get(2),
            default,
            groups: serde_json::from_str(row.get::<&str, _>(4))
                .with_context(|| format!("stored groups of signature {name:?}"))?,
            images: serde_json::from_str(row.get::<&str, _>(5))
                .with_context(|| format!("stored images of signature {name:?}"))?,
            name,
        });
    }
    for row in sqlx::query(
        "SELECT name, version, kind, sha256, size, file_name, install_args, uninstall_args, detect, depends_on,
                sort_order, timeout_secs, self_update FROM packages",
    )
    .fetch_all(&mut *conn)
    .await?
    {
        let name: String = row.get(0);
        let what = || format!("stored package {name:?}");
        let p = Package {
            version: row.get(1),
            kind: Kind::parse(row.get::<&str, _>(2)).with_context(what)?,
            sha256: row.get(3),
            size: row.get::<i64, _>(4) as u64,
            file_name: row.get(5),
            install_args: row.get(6),
            uninstall_args: row.get(7),
            detect: DetectRule::parse(row.get::<&str, _>(8)).with_context(what)?,
            depends_on: serde_json::from_str(row.get::<&str, _>(9)).with_context(what)?,
            order: row.get(10),
            timeout_secs: row.get::<i64, _>(11) as u64,
            self_update: row.get::<i64, _>(12) != 0,
            name: name.clone(),
        };
        directory.packages.insert(name, p);
    }
    for row in sqlx::query(
        "SELECT package, target_kind, target_name, intent, users FROM package_assignments ORDER BY package, target_kind, target_name",
    )
    .fetch_all(&mut *conn)
    .await?
    {
        let package: String = row.get(0);
        let name: String = row.get(2);
        let target = match row.get::<&str, _>(1) {
            "tenant" => Target::Tenant,
            "group" => Target::Group(name),
            "user" => Target::User(name),
            other => anyhow::bail!("stored assignment of package {package:?}: unknown target kind {other:?}"),
        };
        directory.package_assignments.push(Assignment {
            intent: Intent::parse(row.get::<&str, _>(3)).with_context(|| format!("stored assignment of {package:?}"))?,
            users: Users::parse(row.get::<&str, _>(4)).with_context(|| format!("stored assignment of {package:?}"))?,
            package,
            target,
        });
    }
    Ok(directory)
}

/// Replaces a user's group memberships. `is_new` says which groups may have no row yet (they are
/// created); a group the caller knows is stored is not written again.
pub async fn write_memberships<'g>(
    conn: &mut Conn,
    upn: &str,
    groups: impl IntoIterator<Item = &'g GroupName>,
    mut is_new: impl FnMut(&GroupName) -> bool,
) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM user_groups WHERE upn = $1").bind(upn).execute(&mut *conn).await?;
    for g in groups {
        if is_new(g) {
            sqlx::query("INSERT INTO groups (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
                .bind(g.as_str())
                .execute(&mut *conn)
                .await?;
        }
        sqlx::query("INSERT INTO user_groups (upn, group_name) VALUES ($1, $2)")
            .bind(upn)
            .bind(g.as_str())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}
