//! Outlook signatures: templates with RealmJoin's `{{Graph_User_*}}` placeholders, resolved per user
//! on the server, rendered per signed-in user on the device. Everything here is pure.
//!
//! # Server side
//! Admins store [`SignatureTemplate`]s (name, HTML, optional text version, optional default use,
//! assigned groups, images). A template must be assigned to at least one group; the built-in group
//! `"All Users"` ([`GroupName::ALL_USERS`]) contains everyone ([`SignatureTemplate::validate`]).
//! When compiling a user's effective config, the server calls [`user_signature_config`] and
//! object-merges the result at the key `Signatures` (so `Signatures.Options.*`, an ordinary setting,
//! survives next to it). The value it returns, and the agent reads, is exactly:
//!
//! ```json
//! {
//!   "Templates": {
//!     "NAME": {
//!       "html": "<p>{{Graph_User_DisplayName}}</p>...",   // the template, placeholders unfilled
//!       "txt": "{{Graph_User_DisplayName}}\n...",           // only when the admin gave a text version
//!       "default": "new" | "reply" | "both",               // only when set
//!       "images": {"logo.png": "<base64>"}                 // always present, maybe empty
//!     }
//!   },
//!   "Values": {"Graph_User_DisplayName": "Anna Berg", "Graph_User_FaxNumber": "", ...}
//! }
//! ```
//!
//! `Values` holds every placeholder of [`placeholder_names`], empty when the directory has nothing
//! (so a changed job title changes the config hash and reaches the device at its next sync).
//! `Templates` holds the templates assigned to any of the user's groups; when it is empty the agent
//! removes the signatures Tenon wrote for that user. Settings the agent also reads:
//! `Signatures.Options.IncludeUpnInName` (bool, default false): name the files
//! `NAME (user@domain).*` instead of `NAME.*`, so signatures of several mailboxes do not collide
//! when Outlook roams signatures.
//!
//! # Rendering ([`render`])
//! - Placeholders are `{{Name}}`, spaces inside the braces tolerated, names matched exactly and
//!   then ignoring ASCII case. A name missing from `Values` renders empty and is reported in
//!   [`Rendered::unknown`], so an admin sees typos.
//! - `.htm`: values HTML-escaped (also inside attributes, `href="mailto:{{Graph_User_Mail}}"`);
//!   the rest of the template comes out byte for byte. A multi-line value (a two-line street
//!   address) keeps its breaks: `<br>` in HTML text, a space in attributes, CRLF in `.txt`.
//! - A **line** whose placeholders are all empty (or blank) drops out entirely, with its label. In
//!   HTML a line is: the content between `<br>`s and block boundaries, looking through inline
//!   elements (`<span>`, `<b>`, `<a>`...); one `<br>` goes with it. A `<p>`, `<div>`, `<li>`,
//!   `<h1>`-`<h6>`, `<dt>`, `<dd>` or `<tr>` that has nothing visible left after that goes too. A
//!   table row whose cells each hold at most one line (label cell + value cell, also Word's
//!   `<td><p>..</p></td>`) is one line as a whole. A line without placeholders never drops.
//!   Placeholders inside attributes are filled but do not decide whether a line drops. Empty inline
//!   tags of a dropped line (`<b></b>`) stay, which keeps the markup balanced and shows nothing.
//! - `.txt`: the text template (its lines dropped by the same rule), or else derived from the
//!   rendered HTML: tags stripped, entities decoded, `<br>` and block ends become line breaks,
//!   cells of a row are separated by a space, runs of blank lines collapse to one. CRLF line ends.
//! - `.rtf`: the text in a minimal RTF document, `\`, `{`, `}` escaped, non-ASCII as `\uN?`.
//! - On disk ([`UserPlan`]) `.htm` and `.txt` are UTF-8 with a byte order mark, which Outlook and
//!   Word honour over a template's own `charset` declaration; `.rtf` is plain ASCII.
//! - Images: a relative `src` in the HTML whose file name matches an image of the template is
//!   pointed at `BASE_files/NAME` ([`link_images`]), the folder the images are written to.
//!
//! The agent side is [`parse_user_signatures`] -> [`plan_user`] -> [`sync_files`].

mod html;
mod render;

pub use render::{escape_html, placeholders, render, render_html, render_text, text_to_rtf, Rendered};

use crate::canonical::sha256_hex;
use crate::ids::GroupName;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// What can be wrong with a template or a delivered signature config.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("{what} name {name:?} cannot be used as a Windows file name: {why}")]
    BadFileName { what: &'static str, name: String, why: &'static str },
    #[error("signature {0:?} is assigned to no group; assign it to a group or to \"All Users\"")]
    NoGroups(String),
    #[error("image {image:?} of signature {template:?} is not valid base64")]
    BadImage { template: String, image: String },
    #[error("the Signatures config is malformed: {0}")]
    BadConfig(String),
}

/// Which Outlook default a signature becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultUse {
    New,
    Reply,
    Both,
}

impl DefaultUse {
    pub fn for_new(self) -> bool {
        matches!(self, Self::New | Self::Both)
    }
    pub fn for_reply(self) -> bool {
        matches!(self, Self::Reply | Self::Both)
    }
}

impl std::str::FromStr for DefaultUse {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "new" => Ok(Self::New),
            "reply" => Ok(Self::Reply),
            "both" => Ok(Self::Both),
            _ => Err(format!("{s:?} is not one of new, reply, both")),
        }
    }
}

/// A signature template as the server stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureTemplate {
    /// File name without extension: `Corporate` becomes `Corporate.htm`, ...
    pub name: String,
    pub html: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<DefaultUse>,
    /// The groups whose members get it; `"All Users"` for everyone. Never empty.
    pub groups: Vec<String>,
    /// Image file name -> content, base64 (standard alphabet).
    #[serde(default)]
    pub images: BTreeMap<String, String>,
}

impl SignatureTemplate {
    /// Checks what the server must reject before storing: a usable name, at least one group, image
    /// names usable as file names and image data that decodes.
    pub fn validate(&self) -> Result<(), SignatureError> {
        check_file_name("signature", &self.name)?;
        if self.groups.iter().all(|g| g.trim().is_empty()) {
            return Err(SignatureError::NoGroups(self.name.clone()));
        }
        for (image, data) in &self.images {
            check_file_name("image", image)?;
            decode_image(&self.name, image, data)?;
        }
        Ok(())
    }

    fn assigned_to(&self, user_groups: &[String]) -> bool {
        self.groups
            .iter()
            .map(|g| g.trim())
            .any(|g| g == GroupName::ALL_USERS || user_groups.iter().any(|u| u.trim() == g))
    }
}

/// Checks that `name` is usable as one Windows file name component (it becomes part of a path in
/// the user's profile, so this is also what keeps a config from writing elsewhere).
pub fn check_file_name(what: &'static str, name: &str) -> Result<(), SignatureError> {
    let bad = |why| Err(SignatureError::BadFileName { what, name: name.to_string(), why });
    if name.trim().is_empty() {
        return bad("it is empty");
    }
    if name.chars().count() > 120 {
        return bad("it is longer than 120 characters");
    }
    if name.chars().any(|c| c.is_control() || "\\/:*?\"<>|".contains(c)) {
        return bad("it contains one of \\ / : * ? \" < > | or a control character");
    }
    if name.ends_with(['.', ' ']) || name.starts_with(' ') {
        return bad("it starts with a space or ends with a dot or space");
    }
    let stem = name.split('.').next().unwrap_or("").trim_end().to_ascii_uppercase();
    let reserved = ["CON", "PRN", "AUX", "NUL"].contains(&stem.as_str())
        || (stem.len() == 4
            && (stem.starts_with("COM") || stem.starts_with("LPT"))
            && stem.as_bytes()[3].is_ascii_digit());
    if reserved {
        return bad("it is a reserved device name");
    }
    Ok(())
}

fn decode_image(template: &str, image: &str, data: &str) -> Result<Vec<u8>, SignatureError> {
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|_| SignatureError::BadImage { template: template.to_string(), image: image.to_string() })
}

/// The placeholder prefix RealmJoin templates use.
pub const PLACEHOLDER_PREFIX: &str = "Graph_User_";

/// Placeholder suffix -> property of a Microsoft Graph `user` object.
const DIRECTORY_FIELDS: [(&str, &str); 16] = [
    ("DisplayName", "displayName"),
    ("GivenName", "givenName"),
    ("Surname", "surname"),
    ("JobTitle", "jobTitle"),
    ("Department", "department"),
    ("CompanyName", "companyName"),
    ("Mail", "mail"),
    ("MobilePhone", "mobilePhone"),
    ("FaxNumber", "faxNumber"),
    ("OfficeLocation", "officeLocation"),
    ("StreetAddress", "streetAddress"),
    ("City", "city"),
    ("PostalCode", "postalCode"),
    ("State", "state"),
    ("Country", "country"),
    ("Id", "id"),
];

/// The placeholder for `onPremisesExtensionAttributes.extensionAttribute{n}`. RealmJoin's exact
/// spelling for these could not be confirmed from public material; this is the natural one after
/// the other `Graph_User_*` names, and [`render`] matches names ignoring case.
fn extension_placeholder(n: u8) -> String {
    format!("{PLACEHOLDER_PREFIX}ExtensionAttribute{n}")
}

/// Every placeholder name the server fills, in a stable order.
pub fn placeholder_names() -> Vec<String> {
    let mut names: Vec<String> = DIRECTORY_FIELDS.iter().map(|(p, _)| format!("{PLACEHOLDER_PREFIX}{p}")).collect();
    names.push(format!("{PLACEHOLDER_PREFIX}BusinessPhone"));
    names.extend((1..=15).map(extension_placeholder));
    names
}

/// Resolves every placeholder of [`placeholder_names`] from a Graph-shaped user object.
/// `BusinessPhone` is the first of `businessPhones`; missing or null fields give "".
pub fn directory_values(user: &Value) -> BTreeMap<String, String> {
    fn text(v: Option<&Value>) -> String {
        match v {
            Some(Value::String(s)) => s.trim().to_string(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            _ => String::new(),
        }
    }
    let mut values: BTreeMap<String, String> = DIRECTORY_FIELDS
        .iter()
        .map(|(placeholder, field)| (format!("{PLACEHOLDER_PREFIX}{placeholder}"), text(user.get(field))))
        .collect();
    let phone = user.get("businessPhones").and_then(Value::as_array).and_then(|a| a.first());
    values.insert(format!("{PLACEHOLDER_PREFIX}BusinessPhone"), text(phone));
    let ext = user.get("onPremisesExtensionAttributes");
    for n in 1..=15u8 {
        let v = ext.and_then(|e| e.get(format!("extensionAttribute{n}")));
        values.insert(extension_placeholder(n), text(v));
    }
    values
}

/// What the server puts at `Signatures` in the effective config of a user who is in
/// `user_groups` (not counting "All Users", which everyone is in). Shape: see the module docs.
pub fn user_signature_config(templates: &[SignatureTemplate], user_groups: &[String], user: &Value) -> Value {
    let mut out = Map::new();
    for t in templates.iter().filter(|t| t.assigned_to(user_groups)) {
        let mut entry = Map::new();
        entry.insert("html".into(), Value::String(t.html.clone()));
        if let Some(txt) = &t.txt {
            entry.insert("txt".into(), Value::String(txt.clone()));
        }
        if let Some(d) = t.default {
            entry.insert("default".into(), json!(d));
        }
        entry.insert("images".into(), json!(t.images));
        out.insert(t.name.clone(), Value::Object(entry));
    }
    json!({"Templates": out, "Values": directory_values(user)})
}

/// One template as delivered to the device.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct DeliveredTemplate {
    pub html: String,
    #[serde(default)]
    pub txt: Option<String>,
    #[serde(default)]
    pub default: Option<DefaultUse>,
    #[serde(default)]
    pub images: BTreeMap<String, String>,
}

/// A user's signature config as the agent reads it from `users[upn]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserSignatures {
    pub templates: BTreeMap<String, DeliveredTemplate>,
    pub values: BTreeMap<String, String>,
    pub include_upn_in_name: bool,
}

/// Reads `Signatures` from a user's effective config. No `Signatures` key means no templates.
pub fn parse_user_signatures(user_config: &Map<String, Value>) -> Result<UserSignatures, SignatureError> {
    let Some(sig) = user_config.get("Signatures") else { return Ok(UserSignatures::default()) };
    let bad = |what: &str, e: serde_json::Error| SignatureError::BadConfig(format!("{what}: {e}"));
    let templates = match sig.get("Templates") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(t) => serde_json::from_value(t.clone()).map_err(|e| bad("Signatures.Templates", e))?,
    };
    let values = match sig.get("Values") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| bad("Signatures.Values", e))?,
    };
    let include_upn_in_name = match sig.get("Options").and_then(|o| o.get("IncludeUpnInName")) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(SignatureError::BadConfig(format!(
                "Signatures.Options.IncludeUpnInName must be true or false, not {other}"
            )))
        }
    };
    Ok(UserSignatures { templates, values, include_upn_in_name })
}

/// The file name stem of a signature: `NAME` or, for roaming signatures, `NAME (user@domain)`.
pub fn file_base(name: &str, upn: &str, include_upn: bool) -> String {
    if include_upn {
        format!("{name} ({upn})")
    } else {
        name.to_string()
    }
}

/// Attributes that reference an image file: `src` (`<img>`, Word's `<v:imagedata>`) and
/// `background` (`<body>`, `<table>`, `<td>`).
const IMAGE_ATTRIBUTES: [&str; 2] = ["src", "background"];

/// Every relative image reference of `html_src`: the byte range of the attribute value and the
/// value. Absolute URLs (`https:`, `cid:`, `data:`, `//host/...`) are not references to upload.
fn relative_image_attributes(html_src: &str) -> Vec<(std::ops::Range<usize>, String)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(open) = html_src[from..].find('<').map(|p| from + p) {
        let Some(close) = html_src[open..].find('>').map(|p| open + p + 1) else { break };
        from = close;
        let tag = &html_src[open..close];
        let mut hits: Vec<_> = IMAGE_ATTRIBUTES.iter().filter_map(|a| html::attribute(tag, a)).collect();
        hits.sort_by_key(|(range, _)| range.start);
        for (range, value) in hits {
            let v = value.trim();
            if v.is_empty() || v.contains(':') || v.starts_with("//") || v.starts_with('#') {
                continue;
            }
            out.push((open + range.start..open + range.end, value));
        }
    }
    out
}

/// The relative image paths a template's HTML references (`src=`, `background=`), percent-decoded,
/// in order of appearance, each once. The admin tool uploads these files with the template.
pub fn image_references(html_src: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (_, value) in relative_image_attributes(html_src) {
        let path = percent_decode(value.trim());
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// The file name an image reference is delivered under: its last path component.
pub fn image_file_name(reference: &str) -> &str {
    reference.rsplit(['/', '\\']).next().unwrap_or(reference)
}

/// Points relative `src` and `background` attributes whose file name is one of `images` at
/// `BASE_files/IMAGE`, where the images are written. Absolute URLs (`https:`, `cid:`, `data:`)
/// stay as they are.
pub fn link_images<'a>(html_src: &str, base: &str, images: impl IntoIterator<Item = &'a String> + Clone) -> String {
    let mut out = String::with_capacity(html_src.len());
    let mut last = 0;
    for (range, value) in relative_image_attributes(html_src) {
        let file = percent_decode(image_file_name(&value));
        let Some(image) = images.clone().into_iter().find(|i| i.eq_ignore_ascii_case(&file)) else { continue };
        out.push_str(&html_src[last..range.start]);
        out.push_str(&image_href(base, image));
        last = range.end;
    }
    out.push_str(&html_src[last..]);
    out
}

/// The `src` that [`link_images`] gives an image of the signature written as `BASE.htm`:
/// `BASE_files/IMAGE`, each part percent-encoded.
pub fn image_href(base: &str, image: &str) -> String {
    format!("{}/{}", percent_encode(&format!("{base}_files")), percent_encode(image))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~()@!$',;=+".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex =
            b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A rendered template in a user's plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTemplate {
    pub name: String,
    /// File name stem on disk ([`file_base`]).
    pub base: String,
    /// Placeholders without a value (typos?).
    pub unknown: Vec<String>,
}

/// Everything a user's signatures folder should hold, and the Outlook defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserPlan {
    /// Path relative to the Signatures folder, `/`-separated (`Corp.htm`, `Corp_files/logo.png`)
    /// -> exact file content.
    pub files: BTreeMap<String, Vec<u8>>,
    pub templates: Vec<PlannedTemplate>,
    /// Stem for `NewSignature` / `ReplySignature`. When several templates claim a default, the first
    /// by name wins, so the outcome does not depend on delivery order.
    pub new_signature: Option<String>,
    pub reply_signature: Option<String>,
}

const UTF8_BOM: &str = "\u{feff}";

/// Renders every template of `sigs` for the user `upn`.
pub fn plan_user(sigs: &UserSignatures, upn: &str) -> Result<UserPlan, SignatureError> {
    let mut plan = UserPlan::default();
    for (name, t) in &sigs.templates {
        check_file_name("signature", name)?;
        let base = file_base(name, upn, sigs.include_upn_in_name);
        check_file_name("signature", &base)?;
        let r = render(&t.html, t.txt.as_deref(), &sigs.values);
        let htm = link_images(&r.htm, &base, t.images.keys());
        plan.files.insert(format!("{base}.htm"), format!("{UTF8_BOM}{htm}").into_bytes());
        plan.files.insert(format!("{base}.txt"), format!("{UTF8_BOM}{}", r.txt).into_bytes());
        plan.files.insert(format!("{base}.rtf"), r.rtf.into_bytes());
        for (image, data) in &t.images {
            check_file_name("image", image)?;
            plan.files.insert(format!("{base}_files/{image}"), decode_image(name, image, data)?);
        }
        if let Some(d) = t.default {
            if d.for_new() && plan.new_signature.is_none() {
                plan.new_signature = Some(base.clone());
            }
            if d.for_reply() && plan.reply_signature.is_none() {
                plan.reply_signature = Some(base.clone());
            }
        }
        plan.templates.push(PlannedTemplate { name: name.clone(), base, unknown: r.unknown });
    }
    Ok(plan)
}

/// What to do with the files of a user's Signatures folder.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileSync {
    /// Missing or different from the plan: (re)write.
    pub write: Vec<String>,
    /// Tenon wrote them, the plan no longer has them, and they are as Tenon wrote them: delete.
    pub delete: Vec<String>,
    /// Tenon wrote them and the plan no longer has them, but the user changed them since: leave
    /// them alone and stop tracking them; they are the user's now.
    pub release: Vec<String>,
}

/// Decides the file operations. `desired`: path -> sha256 of planned content; `tracked`: path ->
/// sha256 of what Tenon last wrote there; `on_disk`: path -> sha256 of what is there now, for every
/// path of `desired` and `tracked` (absent = no file).
///
/// Files Tenon never wrote are never deleted. A planned file that differs on disk is rewritten even
/// when the user edited it: the organisation's signature is the organisation's.
pub fn sync_files(
    desired: &BTreeMap<String, String>,
    tracked: &BTreeMap<String, String>,
    on_disk: &BTreeMap<String, String>,
) -> FileSync {
    let mut s = FileSync::default();
    for (path, sha) in desired {
        if on_disk.get(path) != Some(sha) {
            s.write.push(path.clone());
        }
    }
    for (path, sha) in tracked.iter().filter(|(p, _)| !desired.contains_key(*p)) {
        match on_disk.get(path) {
            None => {}
            Some(now) if now == sha => s.delete.push(path.clone()),
            Some(_) => s.release.push(path.clone()),
        }
    }
    s
}

/// The sha256 of planned file contents, for [`sync_files`] and the agent's record.
pub fn file_hashes(files: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    files.iter().map(|(p, b)| (p.clone(), sha256_hex(b))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(name: &str, groups: &[&str]) -> SignatureTemplate {
        SignatureTemplate {
            name: name.into(),
            html: format!("<p>{name} {{{{Graph_User_DisplayName}}}}</p>"),
            txt: None,
            default: None,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            images: BTreeMap::new(),
        }
    }

    #[test]
    fn resolves_directory_values() {
        let user = json!({
            "displayName": "Anna Berg", "jobTitle": null, "businessPhones": ["+49 1", "+49 2"],
            "onPremisesExtensionAttributes": {"extensionAttribute3": "Team Nord", "extensionAttribute4": null},
            "id": "9f1c"
        });
        let v = directory_values(&user);
        assert_eq!(v.len(), 32);
        assert_eq!(
            v.keys().cloned().collect::<std::collections::BTreeSet<_>>(),
            placeholder_names().into_iter().collect()
        );
        let check = |k: &str, expected: &str| assert_eq!(v[&format!("Graph_User_{k}")], expected, "{k}");
        check("DisplayName", "Anna Berg");
        check("JobTitle", "");
        check("FaxNumber", "");
        check("BusinessPhone", "+49 1");
        check("ExtensionAttribute3", "Team Nord");
        check("ExtensionAttribute4", "");
        check("ExtensionAttribute15", "");
        check("Id", "9f1c");
        assert_eq!(directory_values(&json!({}))["Graph_User_BusinessPhone"], "");
    }

    #[test]
    fn config_holds_the_templates_of_the_users_groups() {
        let mut sales = template("Sales", &["Sales"]);
        sales.txt = Some("t".into());
        sales.default = Some(DefaultUse::Both);
        sales.images.insert("logo.png".into(), "iVBO".into());
        let templates = vec![template("Corp", &["All Users"]), sales, template("Dev", &["Dev"])];
        let user = json!({"displayName": "Anna"});
        let c = user_signature_config(&templates, &["Sales".into()], &user);
        assert_eq!(
            c["Templates"],
            json!({
                "Corp": {"html": "<p>Corp {{Graph_User_DisplayName}}</p>", "images": {}},
                "Sales": {"html": "<p>Sales {{Graph_User_DisplayName}}</p>", "txt": "t", "default": "both",
                          "images": {"logo.png": "iVBO"}}
            })
        );
        assert_eq!(c["Values"]["Graph_User_DisplayName"], "Anna");
        let c = user_signature_config(&templates, &[], &user);
        assert_eq!(c["Templates"].as_object().unwrap().keys().collect::<Vec<_>>(), ["Corp"]);
        // What the server produces is what the agent reads.
        let mut cfg = Map::new();
        cfg.insert("Signatures".into(), user_signature_config(&templates, &["Sales".into()], &user));
        let parsed = parse_user_signatures(&cfg).unwrap();
        assert_eq!(parsed.templates["Sales"].default, Some(DefaultUse::Both));
        assert_eq!(parsed.values["Graph_User_DisplayName"], "Anna");
    }

    #[test]
    fn validates_templates() {
        assert_eq!(template("Corp", &["All Users"]).validate(), Ok(()));
        assert_eq!(template("Corp", &[]).validate(), Err(SignatureError::NoGroups("Corp".into())));
        let bad_name = |n: &str| matches!(check_file_name("signature", n), Err(SignatureError::BadFileName { .. }));
        for n in ["", "..\\x", "a/b", "C:x", "con", "LPT1.txt", "x.", " x", "a\u{7}"] {
            assert!(bad_name(n), "{n:?} must be rejected");
        }
        for n in ["Corporate", "Vertrieb (DE)", "Anna (anna@contoso.com)", "com10", "logo.png"] {
            assert!(!bad_name(n), "{n:?} must be accepted");
        }
        let mut t = template("Corp", &["All Users"]);
        t.images.insert("logo.png".into(), "not base64!".into());
        assert!(matches!(t.validate(), Err(SignatureError::BadImage { .. })));
    }

    #[test]
    fn links_images_into_the_files_folder() {
        let images = vec!["logo.png".to_string(), "a b.gif".to_string()];
        let check = |html: &str, expected: &str| assert_eq!(link_images(html, "Corp (a@x.com)", &images), expected);
        check("<img src=\"logo.png\">", "<img src=\"Corp%20(a@x.com)_files/logo.png\">");
        assert_eq!(image_href("My Sig", "a b.png"), "My%20Sig_files/a%20b.png");
        check("<img width=3 src='images/LOGO.png'>", "<img width=3 src='Corp%20(a@x.com)_files/logo.png'>");
        check("<IMG SRC=a%20b.gif>", "<IMG SRC=Corp%20(a@x.com)_files/a%20b.gif>");
        check(
            "<img src=\"https://x/logo.png\"><img src=\"cid:logo.png\">",
            "<img src=\"https://x/logo.png\"><img src=\"cid:logo.png\">",
        );
        check("<img src=\"other.png\"> a > b", "<img src=\"other.png\"> a > b");
        check(
            "<td background=\"bg/logo.png\"><img src=logo.png alt=x>",
            "<td background=\"Corp%20(a@x.com)_files/logo.png\"><img src=Corp%20(a@x.com)_files/logo.png alt=x>",
        );
    }

    #[test]
    fn finds_the_images_a_template_references() {
        let html = "<body background='img/bg.png'><img src=\"img/logo.png\"><img src=\"https://x/y.png\">\
                    <img src=\"cid:a.png\"><img src=\"//cdn/x.png\"><img src=\"data:image/png;base64,AA\">\
                    <v:imagedata src=\"Corp_files/image%20001.png\"/><img src=\"img/logo.png\"><img src=\"\">";
        assert_eq!(image_references(html), ["img/bg.png", "img/logo.png", "Corp_files/image 001.png"]);
        assert_eq!(image_file_name("Corp_files/image 001.png"), "image 001.png");
        assert_eq!(image_file_name("a\\b.png"), "b.png");
        assert_eq!(image_file_name("b.png"), "b.png");
    }

    #[test]
    fn plans_files_and_defaults() {
        let mut sigs = UserSignatures::default();
        let t = |default| DeliveredTemplate {
            html: "<p>{{Graph_User_DisplayName}}</p><img src=logo.png>".into(),
            txt: None,
            default,
            images: [("logo.png".to_string(), "aGVsbG8=".to_string())].into(),
        };
        sigs.templates.insert("B".into(), t(Some(DefaultUse::Both)));
        sigs.templates.insert("A".into(), t(Some(DefaultUse::Reply)));
        sigs.values.insert("Graph_User_DisplayName".into(), "Anna".into());
        sigs.include_upn_in_name = true;
        let plan = plan_user(&sigs, "anna@x.com").unwrap();
        let names: Vec<&str> = plan.files.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "A (anna@x.com).htm",
                "A (anna@x.com).rtf",
                "A (anna@x.com).txt",
                "A (anna@x.com)_files/logo.png",
                "B (anna@x.com).htm",
                "B (anna@x.com).rtf",
                "B (anna@x.com).txt",
                "B (anna@x.com)_files/logo.png"
            ]
        );
        assert_eq!(plan.files["A (anna@x.com)_files/logo.png"], b"hello");
        assert_eq!(
            plan.files["A (anna@x.com).htm"],
            "\u{feff}<p>Anna</p><img src=A%20(anna@x.com)_files/logo.png>".as_bytes()
        );
        assert_eq!(plan.new_signature.as_deref(), Some("B (anna@x.com)"));
        assert_eq!(plan.reply_signature.as_deref(), Some("A (anna@x.com)"));
        sigs.templates.insert("../evil".into(), t(None));
        assert!(matches!(plan_user(&sigs, "anna@x.com"), Err(SignatureError::BadFileName { .. })));
    }

    #[test]
    fn parses_options() {
        let cfg = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(parse_user_signatures(&cfg(json!({}))).unwrap(), UserSignatures::default());
        let s = parse_user_signatures(&cfg(json!({"Signatures": {"Options": {"IncludeUpnInName": true}}}))).unwrap();
        assert!(s.include_upn_in_name && s.templates.is_empty());
        assert!(parse_user_signatures(&cfg(json!({"Signatures": {"Options": {"IncludeUpnInName": "yes"}}}))).is_err());
        assert!(parse_user_signatures(&cfg(json!({"Signatures": {"Templates": {"A": {"txt": "x"}}}}))).is_err());
    }

    #[test]
    fn syncs_only_what_changed_and_only_what_tenon_wrote() {
        let m = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let check = |desired: &[(&str, &str)],
                     tracked: &[(&str, &str)],
                     disk: &[(&str, &str)],
                     w: &[&str],
                     d: &[&str],
                     r: &[&str]| {
            let s = sync_files(&m(desired), &m(tracked), &m(disk));
            assert_eq!(
                (s.write, s.delete, s.release),
                (
                    w.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    d.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    r.iter().map(|s| s.to_string()).collect::<Vec<_>>()
                )
            );
        };
        // Nothing there yet: write.
        check(&[("A.htm", "1")], &[], &[], &["A.htm"], &[], &[]);
        // Unchanged: nothing.
        check(&[("A.htm", "1")], &[("A.htm", "1")], &[("A.htm", "1")], &[], &[], &[]);
        // Changed by the directory or by the user: rewrite.
        check(&[("A.htm", "2")], &[("A.htm", "1")], &[("A.htm", "1")], &["A.htm"], &[], &[]);
        check(&[("A.htm", "1")], &[("A.htm", "1")], &[("A.htm", "9")], &["A.htm"], &[], &[]);
        // Template gone: delete what Tenon wrote as it wrote it, release what the user changed.
        check(&[], &[("A.htm", "1"), ("A.txt", "2")], &[("A.htm", "1"), ("A.txt", "7")], &[], &["A.htm"], &["A.txt"]);
        // Already gone from disk: nothing to do.
        check(&[], &[("A.htm", "1")], &[], &[], &[], &[]);
    }
}
