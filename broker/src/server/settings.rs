//! Changing settings while the broker runs (UPDATE_BROKER_CONFIG, `mqadmin
//! updateBrokerConfig`): checked as broker.conf is, applied at once, and saved to the
//! broker.conf the broker was started with.

use std::io::Write;
use std::path::Path;

use super::{Broker, AUTO_CREATE_TOPIC, PERM_INHERIT, PERM_READ, PERM_WRITE};
use crate::remoting::{RemotingCommand, ResponseCode};

impl Broker {
    /// Applies the settings a request's body carries (properties text) and saves them.
    pub(super) async fn update_config(&self, req: &RemotingCommand) -> RemotingCommand {
        let Ok(text) = std::str::from_utf8(&req.body) else {
            return req.error_to(ResponseCode::SystemError, "the settings are not UTF-8 text");
        };
        // One update at a time: each starts from the settings the last one left, and saves
        // what an earlier one could not.
        let mut unsaved = self.updating_cfg.lock().await;
        let current = self.cfg.load_full();
        let (next, changed) = match current.updated(text) {
            Ok(u) => u,
            Err(e) => return req.error_to(ResponseCode::SystemError, e.to_string()),
        };
        for (key, value) in &changed {
            unsaved.retain(|(k, _)| k != key);
            unsaved.push((key.clone(), value.clone()));
        }
        let saved = if unsaved.is_empty() {
            Ok(())
        } else {
            match next.config_file.clone() {
                Some(path) => {
                    let lines = unsaved.clone();
                    let saving = move || save(&path, &lines).map_err(|e| (path, e));
                    match tokio::task::spawn_blocking(saving).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err((path, e))) => {
                            Err(format!("saving it to {} failed ({e})", path.display()))
                        }
                        Err(e) => Err(format!("saving it failed ({e})")),
                    }
                }
                None => Err("the broker was started without a broker.conf to save it to".into()),
            }
        };
        if saved.is_ok() {
            unsaved.clear();
        }
        if !changed.is_empty() {
            self.cfg.store(std::sync::Arc::new(next));
            tracing::info!(settings = ?changed, saved = saved.is_ok(), "settings changed");
            self.settings_changed(&current, &changed);
        }
        match saved {
            Ok(()) => req.response_to(ResponseCode::Success),
            // Applied all the same (as Java's broker does): what the change is for, say more
            // room on a full disk, is wanted now. The answer says it will not outlive a
            // restart; the next update tries to save it again.
            Err(why) => {
                tracing::warn!(reason = %why, "changed settings last until the broker restarts");
                let mut resp = req.response_to(ResponseCode::Success);
                resp.remark = Some(format!(
                    "applied, but only until the broker restarts: {why}; where broker.conf is \
                     generated (by the operator, from the BrokerCluster's broker.config), change \
                     it there"
                ));
                resp
            }
        }
    }

    /// What a changed setting needs beyond being read where it is used.
    fn settings_changed(&self, before: &crate::config::BrokerConfig, changed: &[(String, String)]) {
        let cfg = self.cfg();
        let mut register = false;
        for (key, _) in changed {
            match key.as_str() {
                // Registrations lend topics only what the broker allows; name servers take
                // them again only under a new data version.
                "brokerPermission" => {
                    self.perm_changes
                        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    register = true;
                }
                "namesrvAddr" => register = true,
                // Producers find where to create topics through the default topic's route.
                "autoCreateTopicEnable"
                    if cfg.auto_create_topic && !before.auto_create_topic && self.is_master() =>
                {
                    if let Err(e) = self.ensure_topic(
                        AUTO_CREATE_TOPIC,
                        cfg.default_topic_queue_nums,
                        PERM_INHERIT | PERM_READ | PERM_WRITE,
                    ) {
                        tracing::warn!(error = %e, "creating the default topic failed");
                    }
                }
                _ => {}
            }
        }
        if register {
            self.topics_changed.notify_one();
        }
    }
}

/// Writes `changed` (broker.conf keys and values) into the broker.conf at `path`: each in
/// place of the line that set it, the others appended; comments and other lines are kept. The
/// file is replaced whole (a new file renamed over it), so a crash leaves the old or the new.
fn save(path: &Path, changed: &[(String, String)]) -> std::io::Result<()> {
    // A linked broker.conf keeps its link: the file it points to is replaced.
    let path = std::fs::canonicalize(path)?;
    let text = std::fs::read_to_string(&path)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut written = vec![false; changed.len()];
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.lines() {
        let t = line.trim();
        let key = (!t.starts_with('#') && !t.starts_with('!'))
            .then(|| t.find(['=', ':']).map(|i| t[..i].trim()))
            .flatten();
        match key.and_then(|k| {
            changed
                .iter()
                .position(|(c, _)| c == crate::config::setting(k))
        }) {
            Some(i) => {
                // broker.conf sets each setting once (a second line is refused at start).
                if !written[i] {
                    out.push_str(&format!("{}={}\n", changed[i].0, changed[i].1));
                    written[i] = true;
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for ((key, value), _) in changed.iter().zip(&written).filter(|(_, w)| !**w) {
        out.push_str(&format!("{key}={value}\n"));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map_or_else(
        || "broker.conf".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let tmp = dir.join(format!(".{name}.new"));
    let written = replace_with(&path, &tmp, out.as_bytes());
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `tmp`, made with `path`'s permissions from the start (a broker.conf may
/// hold `haAuthToken`) and, where allowed, its owner, then renames it over `path`.
fn replace_with(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let meta = std::fs::metadata(path)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(meta.mode() & 0o7777)
        .open(tmp)?;
    // The mode asked for is narrowed by the umask: set it as the original's.
    f.set_permissions(meta.permissions())?;
    // Only root may give a file away; anyone else keeps their own file as it was.
    if let Err(e) = std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid())) {
        if e.kind() != std::io::ErrorKind::PermissionDenied {
            return Err(e);
        }
    }
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saving_replaces_the_lines_that_set_a_setting_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("broker.conf");
        std::fs::write(
            &conf,
            "\u{feff}# my broker\nbrokerName = b\nfileReservedTime: 72\n! old\n\
             haSlaveFallbehindMax=10\n",
        )
        .unwrap();
        // Reached through a link, as a mounted file is.
        let link = dir.path().join("link.conf");
        std::os::unix::fs::symlink(&conf, &link).unwrap();
        let changed = [
            ("fileReservedTime".to_string(), "24".to_string()),
            ("haMaxGapNotInSync".to_string(), "20".to_string()),
            ("maxMessageSize".to_string(), "1024".to_string()),
        ];
        save(&link, &changed).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        let text = std::fs::read_to_string(&conf).unwrap();
        assert_eq!(
            text,
            "# my broker\nbrokerName = b\nfileReservedTime=24\n! old\nhaMaxGapNotInSync=20\n\
             maxMessageSize=1024\n"
        );
        // Its permissions kept (a broker.conf may hold haAuthToken), no file left beside it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600)).unwrap();
        save(&conf, &changed[..1]).unwrap();
        let mode = std::fs::metadata(&conf).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let c = crate::config::BrokerConfig::load(&conf).unwrap();
        assert_eq!(c.file_reserved_hours, 24);
        assert_eq!(c.max_message_size, 1024);
        assert_eq!(c.ha_max_gap, 20);
    }

    #[test]
    fn a_file_that_cannot_be_replaced_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let changed = [("fileReservedTime".to_string(), "24".to_string())];
        assert!(save(&dir.path().join("missing.conf"), &changed).is_err());
        // Readable, in a directory no one may create files in (root included), as a mounted
        // ConfigMap's broker.conf is.
        assert!(save(Path::new("/proc/version"), &changed).is_err());
    }
}
