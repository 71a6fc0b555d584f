//! The Markdown table: one row per figure, mailbridge and direct side by
//! side, the ratio, the target and whether it was met.

/// Which way a ratio should go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// No target for this row.
    None,
    /// mailbridge / direct must be at most this (times, latencies).
    AtMost(f64),
    /// mailbridge / direct must be at least this (rates).
    AtLeast(f64),
    /// A condition checked by the runner, described in words.
    Check(&'static str, bool),
}

/// One figure.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured, with its unit.
    pub what: String,
    /// Through mailbridge.
    pub proxy: Option<f64>,
    /// Straight to the upstream.
    pub direct: Option<f64>,
    /// Decimal places to print the values with.
    pub decimals: usize,
    /// The goal.
    pub target: Target,
}

impl Row {
    /// mailbridge / direct, when both exist and direct is not zero.
    pub fn ratio(&self) -> Option<f64> {
        match (self.proxy, self.direct) {
            (Some(p), Some(d)) if d != 0.0 => Some(p / d),
            _ => None,
        }
    }

    /// Whether the target is met; `None` when there is none or no value.
    pub fn met(&self) -> Option<bool> {
        match self.target {
            Target::None => None,
            Target::AtMost(max) => self.ratio().map(|r| r <= max),
            Target::AtLeast(min) => self.ratio().map(|r| r >= min),
            Target::Check(_, ok) => Some(ok),
        }
    }

    fn target_text(&self) -> String {
        match self.target {
            Target::None => String::new(),
            Target::AtMost(max) => format!("<= {max}x"),
            Target::AtLeast(min) => format!(">= {min}x"),
            Target::Check(what, _) => what.to_string(),
        }
    }
}

fn value(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// The table in GitHub Markdown.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| measure | mailbridge | direct | ratio | target | met |\n\
         | --- | ---: | ---: | ---: | --- | --- |\n",
    );
    for r in rows {
        let met = match r.met() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.what,
            value(r.proxy, r.decimals),
            value(r.direct, r.decimals),
            r.ratio().map_or_else(String::new, |x| format!("{x:.2}x")),
            r.target_text(),
            met
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_ratio_target_and_verdict() {
        let rows = [
            Row {
                what: "login median (ms)".into(),
                proxy: Some(1.1),
                direct: Some(1.0),
                decimals: 2,
                target: Target::AtMost(1.2),
            },
            Row {
                what: "FETCH (MB/s)".into(),
                proxy: Some(80.0),
                direct: Some(100.0),
                decimals: 1,
                target: Target::AtLeast(0.9),
            },
            Row {
                what: "RSS per session (KiB)".into(),
                proxy: Some(40.0),
                direct: None,
                decimals: 1,
                target: Target::Check("<= 64 KiB", true),
            },
        ];
        let t = markdown(&rows);
        assert!(
            t.contains("| login median (ms) | 1.10 | 1.00 | 1.10x | <= 1.2x | yes |"),
            "{t}"
        );
        assert!(
            t.contains("| FETCH (MB/s) | 80.0 | 100.0 | 0.80x | >= 0.9x | **no** |"),
            "{t}"
        );
        assert!(
            t.contains("| RSS per session (KiB) | 40.0 | - |  | <= 64 KiB | yes |"),
            "{t}"
        );
    }
}
