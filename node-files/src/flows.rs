//! Denied-connection records: the JSON-lines file the agent writes under the node's
//! log directory and `sluicectl flows` reads. One record per line, schema as
//! [`FlowRecord`]; the file is bounded: past [`MAX_FILE_BYTES`] it is rotated to
//! `<file>.1` (replacing the previous one), so the two together never exceed twice
//! that.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Size at which the record file is rotated.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// One denied (or, later, allowed) connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub node: String,
    /// `deny` (or `allow`).
    pub verdict: String,
    /// `ingress` or `egress`, seen from the pod the decision protects.
    pub direction: String,
    /// `NS/POD` or `ip:ADDR`.
    pub src: String,
    pub dst: String,
    /// `TCP`, `UDP`, `SCTP` (or the IP protocol number).
    pub protocol: String,
    pub port: u16,
    /// `isolated`, `denied-by-rule`, `pod-not-yet-programmed`, `spoofed`,
    /// `tunnel-guard`.
    pub reason: String,
    /// `NS/NAME` of each deciding policy.
    pub policies: Vec<String>,
}

impl FlowRecord {
    /// The namespaces a record concerns (of its source and destination pods).
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        [&self.src, &self.dst]
            .into_iter()
            .filter(|e| !e.starts_with("ip:"))
            .filter_map(|e| e.split_once('/').map(|(ns, _)| ns))
    }

    /// One line for people: `TIME NODE VERDICT DIR SRC -> DST PROTO/PORT REASON POLICIES`.
    pub fn text(&self) -> String {
        let policies = if self.policies.is_empty() {
            "-".to_string()
        } else {
            self.policies.join(",")
        };
        format!(
            "{} {} {} {} {} -> {} {}/{} {} {}",
            self.time,
            self.node,
            self.verdict,
            self.direction,
            self.src,
            self.dst,
            self.protocol,
            self.port,
            self.reason,
            policies
        )
    }
}

/// `time` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(time: SystemTime) -> String {
    let d = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The rotated predecessor of `path`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Appends records to the file, rotating it when it grows past `max_bytes`.
pub struct FlowFile {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    size: u64,
}

impl FlowFile {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<FlowFile> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(FlowFile {
            path: path.to_path_buf(),
            max_bytes,
            file,
            size,
        })
    }

    pub fn append(&mut self, record: &FlowRecord) -> io::Result<()> {
        let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
        line.push('\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            fs::rename(&self.path, rotated(&self.path))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = 0;
        }
        // One write per line: a reader never sees half a record from this writer.
        self.file.write_all(line.as_bytes())?;
        self.size += line.len() as u64;
        Ok(())
    }
}

/// Every record in the rotated file then the current one, oldest first; lines that
/// do not parse (a torn last line) are skipped.
pub fn read_records(path: &Path) -> io::Result<Vec<FlowRecord>> {
    let mut out = Vec::new();
    for p in [rotated(path), path.to_path_buf()] {
        match File::open(&p) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    if let Ok(r) = serde_json::from_str(&line?) {
                        out.push(r);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(port: u16) -> FlowRecord {
        FlowRecord {
            time: "2026-12-06T07:00:00.000Z".into(),
            node: "node-2".into(),
            verdict: "deny".into(),
            direction: "ingress".into(),
            src: "default/client".into(),
            dst: "prod/db".into(),
            protocol: "TCP".into(),
            port,
            reason: "isolated".into(),
            policies: vec!["prod/deny-all".into()],
        }
    }

    #[test]
    fn rfc3339_spells_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_540_400_123);
        assert_eq!(rfc3339(t), "2026-12-06T07:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn records_serialize_with_the_documented_field_names() {
        let v: serde_json::Value = serde_json::to_value(record(80)).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "time",
            "node",
            "verdict",
            "direction",
            "src",
            "dst",
            "protocol",
            "port",
            "reason",
            "policies",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert_eq!(v["port"], 80);
    }

    #[test]
    fn the_file_rotates_and_never_holds_more_than_twice_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/flows.jsonl");
        let mut f = FlowFile::open(&path, 1000).unwrap();
        for port in 0..200 {
            f.append(&record(port)).unwrap();
        }
        let total =
            fs::metadata(&path).unwrap().len() + fs::metadata(rotated(&path)).unwrap().len();
        assert!(total <= 2000, "{total}");
        let got = read_records(&path).unwrap();
        assert_eq!(got.last().unwrap().port, 199);
        assert!(got.windows(2).all(|w| w[0].port + 1 == w[1].port));
    }
}
