//! Follow the local mesh file: every proxy polls it and applies a changed
//! file only when it validates (plus the caller's own checks), so a bad
//! edit never replaces a good model. Both outcomes are logged and reported
//! to the caller (for its `config_updates` counter).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{FieldError, MeshModel, ModelError};

/// Poll `path` every `interval` until `tx` has no receivers. `loaded` is
/// the content the current model was built from (so a change made between
/// loading and the first poll is not missed). `check(current, next)` may
/// veto an update with a reason naming the field; `on_update` is told
/// whether each change was applied.
pub async fn follow_mesh_file(
    path: PathBuf,
    loaded: Vec<u8>,
    interval: Duration,
    tx: watch::Sender<Arc<MeshModel>>,
    check: impl Fn(&MeshModel, &MeshModel) -> Result<(), FieldError>,
    on_update: impl Fn(bool),
) {
    let name = path.display().to_string();
    let mut last = Some(loaded);
    while !tx.is_closed() {
        tokio::time::sleep(interval).await;
        let now = match tokio::fs::read(&path).await {
            Ok(b) => Some(b),
            Err(e) => {
                if last.is_some() {
                    tracing::error!(file = %name, error = %e, "cannot read mesh file; keeping the last good model");
                    on_update(false);
                }
                None
            }
        };
        if now.is_none() || now == last {
            last = now.or(last);
            continue;
        }
        let bytes = now.expect("checked above");
        let text = String::from_utf8_lossy(&bytes);
        let result = MeshModel::from_yaml(&text, &name).and_then(|next| {
            let current = tx.borrow().clone();
            if next.trust_domain != current.trust_domain {
                return Err(ModelError {
                    source_name: name.clone(),
                    field: "trustDomain".into(),
                    reason: format!(
                        "cannot change from {:?} while running; restart",
                        current.trust_domain
                    ),
                });
            }
            check(&current, &next).map_err(|e| e.in_source(&name))?;
            Ok(next)
        });
        match result {
            Ok(m) => {
                tracing::info!(file = %name, workloads = m.workloads.len(), services = m.services.len(), "mesh model updated");
                on_update(true);
                tx.send_replace(Arc::new(m));
            }
            Err(e) => {
                tracing::error!(error = %e, "mesh file update rejected; keeping the last good model");
                on_update(false);
            }
        }
        last = Some(bytes);
    }
}
