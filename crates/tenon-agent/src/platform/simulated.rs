//! A simulated device: one JSON file (docs/device-file.md) that the agent reads facts from and
//! writes effects back into. Fields the agent does not know are kept as they are.
//!
//! Each call reads the file afresh and each change rewrites it atomically, so a test (or a person
//! running a demo) can edit the device between syncs.
//!
//! BitLocker is a state machine on each `volumes` entry: `encryption` goes `none` -> `encrypting`
//! (on `encrypt`, which also records `encryption_method: "XTS-AES-256"` and `used_space_only`) ->
//! `encrypted` (as `percent_encrypted` reaches 100, advanced by `volumes()` reads: see
//! `advance_encryption`). `protectors` are `{"id", "type": "recovery_password" | "tpm"}`; a
//! recovery password also carries its `numerical_password`, because the file plays the disk and
//! the disk holds its own secret. `backup_to_entra` fails while `entra_escrow_fails` > 0 (counting
//! it down) or when it is -1, and marks the protector `entra_escrowed` when it succeeds.

use super::*;
use serde_json::{json, Map, Value};
use std::path::Path;
use tenon_core::packages::{compare_versions, RegistryCheck};

pub struct SimulatedPlatform {
    path: PathBuf,
}

impl SimulatedPlatform {
    /// Opens a device file, which must exist and hold a JSON object.
    pub fn open(path: &Path) -> PResult<Self> {
        let p = Self { path: path.to_path_buf() };
        p.load()?;
        Ok(p)
    }

    fn err(&self, detail: impl Into<String>) -> PlatformError {
        PlatformError::DeviceFile { path: self.path.display().to_string(), detail: detail.into() }
    }

    fn load(&self) -> PResult<Map<String, Value>> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| self.err(format!("cannot read it: {e}")))?;
        match serde_json::from_str(&text) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(self.err("it must hold a JSON object")),
            Err(e) => Err(self.err(format!("it is not valid JSON: {e}"))),
        }
    }

    /// Reads, lets `f` change the device, and writes it back atomically.
    fn update<T>(&self, f: impl FnOnce(&mut Map<String, Value>) -> PResult<T>) -> PResult<T> {
        let mut dev = self.load()?;
        let out = f(&mut dev)?;
        let text = serde_json::to_string_pretty(&Value::Object(dev)).expect("JSON values serialise");
        let tmp = self.path.with_extension("tmp-write");
        std::fs::write(&tmp, text).map_err(|e| self.err(format!("cannot write it: {e}")))?;
        replace_file(&tmp, &self.path).map_err(|e| self.err(format!("cannot replace it: {e}")))?;
        Ok(out)
    }

    fn field<T: serde::de::DeserializeOwned + Default>(&self, name: &str) -> PResult<T> {
        let dev = self.load()?;
        match dev.get(name) {
            None | Some(Value::Null) => Ok(T::default()),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| self.err(format!("field {name:?}: {e}"))),
        }
    }

    fn registry_key<'m>(dev: &'m mut Map<String, Value>, key: &str) -> &'m mut Map<String, Value> {
        let reg = obj_entry(dev, "registry");
        // Registry paths compare case-insensitively, as on Windows.
        let existing = reg.keys().find(|k| k.eq_ignore_ascii_case(key)).cloned();
        obj_entry(reg, existing.as_deref().unwrap_or(key))
    }

    fn volume<'m>(dev: &'m mut Map<String, Value>, mount: &str) -> PResult<&'m mut Map<String, Value>> {
        dev.get_mut("volumes")
            .and_then(Value::as_array_mut)
            .and_then(|vols| {
                vols.iter_mut()
                    .filter_map(Value::as_object_mut)
                    .find(|v| v.get("mount").and_then(Value::as_str).is_some_and(|m| m.eq_ignore_ascii_case(mount)))
            })
            .ok_or(PlatformError::Invalid { what: "volume", detail: format!("no volume {mount}") })
    }

    fn network(&self) -> PResult<Option<(IpAddr, [u8; 6])>> {
        #[derive(Deserialize, Default)]
        struct Net {
            gateway_ip: Option<String>,
            gateway_mac: Option<String>,
        }
        let net: Net = self.field("network")?;
        let (Some(ip), Some(mac)) = (net.gateway_ip, net.gateway_mac) else { return Ok(None) };
        let ip: IpAddr = ip.parse().map_err(|_| self.err(format!("network.gateway_ip {ip:?} is not an IP address")))?;
        let mac = parse_mac(&mac)
            .ok_or_else(|| self.err(format!("network.gateway_mac {mac:?} is not a MAC like 00:11:22:33:44:55")))?;
        Ok(Some((ip, mac)))
    }
}

/// The key a 32-bit program sees for `key` (`HKLM\SOFTWARE\X` -> `HKLM\SOFTWARE\WOW6432Node\X`).
fn registry_view(key: &str, view32: bool) -> String {
    let prefix = "HKLM\\SOFTWARE\\";
    if view32
        && key.len() > prefix.len()
        && key.is_char_boundary(prefix.len())
        && key[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        format!("{prefix}WOW6432Node\\{}", &key[prefix.len()..])
    } else {
        key.to_string()
    }
}

/// What a successful run leaves behind on the simulated device: an MSI's product code in
/// `msi_products` (removed by an uninstall), else what the detection rule looks for.
fn simulate_effect(dev: &mut Map<String, Value>, run: &InstallerRun<'_>) {
    match run.detect {
        DetectRule::Msi { product_code } => {
            let products = obj_entry(dev, "msi_products");
            products.retain(|k, _| !k.eq_ignore_ascii_case(product_code));
            if !run.uninstall {
                products.insert(product_code.clone(), json!(run.version));
            }
        }
        DetectRule::File { path, min_version } => {
            let files = obj_entry(dev, "files");
            files.retain(|k, _| !k.eq_ignore_ascii_case(path));
            if !run.uninstall {
                files.insert(path.clone(), json!({"version": min_version.as_deref().unwrap_or(run.version)}));
            }
        }
        DetectRule::Registry { key, name, check, view32 } => {
            let key = registry_view(key, *view32);
            let reg = obj_entry(dev, "registry");
            let k = reg.keys().find(|k| k.eq_ignore_ascii_case(&key)).cloned().unwrap_or(key);
            let values = obj_entry(reg, &k);
            values.retain(|n, _| !n.eq_ignore_ascii_case(name));
            if !run.uninstall {
                let v = match check {
                    RegistryCheck::Exists => "1".to_string(),
                    RegistryCheck::Equals(v) | RegistryCheck::VersionAtLeast(v) => v.clone(),
                };
                values.insert(name.clone(), json!({"type": "REG_SZ", "value": v}));
            }
        }
    }
}

/// Renames `tmp` over `path`. On Windows a rename fails while another thread or process has the
/// file open (a sharing violation, as when a test edits the device file while the agent reads it),
/// so it is retried for a short while there.
pub fn replace_file(tmp: &Path, path: &Path) -> std::io::Result<()> {
    let mut tries = 0;
    loop {
        match std::fs::rename(tmp, path) {
            Err(e) if cfg!(windows) && tries < 100 => {
                tries += 1;
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn obj_entry<'m>(m: &'m mut Map<String, Value>, key: &str) -> &'m mut Map<String, Value> {
    let slot = m.entry(key.to_string()).or_insert_with(|| json!({}));
    if !slot.is_object() {
        *slot = json!({});
    }
    slot.as_object_mut().expect("just made an object")
}

/// Parses `00:11:22:aa:bb:cc` or `00-11-22-AA-BB-CC`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        mac[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

const FVE_E_TPM_NOT_OWNED: u32 = 0x8031_0018;
const FVE_E_CANNOT_ENCRYPT_NO_KEY: u32 = 0x8031_002E;
const FVE_E_NOT_DECRYPTED: u32 = 0x8031_0039;
const WININET_E_NAME_NOT_RESOLVED: u32 = 0x8007_2EE7;
/// How far one `volumes()` call moves an encrypting volume unless the volume says otherwise.
const DEFAULT_ENCRYPTION_STEP_PERCENT: u64 = 25;

/// The `protectors` list of a volume, created when missing.
fn protectors_of(vol: &mut Map<String, Value>) -> &mut Vec<Value> {
    let slot = vol.entry("protectors").or_insert_with(|| json!([]));
    if !slot.is_array() {
        *slot = json!([]);
    }
    slot.as_array_mut().expect("just made an array")
}

/// A protector's kind: `type` as DESIGN.md writes it, `kind` accepted too.
fn protector_type(p: &Value) -> Option<&str> {
    p.get("type").or_else(|| p.get("kind")).and_then(Value::as_str)
}

fn random_bytes<const N: usize>() -> PResult<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)
        .map_err(|e| PlatformError::Invalid { what: "random number generator", detail: e.to_string() })?;
    Ok(b)
}

/// A protector id as BitLocker writes them: `{8-4-4-4-12}` upper-case hex.
fn random_guid() -> PResult<String> {
    let h = hex::encode_upper(random_bytes::<16>()?);
    Ok(format!("{{{}-{}-{}-{}-{}}}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]))
}

/// A fresh recovery password from 128 random bits, the way BitLocker derives one.
fn random_recovery_password() -> PResult<zeroize::Zeroizing<String>> {
    let key = zeroize::Zeroizing::new(random_bytes::<16>()?);
    Ok(tenon_core::policy::escrow::recovery_password_from_key(&key))
}

impl SimulatedPlatform {
    /// Models the passing of time for encrypting volumes: each call moves every encrypting volume
    /// on by its `encryption_step_percent` (default 25) and marks it encrypted at 100. The agent
    /// reads the volumes once per policy run plus once after each step it executes, so a test
    /// sees the percentage advance across syncs.
    fn advance_encryption(&self) -> PResult<()> {
        let encrypting = |v: &Value| v.get("encryption").and_then(Value::as_str) == Some("encrypting");
        let any = self.load()?.get("volumes").and_then(Value::as_array).is_some_and(|vols| vols.iter().any(encrypting));
        if !any {
            return Ok(());
        }
        self.update(|dev| {
            let vols = dev.get_mut("volumes").and_then(Value::as_array_mut).into_iter().flatten();
            for vol in vols.filter(|v| encrypting(v)).filter_map(Value::as_object_mut) {
                let step = vol
                    .get("encryption_step_percent")
                    .and_then(Value::as_u64)
                    .unwrap_or(DEFAULT_ENCRYPTION_STEP_PERCENT)
                    .clamp(1, 100);
                let percent = vol.get("percent_encrypted").and_then(Value::as_u64).unwrap_or(0).saturating_add(step);
                vol.insert("percent_encrypted".into(), json!(percent.min(100)));
                if percent >= 100 {
                    vol.insert("encryption".into(), json!("encrypted"));
                }
            }
            Ok(())
        })
    }
}

impl Platform for SimulatedPlatform {
    fn hostname(&self) -> PResult<String> {
        let h: Option<String> = self.field("hostname")?;
        Ok(h.unwrap_or_else(|| "SIMULATED".to_string()))
    }

    fn reg_get(&self, key: &str, name: &str) -> PResult<Option<RegValue>> {
        let mut dev = self.load()?;
        let k = Self::registry_key(&mut dev, key);
        match k.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            None => Ok(None),
            Some((_, v)) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| self.err(format!("registry value {key}\\{name}: {e}"))),
        }
    }

    fn reg_set(&self, key: &str, name: &str, value: &RegValue) -> PResult<()> {
        self.update(|dev| {
            let k = Self::registry_key(dev, key);
            let existing = k.keys().find(|n| n.eq_ignore_ascii_case(name)).cloned();
            k.insert(existing.unwrap_or_else(|| name.to_string()), serde_json::to_value(value).expect("serialises"));
            Ok(())
        })
    }

    fn reg_delete(&self, key: &str, name: &str) -> PResult<bool> {
        self.update(|dev| {
            let k = Self::registry_key(dev, key);
            let existing = k.keys().find(|n| n.eq_ignore_ascii_case(name)).cloned();
            Ok(existing.and_then(|n| k.remove(&n)).is_some())
        })
    }

    fn routes(&self) -> PResult<Vec<Route>> {
        Ok(self
            .network()?
            .map(|(gw, _)| Route {
                destination: if gw.is_ipv4() { "0.0.0.0/0".into() } else { "::/0".into() },
                prefix_len: 0,
                gateway: gw,
                metric: 25,
                interface_index: 1,
            })
            .into_iter()
            .collect())
    }

    fn neighbours(&self) -> PResult<Vec<Neighbour>> {
        Ok(self.network()?.map(|(ip, mac)| Neighbour { ip, mac, interface_index: 1 }).into_iter().collect())
    }

    fn resolve_mac(&self, ip: IpAddr, _interface_index: u32) -> PResult<Option<[u8; 6]>> {
        Ok(self.network()?.filter(|(gw, _)| *gw == ip).map(|(_, mac)| mac))
    }

    fn machine_env(&self, name: &str) -> PResult<Option<String>> {
        let env: Map<String, Value> = self.field("env")?;
        Ok(env
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
    }

    fn computer_system(&self) -> PResult<ComputerSystem> {
        let vm: Option<ComputerSystem> = self.field("vm")?;
        Ok(vm.unwrap_or_default())
    }

    fn tpm(&self) -> PResult<TpmState> {
        self.field("tpm")
    }

    fn is_multi_session(&self) -> PResult<bool> {
        self.field("multi_session")
    }

    fn entra_join(&self) -> PResult<EntraJoin> {
        let joined: bool = self.field("entra_joined")?;
        Ok(EntraJoin { joined, tenant_id: None })
    }

    fn volumes(&self) -> PResult<Vec<Volume>> {
        #[derive(Deserialize)]
        struct SimProtector {
            id: String,
            #[serde(alias = "type")]
            kind: String,
        }
        #[derive(Deserialize)]
        struct SimVolume {
            mount: String,
            #[serde(default = "none_state")]
            encryption: VolumeEncryption,
            #[serde(default)]
            percent_encrypted: Option<u8>,
            #[serde(default)]
            protectors: Vec<SimProtector>,
        }
        fn none_state() -> VolumeEncryption {
            VolumeEncryption::None
        }
        self.advance_encryption()?;
        let vols: Vec<SimVolume> = self.field("volumes")?;
        Ok(vols
            .into_iter()
            .map(|v| Volume {
                is_os_volume: v.mount.eq_ignore_ascii_case("C:"),
                percent_encrypted: v.percent_encrypted.unwrap_or(match v.encryption {
                    VolumeEncryption::Encrypted => 100,
                    _ => 0,
                }),
                encryption: v.encryption,
                protectors: v.protectors.into_iter().map(|p| Protector { id: p.id, kind: p.kind }).collect(),
                mount: v.mount,
            })
            .collect())
    }

    fn add_recovery_password(&self, mount: &str) -> PResult<(String, String)> {
        let id = random_guid()?;
        let password = random_recovery_password()?;
        self.update(|dev| {
            let vol = Self::volume(dev, mount)?;
            protectors_of(vol).push(json!({
                "id": id,
                "type": "recovery_password",
                // The disk's own secret: the device file plays the disk, so it holds the password as
                // BitLocker's metadata would. Nothing else the agent writes may contain it.
                "numerical_password": password.as_str(),
            }));
            Ok(())
        })?;
        Ok((id, password.to_string()))
    }

    fn add_tpm_protector(&self, mount: &str) -> PResult<String> {
        let tpm: TpmState = self.field("tpm")?;
        if !(tpm.present && tpm.ready) {
            return Err(PlatformError::Os {
                what: "ProtectKeyWithTPM",
                code: FVE_E_TPM_NOT_OWNED,
                detail: "the TPM is not present or not ready".into(),
            });
        }
        let new_id = random_guid()?;
        self.update(|dev| {
            let list = protectors_of(Self::volume(dev, mount)?);
            // A volume has at most one TPM protector; Windows answers FVE_E_PROTECTOR_EXISTS, which
            // the platform reports as the existing protector.
            if let Some(existing) = list.iter().find(|p| protector_type(p) == Some("tpm")) {
                return Ok(existing.get("id").and_then(Value::as_str).unwrap_or_default().to_string());
            }
            list.push(json!({"id": new_id, "type": "tpm"}));
            Ok(new_id.clone())
        })
    }

    fn delete_protector(&self, mount: &str, protector_id: &str) -> PResult<()> {
        self.update(|dev| {
            let vol = Self::volume(dev, mount)?;
            if let Some(list) = vol.get_mut("protectors").and_then(Value::as_array_mut) {
                list.retain(|p| p.get("id").and_then(Value::as_str) != Some(protector_id));
            }
            Ok(())
        })
    }

    fn encrypt(&self, mount: &str) -> PResult<()> {
        let result = self.update(|dev| {
            let vol = Self::volume(dev, mount)?;
            let state = vol.get("encryption").and_then(Value::as_str).unwrap_or("none").to_string();
            Ok(match state.as_str() {
                // Already (being) encrypted: nothing to start; the Windows path maps
                // FVE_E_NOT_DECRYPTED on such a volume to the same answer.
                "encrypting" | "encrypted" => Ok(()),
                "none" if protectors_of(vol).is_empty() => Err(PlatformError::Os {
                    what: "Encrypt",
                    code: FVE_E_CANNOT_ENCRYPT_NO_KEY,
                    detail: format!("volume {mount} has no key protector"),
                }),
                "none" => {
                    vol.insert("encryption".into(), json!("encrypting"));
                    vol.insert("percent_encrypted".into(), json!(0));
                    vol.insert("encryption_method".into(), json!("XTS-AES-256"));
                    vol.insert("used_space_only".into(), json!(true));
                    Ok(())
                }
                other => Err(PlatformError::Os {
                    what: "Encrypt",
                    code: FVE_E_NOT_DECRYPTED,
                    detail: format!("volume {mount} is {other}, not fully decrypted"),
                }),
            })
        })?;
        result
    }

    fn backup_to_entra(&self, mount: &str, protector_id: &str) -> PResult<()> {
        let result = self.update(|dev| {
            let joined = dev.get("entra_joined").and_then(Value::as_bool).unwrap_or(false);
            let fails = dev.get("entra_escrow_fails").and_then(Value::as_i64).unwrap_or(0);
            if !joined {
                return Ok(Err(PlatformError::Invalid {
                    what: "BackupRecoveryInformationToCloudDomain",
                    detail: "the device is not Entra-joined".into(),
                }));
            }
            let vol = Self::volume(dev, mount)?;
            let Some(protector) = protectors_of(vol)
                .iter_mut()
                .find(|p| p.get("id").and_then(Value::as_str) == Some(protector_id))
                .filter(|p| protector_type(p) == Some("recovery_password"))
            else {
                return Ok(Err(PlatformError::Invalid {
                    what: "BackupRecoveryInformationToCloudDomain",
                    detail: format!("volume {mount} has no recovery password {protector_id}"),
                }));
            };
            if fails == 0 {
                if let Some(p) = protector.as_object_mut() {
                    p.insert("entra_escrowed".into(), json!(true));
                }
                return Ok(Ok(()));
            }
            // The counter is written back (the closure returns Ok), so the next attempt sees it.
            if fails > 0 {
                dev.insert("entra_escrow_fails".into(), json!(fails - 1));
            }
            Ok(Err(PlatformError::Os {
                what: "BackupRecoveryInformationToCloudDomain",
                code: WININET_E_NAME_NOT_RESOLVED,
                detail: "Entra ID could not be reached (simulated failure)".into(),
            }))
        })?;
        result
    }

    fn signed_in_users(&self) -> PResult<Vec<SessionUser>> {
        let upns: Vec<String> = self.field("signed_in_users")?;
        Ok(upns
            .into_iter()
            .enumerate()
            .map(|(i, upn)| SessionUser { upn, sid: None, session_id: Some(i as u32 + 1) })
            .collect())
    }

    fn local_group_members(&self, group: &str) -> PResult<Vec<Account>> {
        let groups: Map<String, Value> = self.field("local_groups")?;
        let members = groups
            .iter()
            .find(|(g, _)| g.eq_ignore_ascii_case(group))
            .and_then(|(_, v)| v.as_array())
            .map(|a| a.iter().filter_map(Value::as_str).map(|n| Account { name: n.to_string(), sid: None }).collect())
            .unwrap_or_default();
        Ok(members)
    }

    fn add_local_group_member(&self, group: &str, account: &Account) -> PResult<()> {
        self.update(|dev| {
            let groups = obj_entry(dev, "local_groups");
            let name =
                groups.keys().find(|g| g.eq_ignore_ascii_case(group)).cloned().unwrap_or_else(|| group.to_string());
            let slot = groups.entry(name).or_insert_with(|| json!([]));
            let list = slot
                .as_array_mut()
                .ok_or(PlatformError::Invalid { what: "local group", detail: format!("{group} is not a list") })?;
            if !list.iter().any(|m| m.as_str().is_some_and(|m| m.eq_ignore_ascii_case(&account.name))) {
                list.push(Value::String(account.name.clone()));
            }
            Ok(())
        })
    }

    fn remove_local_group_member(&self, group: &str, account: &Account) -> PResult<()> {
        self.update(|dev| {
            let groups = obj_entry(dev, "local_groups");
            if let Some(list) =
                groups.iter_mut().find(|(g, _)| g.eq_ignore_ascii_case(group)).and_then(|(_, v)| v.as_array_mut())
            {
                list.retain(|m| !m.as_str().is_some_and(|m| m.eq_ignore_ascii_case(&account.name)));
            }
            Ok(())
        })
    }

    fn profile_dir(&self, user: &SessionUser) -> PResult<PathBuf> {
        let dir: Option<String> = self.field("profiles_dir")?;
        let dir = dir.ok_or_else(|| self.err("profiles_dir is not set, so user profiles cannot be located"))?;
        Ok(PathBuf::from(dir).join(&user.upn))
    }

    fn notify_user(&self, user: &SessionUser, title: &str, message: &str) -> PResult<()> {
        self.update(|dev| {
            let slot = dev.entry("notifications").or_insert_with(|| json!([]));
            if !slot.is_array() {
                *slot = json!([]);
            }
            slot.as_array_mut()
                .expect("just made an array")
                .push(json!({"user": user.upn, "title": title, "message": message}));
            Ok(())
        })
    }

    fn wrap_secret(&self, plain: &[u8]) -> PResult<Vec<u8>> {
        // Off Windows the key file's 0600 mode is the protection (DESIGN.md section 2).
        Ok(plain.to_vec())
    }

    fn unwrap_secret(&self, wrapped: &[u8]) -> PResult<Vec<u8>> {
        Ok(wrapped.to_vec())
    }

    fn wait_network_change(&self, timeout: Duration) -> PResult<bool> {
        // The simulated device has no notifications: poll the file's network section.
        let before = self.load()?.get("network").cloned();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let step = deadline.saturating_duration_since(std::time::Instant::now()).min(Duration::from_millis(500));
            if step.is_zero() {
                return Ok(false);
            }
            std::thread::sleep(step);
            if self.load()?.get("network").cloned() != before {
                return Ok(true);
            }
        }
    }

    fn detect(&self, rule: &DetectRule) -> PResult<bool> {
        let dev = self.load()?;
        Ok(match rule {
            DetectRule::Msi { product_code } => dev
                .get("msi_products")
                .and_then(Value::as_object)
                .is_some_and(|m| m.keys().any(|k| k.eq_ignore_ascii_case(product_code))),
            DetectRule::File { path, min_version } => {
                let file = dev
                    .get("files")
                    .and_then(Value::as_object)
                    .and_then(|f| f.iter().find(|(p, _)| p.eq_ignore_ascii_case(path)).map(|(_, v)| v));
                match (file, min_version) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(f), Some(min)) => f
                        .get("version")
                        .and_then(Value::as_str)
                        .and_then(|v| compare_versions(v, min))
                        .is_some_and(|o| o.is_ge()),
                }
            }
            DetectRule::Registry { key, name, check, view32 } => {
                let key = registry_view(key, *view32);
                let value = dev.get("registry").and_then(Value::as_object).and_then(|r| {
                    r.iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(&key))
                        .and_then(|(_, v)| v.as_object())
                        .and_then(|k| k.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v))
                });
                let text = value.and_then(|v| match v.get("value") {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Number(n)) => Some(n.to_string()),
                    _ => None,
                });
                match (check, text) {
                    (_, None) => value.is_some() && matches!(check, RegistryCheck::Exists),
                    (RegistryCheck::Exists, Some(_)) => true,
                    (RegistryCheck::Equals(want), Some(t)) => t.eq_ignore_ascii_case(want),
                    (RegistryCheck::VersionAtLeast(min), Some(t)) => {
                        compare_versions(&t, min).is_some_and(|o| o.is_ge())
                    }
                }
            }
        })
    }

    /// Takes the next of `installer_exit_codes[package]` (default 0; the string `"hang"` runs
    /// past the timeout), appends the run to `installer_runs`, and on a success makes the
    /// detection rule hold (install) or stop holding (uninstall).
    fn run_installer(&self, run: &InstallerRun<'_>) -> PResult<RunEnd> {
        let end = self.update(|dev| {
            let next = dev
                .get_mut("installer_exit_codes")
                .and_then(Value::as_object_mut)
                .and_then(|m| m.get_mut(run.package))
                .and_then(Value::as_array_mut)
                .and_then(|codes| (!codes.is_empty()).then(|| codes.remove(0)));
            let end = match next {
                None if run.detached => RunEnd::HandedOff,
                None => RunEnd::Exited(0),
                Some(Value::Number(n)) => RunEnd::Exited(n.as_i64().unwrap_or(1)),
                Some(Value::String(s)) if s == "hang" => RunEnd::TimedOut,
                Some(other) => {
                    return Err(self.err(format!(
                        "installer_exit_codes.{}: {other} is neither an exit code nor \"hang\"",
                        run.package
                    )))
                }
            };
            let code = match end {
                RunEnd::Exited(c) => json!(c),
                RunEnd::TimedOut => json!("timed_out"),
                RunEnd::HandedOff => json!("detached"),
            };
            let runs = dev.entry("installer_runs").or_insert_with(|| json!([]));
            if !runs.is_array() {
                *runs = json!([]);
            }
            runs.as_array_mut().expect("just made an array").push(json!({
                "package": run.package, "version": run.version, "command": run.command.display(),
                "uninstall": run.uninstall, "exit_code": code,
            }));
            if matches!(end, RunEnd::Exited(0 | 1707 | 3010 | 1641) | RunEnd::HandedOff) {
                simulate_effect(dev, run);
            }
            Ok(end)
        })?;
        let _ = std::fs::write(run.output, format!("simulated run of {}\n", run.command.display()));
        Ok(end)
    }

    fn free_disk_bytes(&self, _path: &Path) -> PResult<Option<u64>> {
        self.field::<Option<u64>>("disk_free_bytes")
    }

    fn recovery_password(&self, mount: &str, protector_id: &str) -> PResult<String> {
        let mut dev = self.load()?;
        let vol = Self::volume(&mut dev, mount)?;
        protectors_of(vol)
            .iter()
            .find(|p| p.get("id").and_then(Value::as_str) == Some(protector_id))
            .filter(|p| protector_type(p) == Some("recovery_password"))
            .and_then(|p| p.get("numerical_password"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or(PlatformError::Invalid {
                what: "GetKeyProtectorNumericalPassword",
                detail: format!("volume {mount} has no recovery password {protector_id}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(json: Value) -> (tempfile::TempDir, SimulatedPlatform) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let p = SimulatedPlatform::open(&path).unwrap();
        (dir, p)
    }

    #[test]
    fn keeps_unknown_fields_and_writes_registry() {
        let (dir, p) = device(json!({"hostname": "PC1", "custom": {"x": 1}, "signed_in_users": ["a@x.com"]}));
        assert_eq!(p.hostname().unwrap(), "PC1");
        assert_eq!(p.signed_in_users().unwrap()[0].upn, "a@x.com");
        p.reg_set("HKLM\\SOFTWARE\\T", "V", &RegValue::Dword(2)).unwrap();
        assert_eq!(p.reg_get("hklm\\software\\t", "v").unwrap(), Some(RegValue::Dword(2)));
        let raw: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("device.json")).unwrap()).unwrap();
        assert_eq!(raw["custom"], json!({"x": 1}));
        assert_eq!(raw["registry"]["HKLM\\SOFTWARE\\T"]["V"], json!({"type": "REG_DWORD", "value": 2}));
        assert!(p.reg_delete("HKLM\\SOFTWARE\\T", "V").unwrap());
        assert!(!p.reg_delete("HKLM\\SOFTWARE\\T", "V").unwrap());
    }

    #[test]
    fn network_and_groups() {
        let (_d, p) = device(json!({"network": {"gateway_ip": "192.0.2.1", "gateway_mac": "AA-bb-cc-00-11-22"}}));
        let r = p.routes().unwrap();
        assert_eq!(r.len(), 1);
        assert!(r[0].is_default());
        assert_eq!(p.neighbours().unwrap()[0].mac, [0xaa, 0xbb, 0xcc, 0, 0x11, 0x22]);
        let acct = Account { name: "AzureAD\\a@x.com".into(), sid: None };
        p.add_local_group_member("Administrators", &acct).unwrap();
        p.add_local_group_member("Administrators", &acct).unwrap();
        assert_eq!(p.local_group_members("administrators").unwrap(), vec![acct.clone()]);
        p.remove_local_group_member("Administrators", &acct).unwrap();
        assert!(p.local_group_members("Administrators").unwrap().is_empty());
        assert!(p.tpm().unwrap() == TpmState::default());
    }

    #[test]
    fn bitlocker_state_machine() {
        let (dir, p) = device(json!({
            "tpm": {"present": true, "ready": true},
            "volumes": [{"mount": "C:", "encryption": "none", "protectors": [], "encryption_step_percent": 40}],
        }));
        let raw = || -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("device.json")).unwrap()).unwrap()
        };
        // Encrypting needs a protector.
        assert!(matches!(p.encrypt("C:"), Err(PlatformError::Os { code: FVE_E_CANNOT_ENCRYPT_NO_KEY, .. })));
        let (rp, password) = p.add_recovery_password("C:").unwrap();
        assert!(tenon_core::policy::escrow::is_recovery_password(&password));
        assert!(rp.starts_with('{') && rp.ends_with('}') && rp.len() == 38, "{rp}");
        assert_eq!(p.recovery_password("c:", &rp).unwrap(), password);
        assert_eq!(raw()["volumes"][0]["protectors"][0]["numerical_password"], password.as_str());
        let (rp2, password2) = p.add_recovery_password("C:").unwrap();
        assert_ne!((rp.as_str(), password.as_str()), (rp2.as_str(), password2.as_str()), "random each time");
        let tpm = p.add_tpm_protector("C:").unwrap();
        assert_eq!(p.add_tpm_protector("C:").unwrap(), tpm, "one TPM protector; a second add answers the first");
        assert!(p.recovery_password("C:", &tpm).is_err());
        p.encrypt("C:").unwrap();
        assert_eq!(raw()["volumes"][0]["encryption_method"], "XTS-AES-256");
        assert_eq!(raw()["volumes"][0]["used_space_only"], true);
        let read = || {
            let v = p.volumes().unwrap().remove(0);
            (v.encryption, v.percent_encrypted)
        };
        assert_eq!(read(), (VolumeEncryption::Encrypting, 40));
        p.encrypt("C:").unwrap(); // already encrypting: nothing restarts
        assert_eq!(read(), (VolumeEncryption::Encrypting, 80));
        assert_eq!(read(), (VolumeEncryption::Encrypted, 100));
        assert_eq!(read(), (VolumeEncryption::Encrypted, 100));
        let v = p.volumes().unwrap().remove(0);
        assert!(v.is_os_volume);
        assert_eq!(
            v.protectors.iter().map(|p| p.kind.as_str()).collect::<Vec<_>>(),
            ["recovery_password", "recovery_password", "tpm"]
        );
        p.delete_protector("C:", &rp2).unwrap();
        assert_eq!(p.volumes().unwrap()[0].protectors.len(), 2);
        assert!(p.add_recovery_password("D:").is_err());
    }

    #[test]
    fn encrypt_refuses_a_decrypting_volume() {
        let (_d, p) = device(
            json!({"volumes": [{"mount": "C:", "encryption": "decrypting", "protectors": [{"id": "x", "type": "tpm"}]}]}),
        );
        assert!(matches!(p.encrypt("C:"), Err(PlatformError::Os { code: FVE_E_NOT_DECRYPTED, .. })));
    }

    #[test]
    fn entra_backup_fails_the_configured_number_of_times() {
        let (dir, p) = device(json!({
            "entra_joined": true, "entra_escrow_fails": 2,
            "volumes": [{"mount": "C:", "encryption": "none", "protectors": []}],
        }));
        let raw = || -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("device.json")).unwrap()).unwrap()
        };
        let (rp, _) = p.add_recovery_password("C:").unwrap();
        assert!(matches!(p.backup_to_entra("C:", &rp), Err(PlatformError::Os { .. })));
        assert_eq!(raw()["entra_escrow_fails"], 1);
        assert!(p.backup_to_entra("C:", &rp).is_err());
        assert_eq!(raw()["entra_escrow_fails"], 0);
        p.backup_to_entra("C:", &rp).unwrap();
        assert_eq!(raw()["volumes"][0]["protectors"][0]["entra_escrowed"], true);
        assert!(matches!(p.backup_to_entra("C:", "{NOPE}"), Err(PlatformError::Invalid { .. })));

        let (_d, always) = device(json!({
            "entra_joined": true, "entra_escrow_fails": -1,
            "volumes": [{"mount": "C:", "protectors": [{"id": "r", "type": "recovery_password"}]}],
        }));
        for _ in 0..5 {
            assert!(always.backup_to_entra("C:", "r").is_err());
        }
        let (_d, not_joined) = device(json!({
            "entra_joined": false, "volumes": [{"mount": "C:", "protectors": [{"id": "r", "type": "recovery_password"}]}],
        }));
        assert!(matches!(not_joined.backup_to_entra("C:", "r"), Err(PlatformError::Invalid { .. })));
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.json");
        std::fs::write(&path, "[1]").unwrap();
        assert!(matches!(SimulatedPlatform::open(&path), Err(PlatformError::DeviceFile { .. })));
        assert!(SimulatedPlatform::open(&dir.path().join("missing.json")).is_err());
    }
}
