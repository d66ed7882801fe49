//! The Delivery Optimization policy on the device: reads the default gateway and the DO policy
//! values, lets the pure plan of `tenon_core::policy::delivery_optimization` decide, writes the
//! values, and remembers in the policy state what Tenon wrote so it only ever touches its own.

use super::{Policy, PolicyContext};
use crate::platform::{self, PResult, Platform, RegValue};
use serde_json::Value;
use tenon_core::api::PolicyStatus;
use tenon_core::policy::delivery_optimization::{
    self as dopol, DoAction, DoInput, DoRegistry, DoWritten, Gateway, RegData, KEY,
};

/// Peer groups by default gateway (`Policies.SetNetworkOptimizationID`).
pub struct DeliveryOptimization;

impl Policy for DeliveryOptimization {
    fn name(&self) -> &'static str {
        "delivery_optimization"
    }

    fn apply(&self, ctx: &mut PolicyContext<'_>) -> PolicyStatus {
        let p = ctx.platform;
        // A value of the wrong type (5, "yes") is reported, not guessed at; nothing changes.
        let setting = match tenon_core::schema::read(ctx.machine, dopol::SETTING) {
            Ok(v) => v,
            Err(e) => {
                return failed(format!(
                    "{e}; Delivery Optimization is left as it is until the setting is fixed                      (`tenonctl settings set ... {} true`)",
                    dopol::SETTING
                ))
            }
        };
        let enabled = dopol::enabled(setting);
        // When the policy is off the gateway only helps recognise Tenon's own values after a lost
        // state, so a failure to read it must not stop the removal.
        let gateway = match platform::default_gateway(p) {
            Ok(g) => g.map(|g| Gateway { ip: g.ip, mac: g.mac }),
            Err(e) if enabled => {
                return failed(format!(
                    "cannot read the default gateway from the routing and neighbour tables: {e}; \
                     it is retried at the next sync or network change"
                ))
            }
            Err(_) => None,
        };
        let current = match read_registry(p) {
            Ok(c) => c,
            Err(e) => return failed(format!("cannot read {KEY}: {e}; check that the agent runs as SYSTEM")),
        };
        let written = match &*ctx.state {
            Value::Null => DoWritten::default(),
            state => serde_json::from_value(state.clone()).unwrap_or_else(|e| {
                // Forgetting what Tenon wrote is safe: its values then count as foreign and are left alone.
                tracing::warn!("delivery_optimization: ignoring unreadable policy state: {e}");
                DoWritten::default()
            }),
        };

        let plan = dopol::plan(&DoInput { enabled, gateway, current, written });
        let mut done = 0;
        let mut failure = None;
        for action in &plan.actions {
            match execute(p, action) {
                Ok(()) => done += 1,
                Err(e) => {
                    failure = Some(format!(
                        "cannot {action} under {KEY}: {e}; check that the agent runs as SYSTEM and that \
                         no security software blocks writes to the policy key"
                    ));
                    break;
                }
            }
        }
        // Record exactly what got written, also after a failure part-way.
        *ctx.state = serde_json::to_value(plan.written_after(done)).unwrap_or(Value::Null);

        match failure {
            None => plan.status,
            Some(reason) => {
                let mut status = failed(reason);
                for key in ["gateway_ip", "gateway_mac"] {
                    if let Some(v) = plan.status.details.get(key) {
                        status = status.with(key, v.clone());
                    }
                }
                status
            }
        }
    }
}

fn failed(reason: String) -> PolicyStatus {
    PolicyStatus::new("failed").with_reason(reason)
}

fn read_registry(p: &dyn Platform) -> PResult<DoRegistry> {
    let get = |name| p.reg_get(KEY, name).map(|v| v.map(to_data));
    Ok(DoRegistry {
        group_id: get(dopol::GROUP_ID)?,
        group_id_source: get(dopol::GROUP_ID_SOURCE)?,
        download_mode: get(dopol::DOWNLOAD_MODE)?,
    })
}

fn execute(p: &dyn Platform, action: &DoAction) -> PResult<()> {
    match action {
        DoAction::Set(name, value) => p.reg_set(KEY, name, &to_value(value)),
        DoAction::Delete(name) => p.reg_delete(KEY, name).map(|_| ()),
    }
}

fn to_data(v: RegValue) -> RegData {
    match v {
        RegValue::Sz(s) => RegData::Sz(s),
        RegValue::Dword(n) => RegData::Dword(n),
        RegValue::MultiSz(l) => RegData::MultiSz(l),
    }
}

fn to_value(d: &RegData) -> RegValue {
    match d {
        RegData::Sz(s) => RegValue::Sz(s.clone()),
        RegData::Dword(n) => RegValue::Dword(*n),
        RegData::MultiSz(l) => RegValue::MultiSz(l.clone()),
    }
}
