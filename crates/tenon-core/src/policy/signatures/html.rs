//! A small, forgiving HTML tree for signature templates: it keeps every byte of the source (so what
//! it does not touch comes out exactly as the designer wrote it) and knows just enough structure to
//! find "lines", drop the empty ones, and turn HTML into plain text.
//!
//! It is not a browser parser. Unknown or unbalanced markup is kept as it was: a close tag that
//! matches no open element stays as raw text, an element that is never closed ends with its parent.

/// A node of the tree. Serialising the tree reproduces the source byte for byte.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// Character data as written (entities not decoded).
    Text(String),
    /// Markup that is neither text nor an element for our purposes: comments (also Word's
    /// conditional comments), `<!DOCTYPE>`, `<?xml?>`, stray close tags, and the content of
    /// `<style>`, `<script>`, `<title>` and `<xml>`.
    Raw(String),
    Element(Element),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Element {
    /// Lower-case tag name (`p`, `o:p`, ...).
    pub name: String,
    /// The start tag as written, `<p class=MsoNormal>`.
    pub start: String,
    pub children: Vec<Node>,
    /// The end tag as written; `None` when the source never closed the element (or it is void).
    pub end: Option<String>,
}

const VOID: &[&str] =
    &["area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"];
const RAW_TEXT: &[&str] = &["style", "script", "title", "xml", "textarea"];
/// Elements that start a new line in rendered text.
const BLOCKS: &[&str] = &[
    "address",
    "article",
    "aside",
    "blockquote",
    "body",
    "caption",
    "center",
    "dd",
    "div",
    "dl",
    "dt",
    "footer",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "head",
    "header",
    "hr",
    "html",
    "li",
    "main",
    "nav",
    "ol",
    "p",
    "pre",
    "section",
    "table",
    "tbody",
    "td",
    "tfoot",
    "th",
    "thead",
    "tr",
    "ul",
];
/// Elements whose end implicitly closes an open element of the same kind when a new one starts.
const SELF_CLOSING_SIBLINGS: &[&str] = &["p", "li", "tr", "td", "th", "dt", "dd"];

/// How deep elements nest before further start tags are kept as raw markup.
const MAX_DEPTH: usize = 200;

pub fn is_void(name: &str) -> bool {
    VOID.contains(&name)
}

pub fn is_block(name: &str) -> bool {
    BLOCKS.contains(&name)
}

/// Parses `src` into a list of top-level nodes.
pub fn parse(src: &str) -> Vec<Node> {
    // The stack of open elements; index 0 is a virtual root.
    let mut stack: Vec<Element> =
        vec![Element { name: String::new(), start: String::new(), children: Vec::new(), end: None }];
    let mut i = 0;
    let mut text_start = 0;
    let bytes = src.as_bytes();
    let push_text = |stack: &mut Vec<Element>, s: &str| {
        if !s.is_empty() {
            top(stack).children.push(Node::Text(s.to_string()));
        }
    };
    while i < bytes.len() {
        if bytes[i] != b'<' {
            i += 1;
            continue;
        }
        let rest = &src[i..];
        let markup_end = if rest.starts_with("<!--") {
            Some(rest.find("-->").map_or(src.len(), |e| i + e + 3))
        } else if rest.starts_with("<!") || rest.starts_with("<?") {
            Some(rest.find('>').map_or(src.len(), |e| i + e + 1))
        } else {
            None
        };
        if let Some(end) = markup_end {
            push_text(&mut stack, &src[text_start..i]);
            top(&mut stack).children.push(Node::Raw(src[i..end].to_string()));
            i = end;
            text_start = i;
            continue;
        }
        let Some(tag) = scan_tag(rest) else {
            i += 1;
            continue;
        };
        push_text(&mut stack, &src[text_start..i]);
        let raw = &src[i..i + tag.len];
        i += tag.len;
        text_start = i;
        if tag.closing {
            match stack.iter().rposition(|e| e.name == tag.name) {
                Some(pos) if pos > 0 => {
                    while stack.len() > pos + 1 {
                        close_top(&mut stack, None);
                    }
                    close_top(&mut stack, Some(raw.to_string()));
                }
                _ => top(&mut stack).children.push(Node::Raw(raw.to_string())),
            }
            continue;
        }
        if SELF_CLOSING_SIBLINGS.contains(&tag.name.as_str()) {
            let same =
                |n: &str| n == tag.name || (matches!(n, "td" | "th") && matches!(tag.name.as_str(), "td" | "th"));
            if same(&top(&mut stack).name) {
                close_top(&mut stack, None);
            }
        } else if is_block(&tag.name) && top(&mut stack).name == "p" {
            close_top(&mut stack, None);
        }
        let el = Element { name: tag.name.clone(), start: raw.to_string(), children: Vec::new(), end: None };
        if is_void(&tag.name) || tag.self_closing {
            top(&mut stack).children.push(Node::Element(el));
        } else if RAW_TEXT.contains(&tag.name.as_str()) {
            let close = format!("</{}", tag.name);
            let body_end = find_ci(&src[i..], &close).map_or(src.len(), |p| i + p);
            let mut el = el;
            if body_end > i {
                el.children.push(Node::Raw(src[i..body_end].to_string()));
            }
            let end_len = src[body_end..].find('>').map_or(src.len() - body_end, |p| p + 1);
            if body_end < src.len() {
                el.end = Some(src[body_end..body_end + end_len].to_string());
            }
            i = body_end + end_len;
            text_start = i;
            top(&mut stack).children.push(Node::Element(el));
        } else if stack.len() > MAX_DEPTH {
            // Deeper nesting than any real signature: kept as it is, but not nested further, so the
            // recursive passes over the tree stay shallow.
            top(&mut stack).children.push(Node::Raw(raw.to_string()));
        } else {
            stack.push(el);
        }
    }
    push_text(&mut stack, &src[text_start..]);
    while stack.len() > 1 {
        close_top(&mut stack, None);
    }
    stack.pop().map(|root| root.children).unwrap_or_default()
}

fn top(stack: &mut [Element]) -> &mut Element {
    stack.last_mut().expect("the virtual root is never popped while parsing")
}

fn close_top(stack: &mut Vec<Element>, end: Option<String>) {
    if let Some(mut el) = stack.pop() {
        el.end = end;
        top(stack).children.push(Node::Element(el));
    }
}

fn find_ci(hay: &str, needle: &str) -> Option<usize> {
    hay.as_bytes().windows(needle.len()).position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

struct Tag {
    name: String,
    len: usize,
    closing: bool,
    self_closing: bool,
}

/// Recognises a start or end tag at the beginning of `s` (which starts with `<`).
fn scan_tag(s: &str) -> Option<Tag> {
    let b = s.as_bytes();
    let mut j = 1;
    let closing = b.get(1) == Some(&b'/');
    if closing {
        j += 1;
    }
    if !b.get(j).is_some_and(u8::is_ascii_alphabetic) {
        return None;
    }
    let name_start = j;
    while b.get(j).is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b':' | b'-' | b'_')) {
        j += 1;
    }
    let name = s[name_start..j].to_ascii_lowercase();
    // Attributes: skip to the `>` that is not inside a quoted value.
    let mut quote: Option<u8> = None;
    while j < b.len() {
        let c = b[j];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == b'"' || c == b'\'' => quote = Some(c),
            None if c == b'>' => {
                let self_closing = !closing && j > 0 && b[j - 1] == b'/';
                return Some(Tag { name, len: j + 1, closing, self_closing });
            }
            None => {}
        }
        j += 1;
    }
    None
}

/// Writes the tree back out (rendering writes its own pruned copy; this proves the round trip).
#[cfg(test)]
pub fn serialize(nodes: &[Node], out: &mut String) {
    for n in nodes {
        match n {
            Node::Text(s) | Node::Raw(s) => out.push_str(s),
            Node::Element(e) => {
                out.push_str(&e.start);
                serialize(&e.children, out);
                if let Some(end) = &e.end {
                    out.push_str(end);
                }
            }
        }
    }
}

/// Decodes character references: the common named ones and all numeric ones. Unknown references
/// stay as written.
pub fn decode_entities(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest[1..].find(';').filter(|&semi| semi <= 32).and_then(|semi| {
            let name = &rest[1..1 + semi];
            entity(name).map(|c| (c, semi + 2))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn entity(name: &str) -> Option<char> {
    if let Some(num) = name.strip_prefix('#') {
        let code = match num.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse().ok()?,
        };
        return char::from_u32(code);
    }
    Some(match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "nbsp" => '\u{a0}',
        "copy" => '©',
        "reg" => '®',
        "trade" => '™',
        "euro" => '€',
        "ndash" => '–',
        "mdash" => '—',
        "bull" => '•',
        "middot" => '·',
        "hellip" => '…',
        "laquo" => '«',
        "raquo" => '»',
        "lsquo" => '‘',
        "rsquo" => '’',
        "ldquo" => '“',
        "rdquo" => '”',
        "sbquo" => '‚',
        "bdquo" => '„',
        "auml" => 'ä',
        "ouml" => 'ö',
        "uuml" => 'ü',
        "Auml" => 'Ä',
        "Ouml" => 'Ö',
        "Uuml" => 'Ü',
        "szlig" => 'ß',
        "eacute" => 'é',
        "egrave" => 'è',
        "Eacute" => 'É',
        "aacute" => 'á',
        "agrave" => 'à',
        "ccedil" => 'ç',
        "oacute" => 'ó',
        "uacute" => 'ú',
        "iacute" => 'í',
        "ntilde" => 'ñ',
        "deg" => '°',
        "sect" => '§',
        "times" => '×',
        _ => return None,
    })
}

/// Plain text of an HTML document the way a reader sees it: tags stripped, entities decoded,
/// white space collapsed; `<br>` and block boundaries become line breaks, table cells of a row are
/// separated by a space; runs of blank lines shrink to one; lines are joined with CRLF.
pub fn to_text(html: &str) -> String {
    let mut w = TextWriter::default();
    text_of(&parse(html), &mut w);
    w.finish()
}

#[derive(Default)]
struct TextWriter {
    lines: Vec<String>,
    cur: String,
    /// A space is owed before the next visible character.
    space: bool,
}

/// Line content without ASCII white space at its ends. Non-breaking spaces are deliberate (Word's
/// `<p>&nbsp;</p>` is a blank line), so they are content here and become spaces only at the end.
fn trim_ascii_ws(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_ascii_whitespace())
}

impl TextWriter {
    fn text(&mut self, s: &str) {
        for c in s.chars() {
            if c.is_whitespace() && c != '\u{a0}' {
                self.space = true;
            } else {
                if self.space && !self.cur.is_empty() {
                    self.cur.push(' ');
                }
                self.space = false;
                self.cur.push(c);
            }
        }
    }
    fn gap(&mut self) {
        self.space = true;
    }
    fn newline(&mut self) {
        self.lines.push(trim_ascii_ws(&std::mem::take(&mut self.cur)).to_string());
        self.space = false;
    }
    /// Ends the current line unless nothing is on it (block boundaries do not stack up blank lines).
    fn soft_newline(&mut self) {
        if !trim_ascii_ws(&self.cur).is_empty() {
            self.newline();
        } else {
            self.cur.clear();
            self.space = false;
        }
    }
    /// The finished lines, blank runs collapsed, leading and trailing blank lines dropped.
    fn into_lines(mut self) -> Vec<String> {
        self.soft_newline();
        let mut out: Vec<String> = Vec::new();
        for l in self.lines {
            let l = l.replace('\u{a0}', " ").trim_end().to_string();
            if l.trim().is_empty() && out.last().is_none_or(|p| p.is_empty()) {
                continue;
            }
            out.push(if l.trim().is_empty() { String::new() } else { l });
        }
        while out.last().is_some_and(|l| l.is_empty()) {
            out.pop();
        }
        out
    }
    fn finish(self) -> String {
        let mut s = self.into_lines().join("\r\n");
        s.push_str("\r\n");
        s
    }
}

fn text_of(nodes: &[Node], w: &mut TextWriter) {
    for n in nodes {
        match n {
            Node::Text(s) => w.text(&decode_entities(s)),
            Node::Raw(_) => {}
            Node::Element(e) => match e.name.as_str() {
                "br" => w.newline(),
                "head" | "style" | "script" | "title" | "xml" => {}
                "tr" => row_text(e, w),
                "td" | "th" => {
                    w.gap();
                    text_of(&e.children, w);
                    w.gap();
                }
                name if is_block(name) => {
                    w.soft_newline();
                    text_of(&e.children, w);
                    w.soft_newline();
                }
                _ => text_of(&e.children, w),
            },
        }
    }
}

/// A table row: when every cell holds at most one line, the cells form one line ("Fax: 123", also
/// with Word's paragraphs in cells); otherwise the cells' lines follow one another.
fn row_text(tr: &Element, w: &mut TextWriter) {
    let cells: Vec<Vec<String>> = tr
        .children
        .iter()
        .filter(|n| matches!(n, Node::Element(_)))
        .map(|cell| {
            let mut cw = TextWriter::default();
            text_of(std::slice::from_ref(cell), &mut cw);
            cw.into_lines().into_iter().filter(|l| !l.is_empty()).collect()
        })
        .collect();
    w.soft_newline();
    if cells.iter().all(|c| c.len() <= 1) {
        let line: Vec<&str> = cells.iter().flatten().map(String::as_str).collect();
        w.text(&line.join(" "));
        w.soft_newline();
    } else {
        for l in cells.iter().flatten() {
            w.text(l);
            w.newline();
        }
    }
}

/// The value of attribute `attr` in a start tag: (byte range of the value inside `tag`, the value).
pub fn attribute(tag: &str, attr: &str) -> Option<(std::ops::Range<usize>, String)> {
    let b = tag.as_bytes();
    // Skip `<name`.
    let mut j = 1;
    while j < b.len() && !b[j].is_ascii_whitespace() && b[j] != b'>' && b[j] != b'/' {
        j += 1;
    }
    loop {
        while j < b.len() && (b[j].is_ascii_whitespace() || b[j] == b'/') {
            j += 1;
        }
        if j >= b.len() || b[j] == b'>' {
            return None;
        }
        let name_start = j;
        while j < b.len() && !b[j].is_ascii_whitespace() && !matches!(b[j], b'=' | b'>' | b'/') {
            j += 1;
        }
        let name = &tag[name_start..j];
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if b.get(j) != Some(&b'=') {
            continue;
        }
        j += 1;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        let (start, end) = match b.get(j) {
            Some(&q) if q == b'"' || q == b'\'' => {
                let end = tag[j + 1..].find(q as char).map_or(b.len(), |p| j + 1 + p);
                (j + 1, end)
            }
            _ => {
                let mut e = j;
                while e < b.len() && !b[e].is_ascii_whitespace() && b[e] != b'>' {
                    e += 1;
                }
                (j, e)
            }
        };
        if name.eq_ignore_ascii_case(attr) {
            return Some((start..end, tag[start..end].to_string()));
        }
        j = end + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_byte() {
        let check = |src: &str| {
            let mut out = String::new();
            serialize(&parse(src), &mut out);
            assert_eq!(out, src);
        };
        check("<html><body><p class=MsoNormal>Hi<o:p></o:p></p></body></html>");
        check("<!--[if gte mso 9]><xml><o:shapedefaults/></xml><![endif]--><p>a<br>b</p>");
        check("<p>one<p>two</div>stray</p> 1 < 2 <style>p > a {x}</style><td>x");
        check("<table><tr><td>a<td>b<tr><td>c</table>");
        check("unclosed <b>bold");
        check("<img src='a.png' alt=\"x > y\"/>tail <");
        check(&"<span>x".repeat(5000));
    }

    #[test]
    fn implied_ends_follow_html() {
        let nodes = parse("<p>one<p>two");
        assert_eq!(nodes.len(), 2);
        let nodes = parse("<tr><td>a<td>b</tr>");
        let Node::Element(tr) = &nodes[0] else { panic!("tr expected") };
        assert_eq!(tr.children.len(), 2);
    }

    #[test]
    fn decodes_entities() {
        let check = |s: &str, expected: &str| assert_eq!(decode_entities(s), expected);
        check("R&amp;D &lt;b&gt; &quot;x&quot;", "R&D <b> \"x\"");
        check("&#228;&#xE4;&auml; &euro;", "äää €");
        check("AT&T &unknown; & ;", "AT&T &unknown; & ;");
    }

    #[test]
    fn text_from_html() {
        let check = |html: &str, expected: &str| assert_eq!(to_text(html), expected);
        check("<p>Anna  Berg</p><p>Sales</p>", "Anna Berg\r\nSales\r\n");
        check("Anna<br>Sales<br><br><br>Contoso", "Anna\r\nSales\r\n\r\nContoso\r\n");
        check("<table><tr><td>Fax:</td><td>123</td></tr></table>", "Fax: 123\r\n");
        check(
            "<table><tr><td><p>Fax:</p></td><td><p>1</p></td></tr><tr><td><p>a</p><p>b</p></td><td>c</td></tr></table>",
            "Fax: 1\r\na\r\nb\r\nc\r\n",
        );
        check("<p>Hi</p><p><o:p>&nbsp;</o:p></p><p>Anna</p>", "Hi\r\n\r\nAnna\r\n");
        check("<style>p{}</style><b>R&amp;D</b>&nbsp;&nbsp;x", "R&D  x\r\n");
    }

    #[test]
    fn finds_attributes() {
        let check = |tag: &str, attr: &str, expected: Option<&str>| {
            assert_eq!(attribute(tag, attr).map(|(_, v)| v), expected.map(str::to_string));
        };
        check("<img src=\"a b.png\" width=10>", "src", Some("a b.png"));
        check("<img width=10 SRC='x.png'>", "src", Some("x.png"));
        check("<img data-src=x.png src=y.png>", "src", Some("y.png"));
        check("<img alt=src>", "src", None);
        check("<img/>", "src", None);
    }
}
