//! The Graph directory reader against the Graph-shaped fake on loopback: full and delta rounds
//! over pages, the token's life, throttling, and every failure a read must turn into one error
//! and no batch (wrong secret, missing permissions, an expired delta link, a malformed page, a
//! link off the Graph host).

#[path = "common/graph_fake.rs"]
mod graph_fake;

use graph_fake::{Fault, GraphFake, SecretState, Target};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tenon_core::dirsync::{MemberChange, Members, SourceBatch, SourceErrorKind, SourceUser, SyncProgress};
use tenon_server::directory::graph::{GraphConfig, GraphReader};

fn ignore(_: SyncProgress) {}

fn set(ids: &[String]) -> BTreeSet<String> {
    ids.iter().cloned().collect()
}

struct Full {
    users: Vec<SourceUser>,
    groups: BTreeMap<String, (Option<String>, MemberChange)>,
    cursor: String,
    days: BTreeMap<String, u32>,
}

fn full(batch: SourceBatch) -> Full {
    match batch {
        SourceBatch::Full { users, groups, cursor, password_validity_days } => Full {
            users,
            groups: groups.into_iter().map(|g| (g.external_id, (g.name, g.members))).collect(),
            cursor: cursor.expect("a Graph read has a cursor"),
            days: password_validity_days,
        },
        other => panic!("expected a full batch, got {other:?}"),
    }
}

#[tokio::test]
async fn full_read_follows_pages_and_merges_repeated_groups() {
    let fake = GraphFake::generate(250, 3).await;
    // 3 user pages; groups of ~84 members in chunks of 20 make each group appear 5 times, 2
    // entries a page.
    fake.set_page_sizes(100, 2, 20);
    let seen = Mutex::new(Vec::new());
    let progress = |p: SyncProgress| seen.lock().unwrap().push(p);
    let batch = fake.reader().read(None, &progress).await.unwrap();
    let f = full(batch);

    assert_eq!(f.users.len(), 250);
    let u3 = f.users.iter().find(|u| u.external_id == graph_fake::user_id(3)).unwrap();
    assert_eq!(u3.upn.as_deref(), Some("user3@contoso.example"));
    assert!(!u3.partial);
    assert_eq!(u3.account_enabled, None, "enabled is left out of a whole record");
    assert_eq!(u3.record["department"], json!("Dept 3"));
    assert_eq!(u3.record["businessPhones"], json!(["+1 555 010003"]));
    assert_eq!(u3.record["onPremisesExtensionAttributes"], json!({"extensionAttribute1": "cost-center-3"}));
    assert!(!u3.record.contains_key("mobilePhone"), "null fields are absent from a whole record");
    assert!(!u3.record.contains_key("id") && !u3.record.contains_key("@odata.type"));
    assert!(!u3.record.contains_key("userPrincipalName") && !u3.record.contains_key("accountEnabled"));
    let disabled = f.users.iter().find(|u| u.external_id == graph_fake::user_id(49)).unwrap();
    assert_eq!(disabled.account_enabled, Some(false));
    let no_expiry = f.users.iter().find(|u| u.external_id == graph_fake::user_id(19)).unwrap();
    assert_eq!(no_expiry.record["passwordPolicies"], json!("DisablePasswordExpiration"));

    assert_eq!(f.groups.len(), 3);
    for j in 0..3 {
        let id = graph_fake::group_id(j);
        let (users, groups) = fake.members(&id);
        assert_eq!(f.groups[&id], (Some(format!("Group {j}")), MemberChange::Whole(Members { users, groups })), "{id}");
    }
    let MemberChange::Whole(g0) = &f.groups[&graph_fake::group_id(0)].1 else { unreachable!() };
    assert_eq!(g0.users.len(), 84);
    assert_eq!(g0.groups, set(&[graph_fake::group_id(1)]));

    assert_eq!(
        f.days,
        BTreeMap::from([("contoso.example".to_string(), 90), ("contoso.onmicrosoft.example".to_string(), 2147483647)])
    );

    // Wire format: one token, $select with every field, pages followed to the end.
    assert_eq!(fake.requests(Target::Token), 1);
    assert_eq!(fake.requests(Target::Users), 3);
    assert_eq!(fake.requests(Target::Groups), 8);
    assert_eq!(fake.requests(Target::Domains), 1);
    assert_eq!(fake.requests(Target::Other), 0);
    let first = &fake.queries(Target::Users)[0];
    for field in tenon_server::directory::graph::USER_SELECT {
        assert!(first.contains(field), "$select lacks {field}: {first}");
    }
    assert!(fake.queries(Target::Groups)[0].contains("$select=displayName,members"));

    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 12, "one progress call per page");
    assert!(seen.windows(2).all(|w| w[0].pages < w[1].pages));
    assert_eq!(*seen.last().unwrap(), SyncProgress { pages: 12, users: 250, groups: 3 });
}

#[tokio::test]
async fn delta_read_reports_changes_only() {
    let fake = GraphFake::generate(30, 3).await;
    fake.set_page_sizes(4, 1, 5);
    let reader = fake.reader();
    let f = full(reader.read(None, &ignore).await.unwrap());

    let changed = graph_fake::user_id(5);
    let removed = graph_fake::user_id(7);
    fake.set_user_field(&changed, "department", json!("Research"));
    fake.set_user_field(&changed, "mobilePhone", json!("+1 555 0199"));
    fake.set_user_field(&graph_fake::user_id(6), "accountEnabled", json!(false));
    fake.set_user_field(&graph_fake::user_id(8), "jobTitle", Value::Null);
    fake.remove_user(&removed);
    let added = fake.add_user("newcomer@contoso.example");
    let (g0, g1, g2) = (graph_fake::group_id(0), graph_fake::group_id(1), graph_fake::group_id(2));
    fake.add_member(&g2, &added);
    fake.remove_member(&g1, &graph_fake::user_id(1));
    fake.remove_member(&g0, &g1);
    fake.rename_group(&g1, "Group One");
    fake.remove_group(&g2);
    let g3 = fake.add_group("Fresh");
    fake.add_member(&g3, &graph_fake::user_id(2));

    let batch = reader.read(Some(&f.cursor), &ignore).await.unwrap();
    let SourceBatch::Delta {
        users_changed,
        users_removed,
        groups_changed,
        groups_removed,
        cursor,
        password_validity_days,
    } = batch
    else {
        panic!("expected a delta batch")
    };
    let by_id: BTreeMap<_, _> = users_changed.iter().map(|u| (u.external_id.clone(), u)).collect();
    assert_eq!(by_id.len(), 4, "{users_changed:?}");
    let u5 = by_id[&changed];
    assert!(u5.partial);
    assert_eq!(u5.upn, None, "unchanged");
    assert_eq!(Value::Object(u5.record.clone()), json!({"department": "Research", "mobilePhone": "+1 555 0199"}));
    assert_eq!(by_id[&graph_fake::user_id(6)].account_enabled, Some(false));
    assert_eq!(Value::Object(by_id[&graph_fake::user_id(8)].record.clone()), json!({"jobTitle": null}));
    let newcomer = by_id[&added];
    assert_eq!(newcomer.upn.as_deref(), Some("newcomer@contoso.example"));
    assert_eq!(newcomer.account_enabled, Some(true));
    assert_eq!(users_removed, vec![removed]);

    let groups: BTreeMap<_, _> = groups_changed.into_iter().map(|g| (g.external_id.clone(), g)).collect();
    assert_eq!(groups.keys().cloned().collect::<Vec<_>>(), vec![g0.clone(), g1.clone(), g3.clone()]);
    assert_eq!(groups[&g0].name, None);
    assert_eq!(
        groups[&g0].members,
        MemberChange::Changed {
            added: Members::default(),
            removed: Members { users: BTreeSet::new(), groups: set(std::slice::from_ref(&g1)) }
        }
    );
    assert_eq!(groups[&g1].name.as_deref(), Some("Group One"));
    assert_eq!(
        groups[&g1].members,
        MemberChange::Changed {
            added: Members::default(),
            removed: Members { users: set(&[graph_fake::user_id(1)]), groups: BTreeSet::new() }
        }
    );
    assert_eq!(groups[&g3].name.as_deref(), Some("Fresh"));
    assert_eq!(
        groups[&g3].members,
        MemberChange::Changed {
            added: Members { users: set(&[graph_fake::user_id(2)]), groups: BTreeSet::new() },
            removed: Members::default()
        }
    );
    assert_eq!(groups_removed, vec![g2]);
    assert_eq!(password_validity_days.get("contoso.example"), Some(&90));
    assert_eq!(fake.requests(Target::Token), 1, "the token is cached across reads");

    // Nothing changed since: an empty delta, and the cursor moves on.
    let cursor = cursor.unwrap();
    let again = reader.read(Some(&cursor), &ignore).await.unwrap();
    let SourceBatch::Delta { users_changed, users_removed, groups_changed, groups_removed, .. } = again else {
        panic!("expected a delta batch")
    };
    assert!(
        users_changed.is_empty() && users_removed.is_empty() && groups_changed.is_empty() && groups_removed.is_empty()
    );
}

#[tokio::test]
async fn throttling_is_waited_out_and_retried() {
    let fake = GraphFake::generate(30, 2).await;
    fake.set_page_sizes(10, 10, 10);
    fake.inject(Target::Users, Some(2), 1, Fault::Throttle { retry_after: 1 });
    fake.inject(Target::Domains, None, 1, Fault::Unavailable { retry_after: 0 });
    let started = Instant::now();
    let f = full(fake.reader().read(None, &ignore).await.unwrap());
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After was honoured");
    assert_eq!(f.users.len(), 30);
    assert_eq!(fake.requests(Target::Users), 4, "3 pages and one retry");
    assert_eq!(fake.requests(Target::Domains), 2);
}

#[tokio::test]
async fn throttling_past_the_cap_gives_up() {
    let fake = GraphFake::generate(5, 1).await;
    fake.inject(Target::Groups, None, 1, Fault::Throttle { retry_after: 30 });
    let reader = fake.reader().with_max_retry_wait(Duration::from_secs(2));
    let started = Instant::now();
    let e = reader.read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Throttled, "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "it did not wait 30 s for nothing");

    // Many short waits add up to the cap too.
    fake.inject(Target::Users, None, 10, Fault::Throttle { retry_after: 1 });
    let e = reader.read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Throttled, "{e}");
}

#[tokio::test]
async fn an_expired_delta_link_asks_for_a_full_read() {
    let fake = GraphFake::generate(10, 1).await;
    let reader = fake.reader();
    let f = full(reader.read(None, &ignore).await.unwrap());
    fake.expire_delta_links();
    let e = reader.read(Some(&f.cursor), &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::CursorExpired, "{e}");
    assert!(e.message.contains("410"), "{e}");
    let again = full(reader.read(None, &ignore).await.unwrap());
    assert_eq!(again.users.len(), 10);
    assert!(matches!(reader.read(Some(&again.cursor), &ignore).await.unwrap(), SourceBatch::Delta { .. }));

    // A delta link older than Graph's 7 days: 400 syncStateNotFound, the same outcome.
    let expired = json!({"error": {"code": "syncStateNotFound", "message": "The sync state generation is not found. The delta token is expired and data must be synchronized again."}});
    fake.inject(Target::Groups, Some(1), 1, Fault::Status { status: 400, body: expired.clone() });
    let e = reader.read(Some(&again.cursor), &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::CursorExpired, "{e}");
    // In a full read the same answer is no cursor problem: the caller must not loop on it.
    fake.inject(Target::Groups, Some(1), 1, Fault::Status { status: 400, body: expired });
    let e = reader.read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Other, "{e}");
    assert!(e.message.contains("400") && e.message.contains("syncStateNotFound"), "{e}");
}

#[tokio::test]
async fn a_cursor_it_cannot_use_is_refused_before_any_request() {
    let fake = GraphFake::generate(3, 1).await;
    let reader = fake.reader();
    let foreign = json!({"v": 1, "users": "https://evil.example/v1.0/users/delta?$deltatoken=1", "groups": format!("{}/v1.0/groups/delta?$deltatoken=1", fake.url())}).to_string();
    let other_port =
        json!({"v": 1, "users": "http://127.0.0.1:1/v1.0/users/delta?$deltatoken=1", "groups": "http://127.0.0.1:1/x"})
            .to_string();
    for cursor in ["", "not json", r#"{"v":9,"users":"x","groups":"y"}"#, &foreign, &other_port] {
        let e = reader.read(Some(cursor), &ignore).await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::CursorExpired, "{cursor}: {e}");
    }
    assert_eq!(fake.total_requests(), 0);
}

#[tokio::test]
async fn a_rejected_secret_says_what_to_do_and_never_shows_the_secret() {
    let fake = GraphFake::generate(3, 1).await;
    let wrong = "Wr0ng~secret.not-the-real-one";
    let reader = GraphReader::new(fake.config(), wrong.into()).unwrap();
    let e = reader.read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Credentials);
    assert_eq!(
        e.message,
        "client secret rejected by Entra (AADSTS7000215): create a new secret and run `tenonctl directory add graph ... --client-secret-file FILE --replace`"
    );
    assert_eq!(fake.requests(Target::Users), 0);

    fake.set_secret_state(SecretState::Expired);
    let e = fake.reader().read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Credentials);
    assert!(e.message.contains("AADSTS7000222"), "{e}");
    assert!(!e.message.contains(graph_fake::CLIENT_SECRET) && !e.message.contains(wrong));
}

#[tokio::test]
async fn a_wrong_tenant_or_application_is_named() {
    let fake = GraphFake::generate(3, 1).await;
    let tenant = GraphConfig { tenant_id: "other.example".into(), ..fake.config() };
    let e = GraphReader::new(tenant, graph_fake::CLIENT_SECRET.into()).unwrap().read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Other);
    assert!(e.message.contains("AADSTS90002") && e.message.contains("--tenant-id"), "{e}");
    let app = GraphConfig { client_id: "00000000-0000-0000-0000-00000000dead".into(), ..fake.config() };
    let e = GraphReader::new(app, graph_fake::CLIENT_SECRET.into()).unwrap().read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Credentials);
    assert!(e.message.contains("AADSTS700016") && e.message.contains("--client-id"), "{e}");
}

#[tokio::test]
async fn missing_permissions_name_the_permission_and_consent() {
    let fake = GraphFake::generate(3, 1).await;
    let denied = json!({"error": {"code": "Authorization_RequestDenied", "message": "Insufficient privileges to complete the operation."}});
    fake.inject(Target::Groups, None, 1, Fault::Status { status: 403, body: denied.clone() });
    let e = fake.reader().read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Permissions);
    assert!(e.message.contains("GroupMember.Read.All") && e.message.contains("admin consent"), "{e}");
    assert!(e.message.contains("Authorization_RequestDenied"), "{e}");

    fake.inject(Target::Domains, None, 1, Fault::Status { status: 403, body: denied });
    let e = fake.reader().read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Permissions);
    assert!(e.message.contains("Domain.Read.All"), "{e}");
}

#[tokio::test]
async fn a_malformed_page_fails_the_whole_read() {
    let fake = GraphFake::generate(25, 1).await;
    fake.set_page_sizes(10, 10, 10);
    fake.inject(Target::Users, Some(2), 1, Fault::Malformed);
    let e = fake.reader().read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Malformed);
    assert!(e.message.contains("users page 2"), "{e}");
    assert_eq!(fake.requests(Target::Users), 2, "page 3 was never asked for");
    assert_eq!(fake.requests(Target::Groups), 0);

    // Valid JSON of the wrong shape, and a page that neither continues nor ends, fail the same way.
    for body in [r#"{"value": [{"id": "u", "accountEnabled": "yes"}], "@odata.deltaLink": "x"}"#, r#"{"value": []}"#] {
        fake.inject(Target::Users, Some(1), 1, Fault::Raw { body: body.into() });
        let e = fake.reader().read(None, &ignore).await.unwrap_err();
        assert_eq!(e.kind, SourceErrorKind::Malformed, "{body}: {e}");
    }
}

#[tokio::test]
async fn a_next_link_off_the_graph_host_is_not_followed() {
    let fake = GraphFake::generate(5, 1).await;
    fake.inject(Target::Users, Some(1), 1, Fault::ForeignNextLink);
    let e = fake.reader().read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Malformed);
    assert!(e.message.contains("evil.example"), "{e}");
    assert_eq!(fake.requests(Target::Users), 1);
}

#[tokio::test]
async fn a_revoked_token_is_renewed_once() {
    let fake = GraphFake::generate(5, 1).await;
    let reader = fake.reader();
    reader.read(None, &ignore).await.unwrap();
    fake.revoke_tokens();
    reader.read(None, &ignore).await.unwrap();
    assert_eq!(fake.requests(Target::Token), 2);

    // A Graph that refuses every token: one renewal, then Credentials.
    let refused =
        json!({"error": {"code": "InvalidAuthenticationToken", "message": "Access token validation failure."}});
    fake.inject(Target::Users, None, 2, Fault::Status { status: 401, body: refused });
    let e = reader.read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Credentials, "{e}");
    assert_eq!(fake.requests(Target::Token), 3);
}

#[tokio::test]
async fn a_short_lived_token_is_not_kept() {
    // Tokens living less than the 5-minute margin are used once and never cached.
    let fake = GraphFake::generate(5, 1).await;
    fake.set_token_lifetime(120);
    fake.reader().read(None, &ignore).await.unwrap();
    let graph = fake.requests(Target::Users) + fake.requests(Target::Groups) + fake.requests(Target::Domains);
    assert_eq!(fake.requests(Target::Token), graph);
}

#[tokio::test]
async fn an_unreachable_graph_is_named() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let config = GraphConfig {
        tenant_id: graph_fake::TENANT_ID.into(),
        client_id: graph_fake::CLIENT_ID.into(),
        authority: url.clone(),
        graph_url: url,
    };
    let e = GraphReader::new(config, "secret".into()).unwrap().read(None, &ignore).await.unwrap_err();
    assert_eq!(e.kind, SourceErrorKind::Unreachable);
    assert!(e.message.contains(&format!("127.0.0.1:{port}")), "{e}");
}
