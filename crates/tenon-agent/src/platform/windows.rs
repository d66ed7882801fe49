//! The Windows platform: real Win32, WMI and DPAPI calls (being built).
