//! One line per event, to stderr or to the config's `logFile` (never stdout: stdout
//! belongs to the CNI result).

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

static SINK: Mutex<Option<Box<dyn Write + Send>>> = Mutex::new(None);
static PREFIX: Mutex<String> = Mutex::new(String::new());

/// Send later lines to `file` (appended; its directory is created). If it cannot be
/// opened, keep stderr and say so there: a log path must never fail a pod.
pub fn to_file(file: &Path) {
    let opened = file
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
        });
    match opened {
        Ok(f) => *SINK.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f)),
        Err(e) => eprintln!(
            "sluice: cannot open log file {}: {e}; logging to stderr",
            file.display()
        ),
    }
}

/// What each line starts with after the time, e.g. `ADD abc123/eth0`.
pub fn set_context(ctx: String) {
    *PREFIX.lock().unwrap_or_else(|e| e.into_inner()) = ctx;
}

pub fn line(msg: &str) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let prefix = PREFIX.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let text = format!(
        "{}.{:03} sluice[{}] {prefix}: {msg}\n",
        now.as_secs(),
        now.subsec_millis(),
        std::process::id()
    );
    let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    match sink.as_mut() {
        Some(w) => {
            let _ = w.write_all(text.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
}

/// `log!("…", args)`: format and write one line.
macro_rules! log {
    ($($t:tt)*) => { $crate::log::line(&format!($($t)*)) };
}
pub(crate) use log;
