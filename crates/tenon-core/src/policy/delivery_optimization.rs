//! Delivery Optimization peer groups (DESIGN.md section 3): the group ID derived from the default
//! gateway, and the pure plan of which values Tenon sets or removes under the DO policy key.
//!
//! Windows groups DO peers by AD site, domain or Entra tenant when no group is configured, which on a
//! WAN with one internet breakout makes one huge group. Tenon instead gives every device behind the
//! same default gateway the same `DOGroupId` and sets `DODownloadMode` 2 (group peering).
//!
//! Ownership, which [`plan`] follows in this order:
//! - Tenon owns a value only while the registry still holds exactly what Tenon wrote (the policy's
//!   persisted [`DoWritten`]); it overwrites or deletes only values it owns.
//! - Policy off: delete the owned values, nothing else.
//! - No gateway: no random fallback; delete the owned values, because a group ID from the previous
//!   network would join another site's group, and mode 2 without a group ID falls back to the
//!   site/domain/tenant grouping this policy exists to avoid.
//! - `DOGroupIdSource` present (a GPO or MDM chose a grouping source), or a `DOGroupId` Tenon did not
//!   write: managed elsewhere. Tenon writes nothing and withdraws only its own `DOGroupId` (Windows
//!   reads `DOGroupId` before `DOGroupIdSource`, so one left beside a source would override it).
//! - `DODownloadMode` set by someone else: left as is. A GPO that chose 0 (HTTP only), 1 (LAN), 3
//!   (internet), 99 or 100 decided how this device peers and Tenon does not overrule it; Tenon still
//!   sets its `DOGroupId`, which is inert outside modes 2 and 3 and takes effect if that mode becomes 2
//!   or 3. The status says so in its reason.

use crate::api::PolicyStatus;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::net::Ipv4Addr;

/// The policy key, read and written in the 64-bit registry view.
pub const KEY: &str = r"HKLM\SOFTWARE\Policies\Microsoft\Windows\DeliveryOptimization";
pub const GROUP_ID: &str = "DOGroupId";
pub const GROUP_ID_SOURCE: &str = "DOGroupIdSource";
pub const DOWNLOAD_MODE: &str = "DODownloadMode";
/// "HTTP blended with peering across a private group": the mode in which `DOGroupId` is used.
pub const GROUP_MODE: u32 = 2;
/// The config key that turns the policy on (absent or true) or off (false).
pub const SETTING: &str = "Policies.SetNetworkOptimizationID";

/// The DO group ID of the devices behind one default gateway.
///
/// The byte layout is the one a public reimplementation of RealmJoin's scheme uses, so that devices
/// migrating from RealmJoin can land in the same groups; that compatibility is not yet confirmed on a
/// RealmJoin device, so the whole derivation stays in this one function. Note that the first octet of
/// the gateway address is not part of it.
///
/// Format: the policy only says "Group ID must be set as a GUID" (a `chr` string in the Policy CSP).
/// We write what .NET's `Guid.ToString()` gives, lower-case `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`
/// without braces, since that is what a .NET tool such as RealmJoin writes, so the strings compare
/// equal on a migrated device.
pub fn group_id(gateway_ip: Ipv4Addr, mac: [u8; 6]) -> String {
    let ip = gateway_ip.octets();
    let b = [101, 48, 6, 0, 0, 0, ip[1], 0, ip[2], ip[3], mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]];
    // .NET `new Guid(byte[])`: the first three fields (4, 2 and 2 bytes) are little-endian, the last
    // 8 bytes are taken in order.
    let d1 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let d2 = u16::from_le_bytes([b[4], b[5]]);
    let d3 = u16::from_le_bytes([b[6], b[7]]);
    let tail: String = b[10..].iter().map(|x| format!("{x:02x}")).collect();
    format!("{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-{tail}", b[8], b[9])
}

/// Whether the policy is on. Absent (or null) means on; only an explicit false turns it off. The
/// string "false" and 0 count as false too, since values typed into a CLI often arrive that way.
pub fn enabled(setting: Option<&Value>) -> bool {
    match setting {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => !s.trim().eq_ignore_ascii_case("false"),
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        _ => true,
    }
}

/// The default gateway that identifies the device's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

/// `aa:bb:cc:00:11:22`, as reported.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A registry value as the plan sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegData {
    Sz(String),
    Dword(u32),
    MultiSz(Vec<String>),
}

impl fmt::Display for RegData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegData::Sz(s) => write!(f, "{s:?}"),
            RegData::Dword(n) => write!(f, "{n}"),
            RegData::MultiSz(v) => write!(f, "{v:?}"),
        }
    }
}

/// The values under [`KEY`] that the plan looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DoRegistry {
    pub group_id: Option<RegData>,
    pub group_id_source: Option<RegData>,
    pub download_mode: Option<RegData>,
}

/// The values Tenon wrote and still owns: the policy's persisted state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoWritten {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_mode: Option<u32>,
}

impl DoWritten {
    /// Records that `action` was carried out.
    fn record(&mut self, action: &DoAction) {
        match action {
            DoAction::Set(GROUP_ID, RegData::Sz(s)) => self.group_id = Some(s.clone()),
            DoAction::Set(DOWNLOAD_MODE, RegData::Dword(n)) => self.download_mode = Some(*n),
            DoAction::Delete(GROUP_ID) => self.group_id = None,
            DoAction::Delete(DOWNLOAD_MODE) => self.download_mode = None,
            _ => {}
        }
    }
}

/// Everything the plan decides from.
#[derive(Clone, Debug)]
pub struct DoInput {
    /// [`enabled`] of the [`SETTING`].
    pub enabled: bool,
    /// `None` when there is no IPv4 default gateway or its MAC is unknown.
    pub gateway: Option<Gateway>,
    pub current: DoRegistry,
    /// What Tenon wrote before, from the persisted state.
    pub written: DoWritten,
}

/// A change to a value under [`KEY`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DoAction {
    Set(&'static str, RegData),
    Delete(&'static str),
}

impl fmt::Display for DoAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DoAction::Set(name, value) => write!(f, "set {name}={value}"),
            DoAction::Delete(name) => write!(f, "delete {name}"),
        }
    }
}

/// What to do, and the status to report once it is done.
#[derive(Clone, Debug, PartialEq)]
pub struct DoPlan {
    /// In order; the agent stops at the first that fails.
    pub actions: Vec<DoAction>,
    /// State `applied`, `compliant`, `managed_elsewhere`, `no_gateway`, `disabled` or `removed`, with
    /// `gateway_ip`, `gateway_mac` (when a gateway is known) and `group_id` (when Tenon's is in place).
    pub status: PolicyStatus,
    /// What Tenon owns before any action runs.
    owned: DoWritten,
}

impl DoPlan {
    /// What Tenon owns after the first `done` actions succeeded: the state to persist.
    pub fn written_after(&self, done: usize) -> DoWritten {
        let mut w = self.owned.clone();
        self.actions.iter().take(done).for_each(|a| w.record(a));
        w
    }

    /// What Tenon owns once every action succeeded.
    pub fn written(&self) -> DoWritten {
        self.written_after(self.actions.len())
    }
}

/// Decides what to change under [`KEY`] (see the module documentation for the rules).
pub fn plan(input: &DoInput) -> DoPlan {
    let cur = &input.current;
    let gid = input.gateway.map(|g| group_id(g.ip, g.mac));
    let mut owned = DoWritten {
        group_id: input.written.group_id.clone().filter(|w| cur.group_id == Some(RegData::Sz(w.clone()))),
        download_mode: input.written.download_mode.filter(|w| cur.download_mode == Some(RegData::Dword(*w))),
    };
    // The state lives in the agent's vault, which is discarded when it fails to verify (DESIGN.md
    // section 2). A DOGroupId equal to the one Tenon derives for this very gateway is Tenon's (or a
    // RealmJoin one with the same scheme), and so is a mode 2 beside it: recognise them as Tenon's
    // rather than reporting the device as managed elsewhere forever.
    if owned.group_id.is_none() && gid.is_some() && cur.group_id == gid.clone().map(RegData::Sz) {
        owned.group_id = gid.clone();
        if cur.download_mode == Some(RegData::Dword(GROUP_MODE)) {
            owned.download_mode = Some(GROUP_MODE);
        }
    }

    let mut actions = Vec::new();
    let (state, reason) = decide(input, &owned, &mut actions);
    let mut status = PolicyStatus::new(state);
    if !reason.is_empty() {
        status = status.with_reason(reason);
    }
    if let Some(gw) = input.gateway {
        status = status.with("gateway_ip", gw.ip.to_string()).with("gateway_mac", format_mac(gw.mac));
    }
    if let (Some(gid), "applied" | "compliant") = (gid, state) {
        status = status.with("group_id", gid);
    }
    DoPlan { actions, status, owned }
}

/// Pushes the actions and returns the state and the reason (empty when there is nothing to say).
fn decide(input: &DoInput, owned: &DoWritten, actions: &mut Vec<DoAction>) -> (&'static str, String) {
    let cur = &input.current;
    let delete_owned = |actions: &mut Vec<DoAction>, mode_too: bool| {
        if owned.group_id.is_some() {
            actions.push(DoAction::Delete(GROUP_ID));
        }
        if mode_too && owned.download_mode.is_some() {
            actions.push(DoAction::Delete(DOWNLOAD_MODE));
        }
    };

    if !input.enabled {
        delete_owned(actions, true);
        if actions.is_empty() {
            return ("disabled", format!("{SETTING} is false"));
        }
        return ("removed", format!("{SETTING} is false; removed the values Tenon had written"));
    }
    let Some(gw) = input.gateway else {
        delete_owned(actions, true);
        let removed =
            if actions.is_empty() { "" } else { "; removed the values Tenon had set for the previous network" };
        return ("no_gateway", format!("no IPv4 default gateway with a known MAC address, so no group ID{removed}"));
    };
    if let Some(source) = &cur.group_id_source {
        delete_owned(actions, false);
        let removed = if actions.is_empty() { "" } else { "; removed the one Tenon had set" };
        return (
            "managed_elsewhere",
            format!("{GROUP_ID_SOURCE} is set to {source} (by GPO or MDM), so Tenon does not set {GROUP_ID}{removed}"),
        );
    }
    if let (Some(foreign), None) = (&cur.group_id, &owned.group_id) {
        return (
            "managed_elsewhere",
            format!("{GROUP_ID} is {foreign}, not written by Tenon (GPO, MDM or another tool); left as is"),
        );
    }

    let gid = group_id(gw.ip, gw.mac);
    let mut notes = Vec::new();
    if cur.group_id != Some(RegData::Sz(gid.clone())) {
        if cur.group_id.is_some() {
            notes.push("the default gateway changed; replaced the group ID Tenon had set".to_string());
        }
        actions.push(DoAction::Set(GROUP_ID, RegData::Sz(gid)));
    }
    match &cur.download_mode {
        Some(RegData::Dword(GROUP_MODE)) => {}
        Some(other) if owned.download_mode.is_none() => notes.push(format!(
            "{DOWNLOAD_MODE} is {other}, set outside Tenon (GPO or MDM); left as is, so the group ID takes effect \
             only in modes 2 and 3"
        )),
        _ => actions.push(DoAction::Set(DOWNLOAD_MODE, RegData::Dword(GROUP_MODE))),
    }
    (if actions.is_empty() { "compliant" } else { "applied" }, notes.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_id_vectors() {
        // 10.20.30.40, 00:11:22:33:44:55. Bytes: 65 30 06 00 | 00 00 | 14 00 | 1e 28 | 00 11 22 33 44 55
        // (101=0x65, 48=0x30, ip[1]=20=0x14, ip[2]=30=0x1e, ip[3]=40=0x28). Data1 = LE(65 30 06 00) =
        // 0x00063065; Data2 = LE(00 00) = 0x0000; Data3 = LE(14 00) = 0x0014; then 1e28 and the MAC.
        assert_eq!(group_id(Ipv4Addr::new(10, 20, 30, 40), [0, 0x11, 0x22, 0x33, 0x44, 0x55]), GB);
        // High octet: 192.168.10.1 (ip[1]=168=0xa8, ip[2]=0x0a, ip[3]=0x01); MAC first byte 0xaa > 0x7f.
        // Bytes: 65 30 06 00 | 00 00 | a8 00 | 0a 01 | aa bb cc 00 11 22; Data3 = LE(a8 00) = 0x00a8.
        assert_eq!(group_id(Ipv4Addr::new(192, 168, 10, 1), [0xaa, 0xbb, 0xcc, 0, 0x11, 0x22]), GA);
        // All-high: 172.255.200.254 (ip[1]=0xff, ip[2]=0xc8, ip[3]=0xfe), MAC f0:9f:c2:7a:00:01.
        // Bytes: 65 30 06 00 | 00 00 | ff 00 | c8 fe | f0 9f c2 7a 00 01; Data3 = LE(ff 00) = 0x00ff.
        assert_eq!(
            group_id(Ipv4Addr::new(172, 255, 200, 254), [0xf0, 0x9f, 0xc2, 0x7a, 0, 1]),
            "00063065-0000-00ff-c8fe-f09fc27a0001"
        );
        // The first octet is not part of the layout; the MAC is.
        assert_eq!(group_id(Ipv4Addr::new(11, 20, 30, 40), [0, 0x11, 0x22, 0x33, 0x44, 0x55]), GB);
        assert_ne!(group_id(Ipv4Addr::new(10, 20, 30, 40), [0, 0x11, 0x22, 0x33, 0x44, 0x56]), GB);
    }

    #[test]
    fn setting_values() {
        let check = |v: Option<Value>, on: bool| assert_eq!(enabled(v.as_ref()), on, "{v:?}");
        check(None, true);
        check(Some(Value::Null), true);
        check(Some(Value::Bool(true)), true);
        check(Some(Value::Bool(false)), false);
        check(Some(Value::String("False".into())), false);
        check(Some(Value::String("true".into())), true);
        check(Some(serde_json::json!(0)), false);
        check(Some(serde_json::json!(1)), true);
    }

    const GA: &str = "00063065-0000-00a8-0a01-aabbcc001122";
    const GB: &str = "00063065-0000-0014-1e28-001122334455";
    const FOREIGN: &str = "7d8c1e2a-0000-4000-8000-000000000001";
    const A: Option<Gateway> =
        Some(Gateway { ip: Ipv4Addr::new(192, 168, 10, 1), mac: [0xaa, 0xbb, 0xcc, 0, 0x11, 0x22] });
    const NO_GW: Option<Gateway> = None;
    const ON: bool = true;
    const OFF: bool = false;

    fn sz(s: &str) -> Option<RegData> {
        Some(RegData::Sz(s.into()))
    }
    fn dw(n: u32) -> Option<RegData> {
        Some(RegData::Dword(n))
    }
    /// The registry: DOGroupId, DOGroupIdSource, DODownloadMode.
    fn r(gid: Option<RegData>, source: Option<RegData>, mode: Option<RegData>) -> DoRegistry {
        DoRegistry { group_id: gid, group_id_source: source, download_mode: mode }
    }
    /// What Tenon wrote: DOGroupId, DODownloadMode.
    fn w(gid: Option<&str>, mode: Option<u32>) -> DoWritten {
        DoWritten { group_id: gid.map(str::to_string), download_mode: mode }
    }
    fn put_gid(s: &str) -> DoAction {
        DoAction::Set(GROUP_ID, RegData::Sz(s.into()))
    }
    fn put_mode() -> DoAction {
        DoAction::Set(DOWNLOAD_MODE, RegData::Dword(2))
    }
    const DEL_GID: DoAction = DoAction::Delete(GROUP_ID);
    const DEL_MODE: DoAction = DoAction::Delete(DOWNLOAD_MODE);
    const BOTH_GONE: [DoAction; 2] = [DEL_GID, DEL_MODE];
    const ELSEWHERE: &str = "managed_elsewhere";

    fn execute(reg: &mut DoRegistry, actions: &[DoAction]) {
        for a in actions {
            let (name, value) = match a {
                DoAction::Set(n, v) => (*n, Some(v.clone())),
                DoAction::Delete(n) => (*n, None),
            };
            match name {
                GROUP_ID => reg.group_id = value,
                DOWNLOAD_MODE => reg.download_mode = value,
                other => panic!("the plan must never touch {other}"),
            }
        }
    }

    /// One case: input => state, actions, what Tenon owns afterwards. Every case also checks that
    /// Tenon never leaves its DOGroupId beside a DOGroupIdSource and that a second run changes nothing.
    #[allow(clippy::too_many_arguments)]
    fn check(
        enabled: bool,
        gateway: Option<Gateway>,
        current: DoRegistry,
        written: DoWritten,
        state: &str,
        actions: &[DoAction],
        owns: DoWritten,
    ) {
        let input = DoInput { enabled, gateway, current, written };
        let p = plan(&input);
        assert_eq!((p.status.state.as_str(), p.actions.as_slice()), (state, actions), "{input:?}");
        assert_eq!(p.written(), owns, "{input:?}");

        let mut after = input.current.clone();
        execute(&mut after, &p.actions);
        assert!(after.group_id_source.is_none() || p.written().group_id.is_none(), "{input:?}");
        let again = plan(&DoInput { current: after, written: p.written(), ..input.clone() });
        assert_eq!(again.actions, [], "second run of {input:?}");
        assert_eq!(again.written(), p.written(), "second run of {input:?}");
    }

    #[test]
    fn plan_rules() {
        // Fresh device; apply again; the gateway changed; someone deleted Tenon's DOGroupId.
        check(ON, A, r(None, None, None), w(None, None), "applied", &[put_gid(GA), put_mode()], w(Some(GA), Some(2)));
        check(ON, A, r(sz(GA), None, dw(2)), w(Some(GA), Some(2)), "compliant", &[], w(Some(GA), Some(2)));
        check(ON, A, r(sz(GB), None, dw(2)), w(Some(GB), Some(2)), "applied", &[put_gid(GA)], w(Some(GA), Some(2)));
        check(ON, A, r(None, None, dw(2)), w(Some(GA), Some(2)), "applied", &[put_gid(GA)], w(Some(GA), Some(2)));
        // Lost state: Tenon's own derived value (and the mode 2 beside it) is recognised.
        check(ON, A, r(sz(GA), None, dw(2)), w(None, None), "compliant", &[], w(Some(GA), Some(2)));
        check(ON, A, r(sz(GA), None, None), w(None, None), "applied", &[put_mode()], w(Some(GA), Some(2)));
        // DODownloadMode from someone else: 2 is fine and stays theirs; 0 or 3 are left as they are.
        check(ON, A, r(None, None, dw(2)), w(None, None), "applied", &[put_gid(GA)], w(Some(GA), None));
        check(ON, A, r(sz(GA), None, dw(2)), w(Some(GA), None), "compliant", &[], w(Some(GA), None));
        check(ON, A, r(None, None, dw(0)), w(None, None), "applied", &[put_gid(GA)], w(Some(GA), None));
        check(ON, A, r(sz(GA), None, dw(3)), w(Some(GA), Some(2)), "compliant", &[], w(Some(GA), None));
        // Foreign DOGroupId (also one that replaced Tenon's, or of another type): left alone.
        check(ON, A, r(sz(FOREIGN), None, None), w(None, None), ELSEWHERE, &[], w(None, None));
        check(ON, A, r(sz(FOREIGN), None, dw(2)), w(Some(GB), Some(2)), ELSEWHERE, &[], w(None, Some(2)));
        check(ON, A, r(dw(7), None, None), w(None, None), ELSEWHERE, &[], w(None, None));
        // DOGroupIdSource: never both; Tenon's own DOGroupId goes, the source and Tenon's mode stay.
        check(ON, A, r(None, dw(1), None), w(None, None), ELSEWHERE, &[], w(None, None));
        check(ON, A, r(sz(GA), dw(5), dw(2)), w(Some(GA), Some(2)), ELSEWHERE, &[DEL_GID], w(None, Some(2)));
        check(ON, A, r(sz(FOREIGN), dw(5), dw(2)), w(None, None), ELSEWHERE, &[], w(None, None));
        // No gateway: no random group; Tenon's values of the previous network go, foreign ones stay.
        check(ON, NO_GW, r(None, None, None), w(None, None), "no_gateway", &[], w(None, None));
        check(ON, NO_GW, r(sz(GB), None, dw(2)), w(Some(GB), Some(2)), "no_gateway", &BOTH_GONE, w(None, None));
        check(ON, NO_GW, r(sz(FOREIGN), None, dw(0)), w(None, None), "no_gateway", &[], w(None, None));
        // Off: remove exactly what Tenon wrote and still holds.
        check(OFF, A, r(None, None, None), w(None, None), "disabled", &[], w(None, None));
        check(OFF, A, r(sz(GA), None, dw(2)), w(Some(GA), Some(2)), "removed", &BOTH_GONE, w(None, None));
        check(OFF, A, r(sz(FOREIGN), None, dw(2)), w(Some(GA), Some(2)), "removed", &[DEL_MODE], w(None, None));
        check(OFF, A, r(sz(GA), None, dw(0)), w(Some(GA), Some(2)), "removed", &[DEL_GID], w(None, None));
        check(OFF, NO_GW, r(sz(GB), None, dw(2)), w(Some(GB), Some(2)), "removed", &BOTH_GONE, w(None, None));
        check(OFF, A, r(sz(FOREIGN), dw(1), dw(3)), w(None, None), "disabled", &[], w(None, None));
    }

    #[test]
    fn status_details_and_partial_progress() {
        let input =
            DoInput { enabled: true, gateway: A, current: DoRegistry::default(), written: DoWritten::default() };
        let p = plan(&input);
        let details = serde_json::to_value(&p.status).unwrap();
        assert_eq!(
            details,
            serde_json::json!({"state": "applied", "gateway_ip": "192.168.10.1", "gateway_mac": "aa:bb:cc:00:11:22", "group_id": GA})
        );
        // Only the DOGroupId got written before a failure: Tenon owns just that.
        assert_eq!(p.written_after(1), w(Some(GA), None));
        assert_eq!(p.written_after(0), w(None, None));

        let foreign = DoInput { current: r(sz(FOREIGN), None, None), ..input.clone() };
        let s = plan(&foreign).status;
        assert!(!s.details.contains_key("group_id"));
        assert!(s.reason.unwrap().contains(FOREIGN));
        let s = plan(&DoInput { gateway: None, ..input }).status;
        assert!(!s.details.contains_key("gateway_mac"));
    }

    #[test]
    fn written_state_round_trips() {
        let wrote = w(Some(GA), Some(2));
        let v = serde_json::to_value(&wrote).unwrap();
        assert_eq!(v, serde_json::json!({"group_id": GA, "download_mode": 2}));
        assert_eq!(serde_json::from_value::<DoWritten>(v).unwrap(), wrote);
        assert_eq!(serde_json::from_value::<DoWritten>(serde_json::json!({})).unwrap(), w(None, None));
    }
}
