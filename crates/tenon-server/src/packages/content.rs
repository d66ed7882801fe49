//! Package content on disk, by SHA-256: `ROOT/content/<sha256>`, written through `ROOT/tmp/`
//! and renamed into place only once its hash is known, so a stored file is always whole and is
//! what its name says. Uploads stream: nothing holds more than one body chunk in memory.
//!
//! With several servers on one database, `ROOT` must be shared storage (every server's
//! `--package-dir` points at it), or a device may ask a server for content it never received.

use crate::error::ApiError;
use axum::body::Body;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// The largest upload accepted: large Office or CAD installers are a few GB.
pub const MAX_CONTENT_BYTES: u64 = 16 * 1024 * 1024 * 1024;

pub struct ContentStore {
    root: PathBuf,
}

/// An upload received into a temporary file (deleted when dropped unless kept).
pub struct Received {
    pub file: tempfile::NamedTempFile,
    pub sha256: String,
    pub size: u64,
}

impl ContentStore {
    /// Opens (creating, owner-only) the content directory and clears left-over temporary files.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        for dir in [root.to_path_buf(), root.join("content"), root.join("tmp")] {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            crate::datadir::restrict_dir(&dir)?;
        }
        if let Ok(entries) = std::fs::read_dir(root.join("tmp")) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where content with this hash is (or would be) stored. `sha256` must be 64 lower-case hex
    /// digits (callers check with [`is_sha256`]).
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join("content").join(sha256)
    }

    pub fn has(&self, sha256: &str) -> bool {
        is_sha256(sha256) && self.path_of(sha256).is_file()
    }

    /// Streams `body` into a temporary file, hashing as it goes. Refuses more than `max` bytes
    /// and an empty body; a body that stops midway leaves nothing behind.
    pub async fn receive(&self, body: Body, max: u64) -> Result<Received, ApiError> {
        use http_body_util::BodyExt;
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("cannot create a temporary file for the upload: {e}")))?;
        let handle = tmp.reopen().map_err(|e| write_error(&e))?;
        let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(handle));
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::BadRequest(format!("the upload stopped before its end ({e}); nothing was kept, upload again"))
            })?;
            let Ok(chunk) = frame.into_data() else { continue };
            size += chunk.len() as u64;
            if size > max {
                return Err(ApiError::PayloadTooLarge(format!(
                    "the upload is larger than {} GiB, the most a package may be",
                    max >> 30
                )));
            }
            hasher.update(&chunk);
            writer.write_all(&chunk).await.map_err(|e| write_error(&e))?;
        }
        if size == 0 {
            return Err(ApiError::BadRequest("the upload is empty; give the installer file".into()));
        }
        writer.flush().await.map_err(|e| write_error(&e))?;
        writer.into_inner().sync_all().await.map_err(|e| write_error(&e))?;
        let file = tmp;
        Ok(Received { file, sha256: hex::encode(hasher.finalize()), size })
    }

    /// Moves a received upload to its place (or drops it when that content is stored already).
    pub fn keep(&self, r: Received) -> Result<PathBuf, ApiError> {
        let path = self.path_of(&r.sha256);
        if path.is_file() && std::fs::metadata(&path).map(|m| m.len()).ok() == Some(r.size) {
            return Ok(path);
        }
        r.file.persist(&path).map_err(|e| write_error(&e.error))?;
        Ok(path)
    }

    /// Deletes stored content (no longer referenced by any package).
    pub fn remove(&self, sha256: &str) {
        if is_sha256(sha256) {
            let _ = std::fs::remove_file(self.path_of(sha256));
        }
    }
}

fn write_error(e: &std::io::Error) -> ApiError {
    if e.raw_os_error() == Some(28) {
        return ApiError::Unavailable {
            detail: "the server's disk is full: free space in the package directory, then upload again".into(),
            retry_after_secs: 60,
        };
    }
    ApiError::Internal(anyhow::anyhow!("cannot write the upload to the package directory: {e}"))
}

pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What an MSI says about itself (its `Property` table).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MsiFacts {
    pub product_code: String,
    pub product_version: String,
    pub product_name: String,
    /// Empty when the MSI has none.
    pub upgrade_code: String,
}

/// Reads ProductCode, ProductVersion and ProductName from an MSI database; an error says why the
/// file is not a usable MSI.
pub fn read_msi(path: &Path) -> Result<MsiFacts, String> {
    let mut pkg = msi::open(path).map_err(|e| format!("it is not an MSI database ({e})"))?;
    let usable = pkg.get_table("Property").is_some_and(|t| t.has_column("Property") && t.has_column("Value"));
    if !usable {
        return Err("it has no Property table, so it is not an installable MSI".into());
    }
    let mut facts = MsiFacts::default();
    let rows = pkg
        .select_rows(msi::Select::table("Property"))
        .map_err(|e| format!("its Property table cannot be read ({e})"))?;
    for row in rows {
        let (Some(k), Some(v)) = (row["Property"].as_str(), row["Value"].as_str()) else { continue };
        let v = v.chars().filter(|c| !c.is_control()).take(256).collect::<String>();
        match k {
            "ProductCode" => facts.product_code = v,
            "ProductVersion" => facts.product_version = v,
            "ProductName" => facts.product_name = v,
            "UpgradeCode" => facts.upgrade_code = v,
            _ => {}
        }
    }
    if facts.product_code.is_empty() {
        return Err("it has no ProductCode property".into());
    }
    tenon_core::packages::normalise_product_code(&facts.product_code)
        .map(|c| facts.product_code = c)
        .map_err(|e| format!("its ProductCode {:?} is not a GUID ({e})", facts.product_code))?;
    Ok(facts)
}
