//! End to end for issue 7 (simulated part): Delivery Optimization peer groups from the default
//! gateway, the `networks list` report, opt-out, foreign values and a device moving between sites,
//! with the real server, tenonctl and simulated agents.

mod common;

use common::{KillOnDrop, Server, SimAgent};
use serde_json::{json, Value};

const KEY: &str = r"HKLM\SOFTWARE\Policies\Microsoft\Windows\DeliveryOptimization";

// Site A: 192.168.10.1 with MAC aa:bb:cc:00:11:22 (first MAC byte above 0x7f, a high IP octet).
// Bytes {101,48,6,0,0,0, ip[1]=168,0, ip[2]=10,ip[3]=1, mac}: Data1 = LE(65 30 06 00) = 00063065,
// Data2 = LE(00 00), Data3 = LE(a8 00) = 00a8, then 0a01 and the MAC.
const SITE_A: (&str, &str) = ("192.168.10.1", "aa:bb:cc:00:11:22");
const GROUP_A: &str = "00063065-0000-00a8-0a01-aabbcc001122";
// Site B: 10.20.30.40 with MAC 00-11-22-33-44-55 (written with dashes, as Windows prints it).
const SITE_B: (&str, &str) = ("10.20.30.40", "00-11-22-33-44-55");
const GROUP_B: &str = "00063065-0000-0014-1e28-001122334455";
const FOREIGN: &str = "7d8c1e2a-0000-4000-8000-000000000001";

fn device(hostname: &str, site: (&str, &str)) -> Value {
    json!({"hostname": hostname, "signed_in_users": [],
           "network": {"gateway_ip": site.0, "gateway_mac": site.1}})
}

fn do_key(agent: &SimAgent) -> Value {
    let dev = agent.device();
    dev["registry"][KEY].clone()
}

fn group_of(agent: &SimAgent) -> Option<String> {
    let key = do_key(agent);
    key.get("DOGroupId").map(|v| {
        assert_eq!(v["type"], json!("REG_SZ"), "{v}");
        v["value"].as_str().unwrap().to_string()
    })
}

fn networks(server: &Server) -> Vec<Value> {
    let mut list = server.ctl_json(&["networks", "list"]).as_array().unwrap().clone();
    list.sort_by_key(|g| std::cmp::Reverse(g["device_count"].as_u64()));
    list
}

#[test]
fn devices_behind_one_gateway_share_a_peer_group() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");

    let one = SimAgent::new(tmp.path(), "one", device("PC-1", SITE_A));
    let two = SimAgent::new(tmp.path(), "two", device("PC-2", SITE_A));
    let three = SimAgent::new(tmp.path(), "three", device("PC-3", SITE_B));
    // A fourth device behind site A whose DOGroupId a GPO set; and a value of the key Tenon never owns.
    let mut four_dev = device("PC-4", SITE_A);
    four_dev["registry"] = json!({KEY: {"DOGroupId": {"type": "REG_SZ", "value": FOREIGN}}});
    let four = SimAgent::new(tmp.path(), "four", four_dev);
    let mut d = one.device();
    d["registry"] = json!({KEY: {"DOMaxCacheAge": {"type": "REG_DWORD", "value": 604800}}});
    one.set_device(&d);

    let token = server.enroll_token(4);
    let agents = [&one, &two, &three, &four];
    let ids: Vec<String> = agents.iter().map(|a| a.enroll(&server, &token)).collect();
    for a in agents {
        a.ok(&["sync", "--once"]);
    }

    // One and two share site A's group, three has site B's; download mode 2 beside each.
    assert_eq!(group_of(&one).as_deref(), Some(GROUP_A));
    assert_eq!(group_of(&two).as_deref(), Some(GROUP_A));
    assert_eq!(group_of(&three).as_deref(), Some(GROUP_B));
    for a in [&one, &two, &three] {
        assert_eq!(do_key(a)["DODownloadMode"], json!({"type": "REG_DWORD", "value": 2}));
        assert_eq!(a.status()["policies"]["delivery_optimization"]["state"], json!("applied"));
    }
    assert_eq!(do_key(&one)["DOMaxCacheAge"], json!({"type": "REG_DWORD", "value": 604800}));

    // The foreign group is left alone and reported as managed elsewhere.
    assert_eq!(group_of(&four).as_deref(), Some(FOREIGN));
    assert!(do_key(&four).get("DODownloadMode").is_none());
    let show_four = server.ctl_json(&["devices", "show", &ids[3]]);
    let do_four = &show_four["policies"]["delivery_optimization"];
    assert_eq!(do_four["state"], json!("managed_elsewhere"), "{do_four}");
    assert!(do_four["reason"].as_str().unwrap().contains(FOREIGN));

    // The server reports the fingerprint and group per device ...
    let show_one = server.ctl_json(&["devices", "show", &ids[0]]);
    let do_one = &show_one["policies"]["delivery_optimization"];
    assert_eq!(do_one["group_id"], json!(GROUP_A));
    assert_eq!(do_one["gateway_mac"], json!("aa:bb:cc:00:11:22"));
    assert_eq!(do_one["gateway_ip"], json!("192.168.10.1"));

    // ... and `networks list` each group with its gateway, device count and last seen.
    let groups = networks(&server);
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert_eq!(groups[0]["group_id"], json!(GROUP_A));
    assert_eq!(groups[0]["gateway_mac"], json!("aa:bb:cc:00:11:22"));
    assert_eq!(groups[0]["gateway_ip"], json!("192.168.10.1"));
    assert_eq!(groups[0]["device_count"], json!(2));
    assert_eq!(groups[1]["group_id"], json!(GROUP_B));
    assert_eq!(groups[1]["gateway_mac"], json!("00:11:22:33:44:55"));
    assert_eq!(groups[1]["device_count"], json!(1));
    for g in &groups {
        assert!(g["last_seen"].as_str().is_some_and(|s| s.ends_with('Z')), "{g}");
    }
    let text = server.ctl_ok(&["networks", "list"]);
    assert!(text.contains(GROUP_A) && text.contains("aa:bb:cc:00:11:22"), "{text}");

    // Applying twice changes nothing.
    let before = two.device();
    two.ok(&["sync", "--once"]);
    assert_eq!(two.device(), before);
    assert_eq!(two.status()["policies"]["delivery_optimization"]["state"], json!("compliant"));

    // Three moves to site A: its next sync switches it to A's group.
    let mut d = three.device();
    d["network"] = json!({"gateway_ip": SITE_A.0, "gateway_mac": SITE_A.1});
    three.set_device(&d);
    three.ok(&["sync", "--once"]);
    assert_eq!(group_of(&three).as_deref(), Some(GROUP_A));
    let groups = networks(&server);
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["device_count"], json!(3));

    // Opt-out removes exactly Tenon's values at the next sync.
    server.ctl_ok(&["settings", "set", "--tenant", "Policies.SetNetworkOptimizationID", "false"]);
    for a in agents {
        a.ok(&["sync", "--once"]);
    }
    for a in [&one, &two, &three] {
        let key = do_key(a);
        assert!(key.get("DOGroupId").is_none() && key.get("DODownloadMode").is_none(), "{key}");
        assert_eq!(a.status()["policies"]["delivery_optimization"]["state"], json!("removed"));
    }
    assert_eq!(do_key(&one)["DOMaxCacheAge"], json!({"type": "REG_DWORD", "value": 604800}));
    assert_eq!(group_of(&four).as_deref(), Some(FOREIGN), "the foreign group stays after the opt-out");
    assert!(networks(&server).is_empty());

    // Turning it back on writes the groups again.
    server.ctl_ok(&["settings", "unset", "--tenant", "Policies.SetNetworkOptimizationID"]);
    one.ok(&["sync", "--once"]);
    assert_eq!(group_of(&one).as_deref(), Some(GROUP_A));
    server.stop();
}

#[test]
fn a_running_agent_switches_group_within_seconds_of_a_move() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), "127.0.0.1:0");
    let laptop = SimAgent::new(tmp.path(), "laptop", device("LAPTOP", SITE_A));
    laptop.enroll(&server, &server.enroll_token(1));
    // The service loop with a long interval: only the network watcher can make it sync again soon.
    let mut run =
        KillOnDrop(laptop.command(&["run", "--interval", "10m"]).stderr(std::process::Stdio::null()).spawn().unwrap());
    let wait_for = |group: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while group_of(&laptop).as_deref() != Some(group) {
            assert!(
                std::time::Instant::now() < deadline,
                "no switch to {group} within a minute: {:?}",
                group_of(&laptop)
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    wait_for(GROUP_A);
    // The laptop moves to site B.
    let moved = std::time::Instant::now();
    let mut d = laptop.device();
    d["network"] = json!({"gateway_ip": SITE_B.0, "gateway_mac": SITE_B.1});
    laptop.set_device(&d);
    wait_for(GROUP_B);
    let took = moved.elapsed();
    let _ = run.kill();
    let _ = run.wait();
    assert!(took < std::time::Duration::from_secs(60), "took {took:?}");
    eprintln!("switched group {took:?} after the move");
    server.stop();
}
