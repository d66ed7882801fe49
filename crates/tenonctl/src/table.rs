//! Tables for people. Every cell passes through [`cell`], which shows control characters visibly:
//! a device chooses its host name, agent version and last error, and must not be able to rewrite
//! an administrator's terminal with escape sequences. `--json` output is exact JSON instead.

use serde_json::Value;

/// Renders control characters (C0, DEL, C1) and bidirectional overrides visibly: ESC as `\e`,
/// tab, newline and carriage return as `\t`, `\n`, `\r`, the others as `\xNN` or `\u{NNNN}`. A
/// backslash stays as it is, so ordinary Windows paths read normally.
pub fn visible(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\u{1b}' => out.push_str("\\e"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if ('\u{80}'..='\u{9f}').contains(&c) => out.push_str(&format!("\\x{:02x}", c as u32)),
            // Bidi embeddings, overrides and isolates (the "Trojan Source" characters), and the
            // invisible marks that reorder text.
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}' => {
                out.push_str(&format!("\\u{{{:04x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// One value as a table cell: `-` for null, arrays joined with commas, always [`visible`].
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => visible(s),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => visible(&other.to_string()),
    }
}

pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A table of `columns` (header, field) over an array of objects, or the JSON itself.
pub fn print_table(json_out: bool, v: &Value, columns: &[(&str, &str)]) {
    if json_out {
        return print_json(v);
    }
    print!("{}", render(v, columns));
}

fn render(v: &Value, columns: &[(&str, &str)]) -> String {
    let rows: Vec<Vec<String>> =
        v.as_array().into_iter().flatten().map(|r| columns.iter().map(|(_, k)| cell(&r[*k])).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0).max(h.len()))
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(columns.iter().map(|(h, _)| h.to_string()).collect());
    for r in rows {
        line(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn control_characters_are_shown_not_sent() {
        let check = |raw: &str, shown: &str| assert_eq!(visible(raw), shown, "{raw:?}");
        check("PC-1", "PC-1");
        check("\u{1b}]0;pwned\u{7}", "\\e]0;pwned\\x07");
        check("\u{1b}[2J\u{1b}[31mred", "\\e[2J\\e[31mred");
        check("a\nb\rc\td", "a\\nb\\rc\\td");
        check("\u{0}\u{7f}\u{9b}", "\\x00\\x7f\\x9b");
        check("admin\u{202e}exe.txt", "admin\\u{202e}exe.txt");
        check("\u{2066}x\u{2069}", "\\u{2066}x\\u{2069}");
        check("C:\\Users\\anna", "C:\\Users\\anna");
        check("Ünïcödé 名前", "Ünïcödé 名前");
    }

    #[test]
    fn every_cell_of_a_table_is_visible() {
        let rows = json!([{"host": "\u{1b}[2JPC", "tags": ["a\u{1b}", "b"], "n": 3, "none": null}]);
        let out = render(&rows, &[("HOST", "host"), ("TAGS", "tags"), ("N", "n"), ("NONE", "none")]);
        assert!(!out.contains('\u{1b}'), "{out:?}");
        assert!(out.contains("\\e[2JPC") && out.contains("a\\e,b"), "{out}");
        // A JSON value inside a cell (an object) is escaped too.
        assert_eq!(cell(&json!({"k": "\u{1b}"})), "{\"k\":\"\\u001b\"}");
    }
}
