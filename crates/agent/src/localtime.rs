//! The machine's local time and boot id, which the install window and "restart needed" use.
use updraft_core::policy::LocalTime;

/// The local weekday, hour and minute now.
pub fn now() -> LocalTime {
    // SAFETY: `time` with a null pointer only returns the time; `localtime_r` writes into the
    // zeroed `tm` we own and reads the `time_t` we pass by reference.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return LocalTime { weekday: 0, hour: 0, minute: 0 };
        }
        LocalTime { weekday: tm.tm_wday, hour: tm.tm_hour, minute: tm.tm_min }
    }
}

/// Changes at every boot; lets the agent tell that the machine restarted since an install.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}
