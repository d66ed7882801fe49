//! Reading a signature template from the admin's disk: the HTML (in the encodings Word and editors
//! save), an optional text version, and the images the HTML references, base64 for the upload.

use base64::Engine;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tenon_core::policy::signatures::{check_file_name, image_file_name, image_references};

#[derive(Debug, thiserror::Error)]
pub enum TemplateFileError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {reference:?} referenced by {html} does not exist at {path}; put it there or fix the reference")]
    MissingImage { reference: String, html: PathBuf, path: PathBuf },
    #[error("{html} references two different images named {name:?} ({first} and {second}); images are delivered by file name, so rename one")]
    DuplicateImage { html: PathBuf, name: String, first: String, second: String },
    #[error("image {reference:?} referenced by {html}: {why}")]
    BadImageName { reference: String, html: PathBuf, why: String },
}

/// A template as read from disk, ready for `PUT /admin/signatures/{name}`.
#[derive(Debug, PartialEq)]
pub struct TemplateFiles {
    pub html: String,
    pub txt: Option<String>,
    /// Image file name -> base64.
    pub images: BTreeMap<String, String>,
}

pub fn read_template(html_path: &Path, txt_path: Option<&Path>) -> Result<TemplateFiles, TemplateFileError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| TemplateFileError::Read { what, path: path.to_path_buf(), source })
    };
    let html = decode_text(&read("HTML file", html_path)?);
    let txt = match txt_path {
        Some(p) => Some(decode_text(&read("text file", p)?)),
        None => None,
    };
    let dir = html_path.parent().unwrap_or(Path::new("."));
    let mut images = BTreeMap::new();
    let mut sources: BTreeMap<String, String> = BTreeMap::new();
    for reference in image_references(&html) {
        let name = image_file_name(&reference).to_string();
        check_file_name("image", &name).map_err(|e| TemplateFileError::BadImageName {
            reference: reference.clone(),
            html: html_path.to_path_buf(),
            why: e.to_string(),
        })?;
        // References are URLs: `/` separated, relative to the HTML file (a leading `/` too, as
        // there is no web root on a disk).
        let path = reference
            .split(['/', '\\'])
            .filter(|c| !c.is_empty() && *c != ".")
            .fold(dir.to_path_buf(), |p, c| p.join(c));
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TemplateFileError::MissingImage { reference, html: html_path.to_path_buf(), path })
            }
            Err(source) => return Err(TemplateFileError::Read { what: "image", path, source }),
        };
        let data = base64::engine::general_purpose::STANDARD.encode(bytes);
        match images.get(&name) {
            Some(existing) if *existing != data => {
                return Err(TemplateFileError::DuplicateImage {
                    html: html_path.to_path_buf(),
                    name,
                    first: sources.get(image_file_name(&reference)).cloned().unwrap_or_default(),
                    second: reference,
                })
            }
            Some(_) => {}
            None => {
                sources.insert(name.clone(), reference);
                images.insert(name, data);
            }
        }
    }
    Ok(TemplateFiles { html, txt, images })
}

/// Text as editors save it: UTF-8 (with or without BOM), UTF-16 with BOM, or else Windows-1252,
/// which is what Word writes for "Web Page, Filtered" on Western European systems.
pub fn decode_text(bytes: &[u8]) -> String {
    if let Some(rest) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
        return String::from_utf8_lossy(rest).into_owned();
    }
    let utf16 = |rest: &[u8], le: bool| {
        let units: Vec<u16> = rest
            .chunks_exact(2)
            .map(|c| if le { u16::from_le_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], c[1]]) })
            .collect();
        String::from_utf16_lossy(&units)
    };
    if let Some(rest) = bytes.strip_prefix(b"\xFF\xFE") {
        return utf16(rest, true);
    }
    if let Some(rest) = bytes.strip_prefix(b"\xFE\xFF") {
        return utf16(rest, false);
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.iter().map(|&b| windows_1252(b)).collect(),
    }
}

fn windows_1252(b: u8) -> char {
    const HIGH: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž', '\u{8f}', '\u{90}', '‘',
        '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}', 'ž', 'Ÿ',
    ];
    match b {
        0x80..=0x9f => HIGH[(b - 0x80) as usize],
        _ => b as char,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_editors_save() {
        let check = |bytes: &[u8], expected: &str| assert_eq!(decode_text(bytes), expected);
        check(b"plain", "plain");
        check("Grüße 東京".as_bytes(), "Grüße 東京");
        check(b"\xEF\xBB\xBFGr\xC3\xBC\xC3\x9Fe", "Grüße");
        check(b"\xFF\xFEG\x00\xFC\x00", "Gü");
        check(b"\xFE\xFF\x00G\x00\xFC", "Gü");
        check(b"Gr\xFC\xDFe \x80 \x93x\x94", "Grüße € “x”");
    }

    #[test]
    fn reads_referenced_images_relative_to_the_html() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("img")).unwrap();
        std::fs::write(tmp.path().join("img/logo.png"), b"PNG").unwrap();
        std::fs::write(tmp.path().join("bg.gif"), b"GIF").unwrap();
        let html = tmp.path().join("sig.htm");
        std::fs::write(
            &html,
            "<td background=bg.gif><img src=\"img/logo.png\"><img src='./img/logo.png'><img src=\"https://x/y.png\">",
        )
        .unwrap();
        let t = read_template(&html, None).unwrap();
        assert_eq!(t.images.len(), 2);
        assert_eq!(t.images["logo.png"], "UE5H");
        assert_eq!(t.images["bg.gif"], "R0lG");
        assert_eq!(t.txt, None);

        std::fs::write(&html, "<img src=\"img/missing.png\">").unwrap();
        match read_template(&html, None) {
            Err(TemplateFileError::MissingImage { reference, .. }) => assert_eq!(reference, "img/missing.png"),
            other => panic!("expected MissingImage, got {other:?}"),
        }
        std::fs::write(tmp.path().join("logo.png"), b"OTHER").unwrap();
        std::fs::write(&html, "<img src=\"img/logo.png\"><img src=\"logo.png\">").unwrap();
        assert!(matches!(read_template(&html, None), Err(TemplateFileError::DuplicateImage { .. })));
        assert!(matches!(
            read_template(&tmp.path().join("nope.htm"), None),
            Err(TemplateFileError::Read { what: "HTML file", .. })
        ));
    }
}
