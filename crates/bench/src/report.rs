//! The Markdown table: one row per figure, mailbridge and direct side by
//! side, the ratio, the target and whether it was met; and, when the run
//! had haproxy, its figure and mailbridge's ratio to it with its own
//! target.

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
    /// Through haproxy (plain text to it, TLS from it), when measured.
    pub haproxy: Option<f64>,
    /// Decimal places to print the values with.
    pub decimals: usize,
    /// The goal, as mailbridge / direct.
    pub target: Target,
    /// The goal as mailbridge / haproxy.
    pub vs_haproxy: Target,
}

impl Row {
    /// mailbridge / direct, when both exist and direct is not zero.
    pub fn ratio(&self) -> Option<f64> {
        match (self.proxy, self.direct) {
            (Some(p), Some(d)) if d != 0.0 => Some(p / d),
            _ => None,
        }
    }

    /// mailbridge / haproxy, when both exist and haproxy's is not zero.
    pub fn haproxy_ratio(&self) -> Option<f64> {
        match (self.proxy, self.haproxy) {
            (Some(p), Some(h)) if h != 0.0 => Some(p / h),
            _ => None,
        }
    }

    /// Whether the target is met; `None` when there is none or no value.
    pub fn met(&self) -> Option<bool> {
        met(self.target, self.ratio())
    }

    /// Whether the target against haproxy is met.
    pub fn met_vs_haproxy(&self) -> Option<bool> {
        met(self.vs_haproxy, self.haproxy_ratio())
    }
}

fn met(target: Target, ratio: Option<f64>) -> Option<bool> {
    match target {
        Target::None => None,
        Target::AtMost(max) => ratio.map(|r| r <= max),
        Target::AtLeast(min) => ratio.map(|r| r >= min),
        Target::Check(_, ok) => Some(ok),
    }
}

fn target_text(target: Target) -> String {
    match target {
        Target::None => String::new(),
        Target::AtMost(max) => format!("<= {max}x"),
        Target::AtLeast(min) => format!(">= {min}x"),
        Target::Check(what, _) => what.to_string(),
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "",
    }
}

fn times(r: Option<f64>) -> String {
    r.map_or_else(String::new, |x| format!("{x:.2}x"))
}

fn value(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// The table in GitHub Markdown; with haproxy's columns when any row has
/// a haproxy figure or target.
pub fn markdown(rows: &[Row]) -> String {
    let with_haproxy = rows
        .iter()
        .any(|r| r.haproxy.is_some() || r.vs_haproxy != Target::None);
    let mut out = if with_haproxy {
        String::from(
            "| measure | mailbridge | haproxy | direct | vs haproxy | target | met | vs direct | target | met |\n\
             | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | --- |\n",
        )
    } else {
        String::from(
            "| measure | mailbridge | direct | ratio | target | met |\n\
             | --- | ---: | ---: | ---: | --- | --- |\n",
        )
    };
    for r in rows {
        if with_haproxy {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.what,
                value(r.proxy, r.decimals),
                value(r.haproxy, r.decimals),
                value(r.direct, r.decimals),
                times(r.haproxy_ratio()),
                target_text(r.vs_haproxy),
                verdict(r.met_vs_haproxy()),
                times(r.ratio()),
                target_text(r.target),
                verdict(r.met()),
            ));
        } else {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.what,
                value(r.proxy, r.decimals),
                value(r.direct, r.decimals),
                times(r.ratio()),
                target_text(r.target),
                verdict(r.met()),
            ));
        }
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
                haproxy: None,
                decimals: 2,
                target: Target::AtMost(1.2),
                vs_haproxy: Target::None,
            },
            Row {
                what: "FETCH (MB/s)".into(),
                proxy: Some(80.0),
                direct: Some(100.0),
                haproxy: None,
                decimals: 1,
                target: Target::AtLeast(0.9),
                vs_haproxy: Target::None,
            },
            Row {
                what: "RSS per session (KiB)".into(),
                proxy: Some(40.0),
                direct: None,
                haproxy: None,
                decimals: 1,
                target: Target::Check("<= 64 KiB", true),
                vs_haproxy: Target::None,
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

    #[test]
    fn with_haproxy_its_column_and_ratio_come_first() {
        let rows = [Row {
            what: "login median (ms)".into(),
            proxy: Some(1.1),
            direct: Some(1.0),
            haproxy: Some(1.0),
            decimals: 2,
            target: Target::AtMost(1.2),
            vs_haproxy: Target::AtMost(1.05),
        }];
        let t = markdown(&rows);
        assert!(
            t.starts_with("| measure | mailbridge | haproxy | direct | vs haproxy |"),
            "{t}"
        );
        assert!(
            t.contains(
                "| login median (ms) | 1.10 | 1.00 | 1.00 | 1.10x | <= 1.05x | **no** | 1.10x | <= 1.2x | yes |"
            ),
            "{t}"
        );
    }
}
