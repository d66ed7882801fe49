//! The network: routes, neighbours (ARP/NDP), MAC resolution and waiting for a change, through IP
//! Helper.

use super::ffi::{check_win32, os_err, system_proc};
use crate::platform::{Neighbour, PResult, PlatformError, Route};
use std::collections::HashMap;
use std::ffi::c_void;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ::windows::Win32::Foundation::{
    ERROR_BAD_NET_NAME, ERROR_GEN_FAILURE, ERROR_HOST_UNREACHABLE, ERROR_NETWORK_UNREACHABLE, ERROR_NOT_FOUND,
    ERROR_NOT_SUPPORTED, HANDLE, NO_ERROR, WIN32_ERROR,
};
use ::windows::Win32::NetworkManagement::IpHelper::{
    CancelMibChangeNotify2, FreeMibTable, GetIpForwardTable2, GetIpNetTable2, NotifyIpInterfaceChange,
    NotifyRouteChange2, SendARP, MIB_IPFORWARD_ROW2, MIB_IPFORWARD_TABLE2, MIB_IPINTERFACE_ROW, MIB_IPNET_ROW2,
    MIB_IPNET_TABLE2, MIB_NOTIFICATION_TYPE,
};
use ::windows::Win32::Networking::WinSock::{
    NlnsIncomplete, NlnsUnreachable, ADDRESS_FAMILY, AF_INET, AF_INET6, AF_UNSPEC, SOCKADDR_INET,
};

pub(super) fn routes() -> PResult<Vec<Route>> {
    let mut if_metrics: HashMap<(u16, u32), u32> = HashMap::new();
    let mut routes = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut table: *mut MIB_IPFORWARD_TABLE2 = std::ptr::null_mut();
        // SAFETY: `table` is a live out-pointer; on success it is a MIB table freed by `MibTable`.
        let rc = unsafe { GetIpForwardTable2(family, &mut table) };
        let table = MibTable(table as *const c_void);
        if !family_ok("GetIpForwardTable2", family, rc)? {
            continue;
        }
        // SAFETY: the table holds `NumEntries` rows laid out contiguously from `Table`, and stays
        // alive (owned by `table`) while the slice is used.
        let rows: &[MIB_IPFORWARD_ROW2] = unsafe {
            let t = table.0 as *const MIB_IPFORWARD_TABLE2;
            std::slice::from_raw_parts((*t).Table.as_ptr(), (*t).NumEntries as usize)
        };
        for row in rows {
            let (Some(dest), Some(gateway)) = (sockaddr_ip(&row.DestinationPrefix.Prefix), sockaddr_ip(&row.NextHop))
            else {
                continue;
            };
            let if_metric = *if_metrics
                .entry((family.0, row.InterfaceIndex))
                .or_insert_with(|| interface_metric(family, row.InterfaceIndex));
            let prefix_len = row.DestinationPrefix.PrefixLength;
            routes.push(Route {
                destination: format!("{dest}/{prefix_len}"),
                prefix_len,
                gateway,
                metric: row.Metric.saturating_add(if_metric),
                interface_index: row.InterfaceIndex,
            });
        }
    }
    Ok(routes)
}

pub(super) fn neighbours() -> PResult<Vec<Neighbour>> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut table: *mut MIB_IPNET_TABLE2 = std::ptr::null_mut();
        // SAFETY: as in `routes`: live out-pointer, table freed by `MibTable`.
        let rc = unsafe { GetIpNetTable2(family, &mut table) };
        let table = MibTable(table as *const c_void);
        if !family_ok("GetIpNetTable2", family, rc)? {
            continue;
        }
        // SAFETY: `NumEntries` contiguous rows from `Table`, alive while `table` is.
        let rows: &[MIB_IPNET_ROW2] = unsafe {
            let t = table.0 as *const MIB_IPNET_TABLE2;
            std::slice::from_raw_parts((*t).Table.as_ptr(), (*t).NumEntries as usize)
        };
        out.extend(
            rows.iter()
                // Unreachable and incomplete entries carry no (or a stale zero) MAC.
                .filter(|r| r.State != NlnsUnreachable && r.State != NlnsIncomplete && r.PhysicalAddressLength == 6)
                .filter_map(|r| {
                    let ip = sockaddr_ip(&r.Address)?;
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&r.PhysicalAddress[..6]);
                    Some(Neighbour { ip, mac, interface_index: r.InterfaceIndex })
                }),
        );
    }
    Ok(out)
}

pub(super) fn resolve_mac(ip: IpAddr, interface_index: u32) -> PResult<Option<[u8; 6]>> {
    type Resolve = unsafe extern "system" fn(*mut MIB_IPNET_ROW2, *const SOCKADDR_INET) -> WIN32_ERROR;
    static RESOLVE: OnceLock<Option<usize>> = OnceLock::new();
    let not_found = |code: WIN32_ERROR| {
        [ERROR_BAD_NET_NAME, ERROR_NOT_FOUND, ERROR_GEN_FAILURE, ERROR_HOST_UNREACHABLE, ERROR_NETWORK_UNREACHABLE]
            .contains(&code)
    };
    if let Some(resolve) = *RESOLVE.get_or_init(|| system_proc("iphlpapi.dll", c"ResolveIpNetEntry2")) {
        // SAFETY: address from GetProcAddress for ResolveIpNetEntry2 (netioapi.h signature
        // `Resolve`); the row is zeroed POD we own, with the address and interface filled in.
        let (rc, row) = unsafe {
            let resolve = std::mem::transmute::<usize, Resolve>(resolve);
            let mut row: MIB_IPNET_ROW2 = std::mem::zeroed();
            row.Address = ip_sockaddr(ip);
            row.InterfaceIndex = interface_index;
            (resolve(&mut row, std::ptr::null()), row)
        };
        return match rc {
            NO_ERROR if row.PhysicalAddressLength == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&row.PhysicalAddress[..6]);
                Ok(Some(mac).filter(|m| *m != [0; 6]))
            }
            NO_ERROR => Ok(None),
            code if not_found(code) => Ok(None),
            code => Err(os_err("ResolveIpNetEntry2", code.0)),
        };
    }
    // Fallback for systems without ResolveIpNetEntry2: SendARP, IPv4 only.
    let IpAddr::V4(v4) = ip else {
        return Err(PlatformError::Unavailable {
            what: "neighbour resolution",
            detail: "ResolveIpNetEntry2 is missing and SendARP only handles IPv4".into(),
        });
    };
    let mut mac = [0u8; 8];
    let mut len = mac.len() as u32;
    // SAFETY: `mac` has `len` writable bytes; the address is in network byte order as SendARP wants.
    let rc = unsafe { SendARP(u32::from_ne_bytes(v4.octets()), 0, mac.as_mut_ptr().cast(), &mut len) };
    match WIN32_ERROR(rc) {
        NO_ERROR if len == 6 => Ok(Some([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]).filter(|m| *m != [0; 6])),
        NO_ERROR => Ok(None),
        ERROR_NOT_SUPPORTED => {
            Err(PlatformError::Unavailable { what: "ARP resolution", detail: "SendARP is not supported here".into() })
        }
        code if not_found(code) => Ok(None),
        code => Err(os_err("SendARP", code.0)),
    }
}

pub(super) fn wait_network_change(timeout: Duration) -> PResult<bool> {
    // The callbacks run on an OS thread pool; they only flip the flag and wake us.
    unsafe extern "system" fn on_route(ctx: *const c_void, _: *const MIB_IPFORWARD_ROW2, _: MIB_NOTIFICATION_TYPE) {
        // SAFETY: `ctx` is the `ChangeSignal` registered below, which outlives the registration.
        unsafe { (*(ctx as *const ChangeSignal)).signal() }
    }
    unsafe extern "system" fn on_interface(
        ctx: *const c_void,
        _: *const MIB_IPINTERFACE_ROW,
        _: MIB_NOTIFICATION_TYPE,
    ) {
        // SAFETY: as in `on_route`.
        unsafe { (*(ctx as *const ChangeSignal)).signal() }
    }
    let signal = Arc::new(ChangeSignal::default());
    let ctx = Arc::as_ptr(&signal) as *const c_void;
    let mut route_handle = HANDLE::default();
    let mut if_handle = HANDLE::default();
    // SAFETY: `ctx` stays valid until both registrations are cancelled below (we hold `signal`);
    // CancelMibChangeNotify2 waits for running callbacks, so none runs after `signal` drops.
    unsafe {
        check_win32(
            "NotifyRouteChange2",
            NotifyRouteChange2(AF_UNSPEC, Some(on_route), ctx, false, &mut route_handle),
        )?;
        let rc = NotifyIpInterfaceChange(AF_UNSPEC, Some(on_interface), Some(ctx), false, &mut if_handle);
        if rc != NO_ERROR {
            let _ = CancelMibChangeNotify2(route_handle);
            return Err(os_err("NotifyIpInterfaceChange", rc.0));
        }
    }
    let changed = signal.wait(timeout);
    // SAFETY: both handles came from successful registrations and are cancelled exactly once.
    unsafe {
        let _ = CancelMibChangeNotify2(route_handle);
        let _ = CancelMibChangeNotify2(if_handle);
    }
    Ok(changed)
}

fn interface_metric(family: ADDRESS_FAMILY, ifindex: u32) -> u32 {
    type Init = unsafe extern "system" fn(*mut MIB_IPINTERFACE_ROW);
    type Get = unsafe extern "system" fn(*mut MIB_IPINTERFACE_ROW) -> WIN32_ERROR;
    static INIT: OnceLock<Option<usize>> = OnceLock::new();
    static GET: OnceLock<Option<usize>> = OnceLock::new();
    let init = *INIT.get_or_init(|| system_proc("iphlpapi.dll", c"InitializeIpInterfaceEntry"));
    let get = *GET.get_or_init(|| system_proc("iphlpapi.dll", c"GetIpInterfaceEntry"));
    // Without GetIpInterfaceEntry (Wine) the interface metric is unknown; 0 keeps the route
    // metric alone, which still orders routes on one interface correctly.
    let (Some(init), Some(get)) = (init, get) else { return 0 };
    // SAFETY: addresses from GetProcAddress for these exports, whose signatures (netioapi.h) are
    // `Init`/`Get`; the row is a zeroed POD struct we own, initialised as the API requires.
    unsafe {
        let (init, get): (Init, Get) =
            (std::mem::transmute::<usize, Init>(init), std::mem::transmute::<usize, Get>(get));
        let mut row: MIB_IPINTERFACE_ROW = std::mem::zeroed();
        init(&mut row);
        row.Family = family;
        row.InterfaceIndex = ifindex;
        if get(&mut row) == NO_ERROR {
            row.Metric
        } else {
            0
        }
    }
}

/// Set by the IP Helper callbacks, waited on by `wait_network_change`.
#[derive(Default)]
struct ChangeSignal {
    changed: Mutex<bool>,
    cond: Condvar,
}

impl ChangeSignal {
    fn signal(&self) {
        if let Ok(mut c) = self.changed.lock() {
            *c = true;
        }
        self.cond.notify_all();
    }

    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut changed) = self.changed.lock() else { return false };
        while !*changed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            changed = match self.cond.wait_timeout(changed, left) {
                Ok((guard, _)) => guard,
                Err(_) => return false,
            };
        }
        *changed
    }
}

/// A table from GetIpForwardTable2/GetIpNetTable2.
struct MibTable(*const c_void);
impl Drop for MibTable {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the table came from an IP Helper *Table2 call and is freed once.
            unsafe { FreeMibTable(self.0) };
        }
    }
}

fn sockaddr_ip(a: &SOCKADDR_INET) -> Option<IpAddr> {
    // SAFETY: every variant of the union starts with the address family, which says which variant
    // is valid; we read only that one.
    unsafe {
        match a.si_family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::from(a.Ipv4.sin_addr.S_un.S_addr.to_ne_bytes()))),
            AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(a.Ipv6.sin6_addr.u.Byte))),
            _ => None,
        }
    }
}

fn ip_sockaddr(ip: IpAddr) -> SOCKADDR_INET {
    let mut a = SOCKADDR_INET::default();
    match ip {
        IpAddr::V4(v4) => {
            a.Ipv4.sin_family = AF_INET;
            a.Ipv4.sin_addr.S_un.S_addr = u32::from_ne_bytes(v4.octets());
        }
        IpAddr::V6(v6) => {
            a.Ipv6.sin6_family = AF_INET6;
            a.Ipv6.sin6_addr.u.Byte = v6.octets();
        }
    }
    a
}

/// Whether a per-family IP Helper table call succeeded. A family the stack does not serve (IPv6
/// disabled, or Wine, which has no IPv6 neighbour table) is skipped rather than failing the whole
/// query; IPv4 failing is an error, since the gateway fingerprint depends on it.
fn family_ok(what: &'static str, family: ADDRESS_FAMILY, rc: WIN32_ERROR) -> PResult<bool> {
    const ERROR_INVALID_FUNCTION: WIN32_ERROR = WIN32_ERROR(1);
    match rc {
        NO_ERROR => Ok(true),
        ERROR_NOT_FOUND => Ok(false), // an empty table
        ERROR_INVALID_FUNCTION | ERROR_NOT_SUPPORTED if family == AF_INET6 => Ok(false),
        code => Err(os_err(what, code.0)),
    }
}
