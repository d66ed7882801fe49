//! Parsing of the command line's values: durations (`30s`), rates (`3333/s`, `max`, `off`) and
//! percentages (`10%`).

use std::time::Duration;

/// `500ms`, `30s`, `1.5s`, `2m`, `2h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 2m, 1h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// How fast a kind of request is sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// Not at all.
    Off,
    /// Closed loop: each connection sends the next request as soon as it has the answer.
    Max,
    /// Open loop: this many requests per second in total, on a fixed schedule.
    Rate(f64),
}

/// `3333/s`, `200/m`, `10/h`, a bare number (per second), `max`, or `off` (also `0`).
pub fn parse_load(s: &str) -> Result<Load, String> {
    let t = s.trim();
    match t {
        "max" => return Ok(Load::Max),
        "off" | "0" => return Ok(Load::Off),
        _ => {}
    }
    let (num, per) = t.split_once('/').unwrap_or((t, "s"));
    let n: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a rate (e.g. 3333/s, 200/m, max, off)"))?;
    let per_secs = match per.trim() {
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("{s:?}: unknown unit /{other}; use /s, /m or /h")),
    };
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?} is out of range"));
    }
    if n == 0.0 {
        return Ok(Load::Off);
    }
    Ok(Load::Rate(n / per_secs))
}

/// `10%` or `0.1`, as a fraction in `0..=1`.
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let f = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a percentage (e.g. 10%)"))?;
    if !(0.0..=1.0).contains(&f) {
        return Err(format!("{s:?} must be between 0% and 100%"));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("30x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn loads() {
        assert_eq!(parse_load("3333/s"), Ok(Load::Rate(3333.0)));
        assert_eq!(parse_load("300"), Ok(Load::Rate(300.0)));
        assert_eq!(parse_load("120/m"), Ok(Load::Rate(2.0)));
        assert_eq!(parse_load("max"), Ok(Load::Max));
        assert_eq!(parse_load("off"), Ok(Load::Off));
        assert_eq!(parse_load("0/s"), Ok(Load::Off));
        assert!(parse_load("fast").is_err());
        assert!(parse_load("10/d").is_err());
        assert!(parse_load("-5/s").is_err());
    }

    #[test]
    fn fractions() {
        assert_eq!(parse_fraction("10%"), Ok(0.1));
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
        assert_eq!(parse_fraction("0%"), Ok(0.0));
        assert!(parse_fraction("150%").is_err());
        assert!(parse_fraction("ten").is_err());
    }
}
