//! Rendering one signature template with one user's values into the three files Outlook reads:
//! `.htm`, `.txt` and `.rtf`. The rules are in the module documentation of [`super`].

use super::html::{self, Element, Node};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Range;

/// The three renderings of a template, and the placeholders it uses that have no value at all
/// (typos, most likely), sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub htm: String,
    /// CRLF line ends, ending with CRLF.
    pub txt: String,
    pub rtf: String,
    pub unknown: Vec<String>,
}

/// Renders a template. `values` maps placeholder names (`Graph_User_JobTitle`) to values; a name
/// that is missing from it renders empty and is reported in [`Rendered::unknown`].
pub fn render(template_html: &str, template_txt: Option<&str>, values: &BTreeMap<String, String>) -> Rendered {
    let mut unknown = BTreeSet::new();
    for src in std::iter::once(template_html).chain(template_txt) {
        for (_, name) in placeholders(src) {
            if lookup(values, name).is_none() {
                unknown.insert(name.to_string());
            }
        }
    }
    let htm = render_html(template_html, values);
    let txt = match template_txt {
        Some(t) => render_text(t, values),
        None => html::to_text(&htm),
    };
    let rtf = text_to_rtf(&txt);
    Rendered { htm, txt, rtf, unknown: unknown.into_iter().collect() }
}

/// Every `{{ Name }}` in `s`: its byte range and the name. Names are letters, digits and `_`;
/// spaces inside the braces are tolerated. Anything else between braces is left alone as text.
pub fn placeholders(s: &str) -> Vec<(Range<usize>, &str)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(open) = s[from..].find("{{").map(|p| from + p) {
        let inner_start = open + 2;
        let Some(close) = s[inner_start..].find("}}").map(|p| inner_start + p) else { break };
        let name = s[inner_start..close].trim_matches([' ', '\t']);
        if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            out.push((open..close + 2, name));
            from = close + 2;
        } else {
            from = open + 1;
        }
    }
    out
}

/// A placeholder's value: exact name first, then ignoring ASCII case, because templates typed by
/// hand do not always get `Graph_User_JobTitle`'s capitals right.
fn lookup<'v>(values: &'v BTreeMap<String, String>, name: &str) -> Option<&'v str> {
    values
        .get(name)
        .or_else(|| values.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
        .map(String::as_str)
}

fn value<'v>(values: &'v BTreeMap<String, String>, name: &str) -> &'v str {
    lookup(values, name).unwrap_or("")
}

/// Replaces the placeholders in `s`, passing each value through `escape`.
fn substitute(s: &str, values: &BTreeMap<String, String>, escape: fn(&str) -> String) -> String {
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for (range, name) in placeholders(s) {
        out.push_str(&s[last..range.start]);
        out.push_str(&escape(value(values, name)));
        last = range.end;
    }
    out.push_str(&s[last..]);
    out
}

/// True when the pieces hold at least one placeholder and every one of them is empty (or unknown).
fn all_placeholders_empty<'a>(pieces: impl IntoIterator<Item = &'a str>, values: &BTreeMap<String, String>) -> bool {
    let mut any = false;
    for p in pieces {
        for (_, name) in placeholders(p) {
            if !value(values, name).trim().is_empty() {
                return false;
            }
            any = true;
        }
    }
    any
}

pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn no_escape(s: &str) -> String {
    s.to_string()
}

/// A value in HTML text: escaped, and a multi-line value (a two-line street address) keeps its
/// line breaks.
fn escape_html_text(s: &str) -> String {
    escape_html(s).replace("\r\n", "\n").replace('\n', "<br>")
}

/// A value in an attribute: escaped, line breaks as spaces.
fn escape_html_attribute(s: &str) -> String {
    escape_html(s).replace("\r\n", " ").replace(['\r', '\n'], " ")
}

/// A value in a text template: line breaks made CRLF like the rest of the file.
fn text_value(s: &str) -> String {
    s.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// Line elements that disappear when emptying their lines left nothing visible in them.
const REMOVABLE: &[&str] = &["p", "div", "li", "dt", "dd", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "center"];

type Path = Vec<usize>;

/// A piece of a block's content in reading order, with its path from the document root.
enum Leaf<'a> {
    /// Text (raw, entities not decoded) or a void element such as `<img>` (its start tag).
    Content {
        path: Path,
        raw: &'a str,
        void: bool,
    },
    Br(Path),
    Block(Path, &'a Element),
}

/// The leaves of `nodes`, looking through inline elements (`<span>`, `<b>`, `<a>`, ...) but not
/// into nested blocks, which are lines of their own.
fn flatten<'a>(nodes: &'a [Node], path: &mut Path, out: &mut Vec<Leaf<'a>>) {
    for (i, n) in nodes.iter().enumerate() {
        path.push(i);
        match n {
            Node::Text(s) => out.push(Leaf::Content { path: path.clone(), raw: s, void: false }),
            Node::Raw(_) => {}
            Node::Element(e) if e.name == "br" => out.push(Leaf::Br(path.clone())),
            Node::Element(e) if html::is_block(&e.name) => out.push(Leaf::Block(path.clone(), e)),
            Node::Element(e) if html::is_void(&e.name) => {
                out.push(Leaf::Content { path: path.clone(), raw: &e.start, void: shows_something(&e.name) })
            }
            Node::Element(e) => flatten(&e.children, path, out),
        }
        path.pop();
    }
}

/// Decides which nodes go, then writes the document with values filled in.
struct Pruner<'v> {
    values: &'v BTreeMap<String, String>,
    removed: HashSet<Path>,
}

impl Pruner<'_> {
    /// Drops the empty lines among `nodes` and, recursively, in nested blocks. Returns whether
    /// anything was dropped.
    fn block(&mut self, nodes: &[Node], path: &mut Path) -> bool {
        let mut leaves = Vec::new();
        flatten(nodes, path, &mut leaves);
        let mut dropped = false;
        let mut line: Vec<(&Path, &str)> = Vec::new();
        let mut left_br: Option<&Path> = None;
        for leaf in leaves.iter().map(Some).chain(std::iter::once(None)) {
            match leaf {
                Some(Leaf::Content { path, raw, .. }) => line.push((path, raw)),
                boundary => {
                    let right_br = match boundary {
                        Some(Leaf::Br(p)) => Some(p),
                        _ => None,
                    };
                    let dropped_line = all_placeholders_empty(line.iter().map(|(_, raw)| *raw), self.values);
                    if dropped_line {
                        self.removed.extend(line.iter().map(|(p, _)| (*p).clone()));
                        // Take one line break with the line, so no blank line is left behind.
                        if let Some(br) = right_br.or(left_br).filter(|br| !self.removed.contains(*br)) {
                            self.removed.insert(br.clone());
                        }
                        dropped = true;
                    }
                    line.clear();
                    // After a line left with the break that ended it, the break before it is still the
                    // one in front of the next line.
                    if !(dropped_line && right_br.is_some_and(|br| self.removed.contains(br))) {
                        left_br = right_br;
                    }
                    if let Some(Leaf::Block(p, el)) = boundary {
                        let mut p = p.clone();
                        dropped |= self.element(el, &mut p);
                    }
                }
            }
        }
        dropped
    }

    fn element(&mut self, el: &Element, path: &mut Path) -> bool {
        if el.name == "tr" && row_is_one_line(el) {
            let mut pieces = Vec::new();
            contents(&el.children, &mut pieces);
            if all_placeholders_empty(pieces, self.values) {
                self.removed.insert(path.clone());
                return true;
            }
            return false;
        }
        let dropped = self.block(&el.children, path);
        if dropped && REMOVABLE.contains(&el.name.as_str()) && !self.visible(&el.children, path) {
            self.removed.insert(path.clone());
        }
        dropped
    }

    /// Whether anything a reader would see is left among `nodes` after the removals.
    fn visible(&self, nodes: &[Node], path: &mut Path) -> bool {
        nodes.iter().enumerate().any(|(i, n)| {
            path.push(i);
            let seen = !self.removed.contains(path)
                && match n {
                    Node::Text(s) => html::decode_entities(&substitute(s, self.values, no_escape))
                        .chars()
                        .any(|c| !c.is_whitespace()),
                    Node::Raw(_) => false,
                    Node::Element(e) if html::is_void(&e.name) => shows_something(&e.name),
                    Node::Element(e) => self.visible(&e.children, path),
                };
            path.pop();
            seen
        })
    }

    fn write(&self, nodes: &[Node], path: &mut Path, out: &mut String) {
        for (i, n) in nodes.iter().enumerate() {
            path.push(i);
            if !self.removed.contains(path) {
                match n {
                    Node::Text(s) => out.push_str(&substitute(s, self.values, escape_html_text)),
                    Node::Raw(s) => out.push_str(s),
                    Node::Element(e) => {
                        out.push_str(&substitute(&e.start, self.values, escape_html_attribute));
                        self.write(&e.children, path, out);
                        if let Some(end) = &e.end {
                            out.push_str(end);
                        }
                    }
                }
            }
            path.pop();
        }
    }
}

/// Void elements a reader sees (an icon, a rule), unlike `<br>`, `<meta>` or `<wbr>`.
fn shows_something(void_name: &str) -> bool {
    matches!(void_name, "img" | "hr" | "input" | "embed")
}

/// Text and void-element tags anywhere below `nodes`, for the placeholders they hold.
fn contents<'a>(nodes: &'a [Node], out: &mut Vec<&'a str>) {
    for n in nodes {
        match n {
            Node::Text(s) => out.push(s),
            Node::Raw(_) => {}
            Node::Element(e) if html::is_void(&e.name) => out.push(&e.start),
            Node::Element(e) => contents(&e.children, out),
        }
    }
}

/// A table row reads as one line when none of its cells holds more than one line (no `<br>`
/// between content, at most one paragraph, no nested table). Then a label cell ("Fax:") and a
/// value cell go together, also in Word's `<td><p>..</p></td>` style.
fn row_is_one_line(tr: &Element) -> bool {
    tr.children.iter().all(|n| match n {
        Node::Element(cell) if matches!(cell.name.as_str(), "td" | "th") => lines_in(&cell.children) <= 1,
        Node::Element(other) => !matches!(other.name.as_str(), "tr" | "table"),
        _ => true,
    })
}

/// How many lines with something on them `nodes` hold (nested tables count as many).
fn lines_in(nodes: &[Node]) -> usize {
    let mut leaves = Vec::new();
    flatten(nodes, &mut Vec::new(), &mut leaves);
    let mut count = 0;
    let mut current = false;
    for leaf in &leaves {
        match leaf {
            Leaf::Content { raw, void, .. } => {
                current |= *void || html::decode_entities(raw).chars().any(|c| !c.is_whitespace())
            }
            Leaf::Br(_) | Leaf::Block(..) => {
                count += usize::from(std::mem::take(&mut current));
                if let Leaf::Block(_, el) = leaf {
                    count += if matches!(el.name.as_str(), "table" | "tr") { 2 } else { lines_in(&el.children) };
                }
            }
        }
    }
    count + usize::from(current)
}

/// Fills in the HTML template: values HTML-escaped; lines whose placeholders are all empty dropped.
pub fn render_html(template: &str, values: &BTreeMap<String, String>) -> String {
    let tree = html::parse(template);
    let mut pruner = Pruner { values, removed: HashSet::new() };
    pruner.block(&tree, &mut Vec::new());
    let mut out = String::with_capacity(template.len());
    pruner.write(&tree, &mut Vec::new(), &mut out);
    out
}

/// Fills in a text template: values as they are; lines whose placeholders are all empty dropped;
/// line ends made CRLF.
pub fn render_text(template: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(template.len());
    for line in template.lines() {
        if all_placeholders_empty([line], values) {
            continue;
        }
        out.push_str(&substitute(line, values, text_value));
        out.push_str("\r\n");
    }
    out
}

/// A minimal RTF document holding `text`: one `\par` per line, `\`, `{` and `}` escaped, tabs as
/// `\tab`, and every character beyond ASCII as `\uN?` (N the signed 16-bit UTF-16 code unit, so
/// characters beyond the BMP become two, a surrogate pair; `?` is what readers without Unicode
/// show).
pub fn text_to_rtf(text: &str) -> String {
    let mut out =
        String::from("{\\rtf1\\ansi\\ansicpg1252\\deff0\\uc1{\\fonttbl{\\f0\\fswiss\\fcharset0 Calibri;}}\r\n");
    out.push_str("\\pard\\f0\\fs22 ");
    let body = text.strip_suffix("\r\n").or_else(|| text.strip_suffix('\n')).unwrap_or(text);
    for (i, line) in body.split('\n').enumerate() {
        if i > 0 {
            out.push_str("\\par\r\n");
        }
        for c in line.trim_end_matches('\r').chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '{' => out.push_str("\\{"),
                '}' => out.push_str("\\}"),
                '\t' => out.push_str("\\tab "),
                ' '..='~' => out.push(c),
                c if c.is_control() => {}
                c => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{}?", *u as i16));
                    }
                }
            }
        }
    }
    out.push_str("\\par\r\n}\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn finds_placeholders() {
        let check = |s: &str, expected: &[&str]| {
            assert_eq!(placeholders(s).into_iter().map(|(_, n)| n).collect::<Vec<_>>(), expected);
        };
        check("{{A}} {{ B_2 }} {{\tC\t}}", &["A", "B_2", "C"]);
        check("{{not one}} {{}} {{x-y}} {A} {{{D}}}", &["D"]);
        check("{{open", &[]);
    }

    #[test]
    fn html_lines_with_only_empty_placeholders_drop_out() {
        let v = values(&[("Name", "Anna"), ("Fax", ""), ("Phone", "+49 1"), ("Mobile", " ")]);
        let check = |template: &str, expected: &str| assert_eq!(render_html(template, &v), expected);
        // <br>-separated lines, also through inline elements.
        check("{{Name}}<br>Fax: {{Fax}}<br>Tel: {{Phone}}", "Anna<br>Tel: +49 1");
        check("{{Name}}<br><b>Fax:</b> {{Fax}}", "Anna<b></b>");
        // Two empty lines at the end take both breaks, so no trailing break is left.
        check("{{Name}}<br>Fax {{Fax}}<br>{{Mobile}}", "Anna");
        check("{{Fax}}<br>{{Mobile}}<br>{{Name}}", "Anna");
        check("<span>Tel {{Phone}}<br>Fax {{Fax}}</span>", "<span>Tel +49 1</span>");
        // A line with one filled placeholder stays, the empty one renders empty.
        check("{{Name}} {{Fax}}<br>x", "Anna <br>x");
        // Text without placeholders is never dropped.
        check("Fax:<br>{{Phone}}", "Fax:<br>+49 1");
        // Paragraphs, divs and list items go entirely, also when nested.
        check("<p>{{Name}}</p><p>Fax: {{Fax}}</p><p>&nbsp;</p>", "<p>Anna</p><p>&nbsp;</p>");
        check("<div><p>Mobile: {{Mobile}}</p></div><div>x</div>", "<div>x</div>");
        check("<ul><li>{{Fax}}</li><li>{{Phone}}</li></ul>", "<ul><li>+49 1</li></ul>");
        // An icon on the line goes with it.
        check("<p><img src=fax.png> {{Fax}}</p>", "");
        // Table rows with a label cell and a value cell, plain and in Word's style.
        check(
            "<table><tr><td>Fax:</td><td>{{Fax}}</td></tr><tr><td>Tel:</td><td>{{Phone}}</td></tr></table>",
            "<table><tr><td>Tel:</td><td>+49 1</td></tr></table>",
        );
        check("<table><tr><td><p>Fax:</p></td><td><p>{{Fax}}</p></td></tr></table>", "<table></table>");
        // A cell with several lines is not one line: only the empty line goes.
        check(
            "<table><tr><td><p>{{Name}}</p><p>Fax {{Fax}}</p></td><td>logo</td></tr></table>",
            "<table><tr><td><p>Anna</p></td><td>logo</td></tr></table>",
        );
    }

    #[test]
    fn values_are_escaped_in_html_and_attributes() {
        let v = values(&[("T", "<script>alert(1)</script> & \"R&D\""), ("Mail", "a\"b@x.com")]);
        assert_eq!(
            render_html("<a href=\"mailto:{{Mail}}\">{{T}}</a>", &v),
            "<a href=\"mailto:a&quot;b@x.com\">&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;R&amp;D&quot;</a>"
        );
    }

    #[test]
    fn multi_line_values_keep_their_lines() {
        let v = values(&[("Street", "Hafenstr. 1\r\nHaus B")]);
        assert_eq!(
            render_html("<p title=\"{{Street}}\">{{Street}}</p>", &v),
            "<p title=\"Hafenstr. 1 Haus B\">Hafenstr. 1<br>Haus B</p>"
        );
        assert_eq!(render_text("{{Street}}\n", &v), "Hafenstr. 1\r\nHaus B\r\n");
        assert_eq!(render("<p>{{Street}}</p>", None, &v).txt, "Hafenstr. 1\r\nHaus B\r\n");
    }

    #[test]
    fn absurd_nesting_does_not_exhaust_the_stack() {
        let html = "<div><span>{{A}}".repeat(50_000);
        let r = render(&html, None, &values(&[("A", "")]));
        assert!(r.htm.len() < html.len());
    }

    #[test]
    fn text_templates_drop_empty_lines() {
        let v = values(&[("Name", "Anna"), ("Fax", "")]);
        assert_eq!(render_text("{{Name}}\nFax: {{Fax}}\r\n\nBye {{Name}}", &v), "Anna\r\n\r\nBye Anna\r\n");
    }

    #[test]
    fn rtf_escapes() {
        let check = |text: &str, body: &str| {
            let rtf = text_to_rtf(text);
            let start = rtf.find("\\fs22 ").unwrap() + 6;
            assert_eq!(&rtf[start..], body);
        };
        check("a\\b{c}\r\n", "a\\\\b\\{c\\}\\par\r\n}\r\n");
        check("Jürgen\r\nx\ty\r\n", "J\\u252?rgen\\par\r\nx\\tab y\\par\r\n}\r\n");
        check("東京", "\\u26481?\\u20140?\\par\r\n}\r\n");
        // Beyond the BMP: a surrogate pair, as signed 16-bit numbers.
        check("😀", "\\u-10179?\\u-8704?\\par\r\n}\r\n");
    }

    #[test]
    fn unknown_placeholders_are_reported_and_render_empty() {
        let v = values(&[("Graph_User_DisplayName", "Anna")]);
        let r = render(
            "{{graph_user_displayname}} {{Graph_User_JobTitel}}<br>x",
            Some("{{Oops}}\nHi {{Graph_User_DisplayName}}"),
            &v,
        );
        assert_eq!(r.unknown, vec!["Graph_User_JobTitel".to_string(), "Oops".to_string()]);
        assert_eq!(r.htm, "Anna <br>x");
        assert_eq!(r.txt, "Hi Anna\r\n");
    }
}
