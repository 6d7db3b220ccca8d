//! What validation collects: every problem and warning with its line, and the dotted key at a
//! position of the text (for toml's own errors, which give only a position).

use super::*;

/// The problems and warnings found while validating, with line numbers from `src`.
pub(super) struct Checker<'a> {
    pub(super) src: &'a str,
    pub(super) problems: Vec<Problem>,
    pub(super) warnings: Vec<Problem>,
    /// Where each line after the first starts (a long list with many mistakes names each
    /// line without counting from the start every time).
    line_starts: Vec<usize>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(src: &'a str) -> Checker<'a> {
        Checker {
            src,
            problems: vec![],
            warnings: vec![],
            line_starts: src.match_indices('\n').map(|(i, _)| i + 1).collect(),
        }
    }

    pub(super) fn line(&self, offset: usize) -> usize {
        let offset = offset.min(self.src.len());
        self.line_starts.partition_point(|&start| start <= offset) + 1
    }
    pub(super) fn error<T>(
        &mut self,
        at: &Spanned<T>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.error_at(at.span(), key, message);
    }
    pub(super) fn error_at(
        &mut self,
        span: std::ops::Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let line = Some(self.line(span.start));
        self.problems.push(Problem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }
    pub(super) fn warn<T>(
        &mut self,
        at: &Spanned<T>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let line = Some(self.line(at.span().start));
        self.warnings.push(Problem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }
}

/// The dotted key (`service[1].backend[0].weight`) whose value or table starts at `offset`,
/// worked out from the table headers above it: toml's own errors give only a position.
pub(super) fn key_at(src: &str, offset: usize) -> Option<String> {
    let offset = offset.min(src.len());
    let line_start = src[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let (mut service, mut backend) = (-1i64, -1i64);
    let mut table = String::new();
    for line in src[..line_start].lines() {
        let header: String = line
            .split('#')
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        match header.as_str() {
            "[daemon]" => table = "daemon".into(),
            "[[service]]" => {
                service += 1;
                backend = -1;
                table = format!("service[{service}]");
            }
            "[service.health]" => table = format!("service[{service}].health"),
            "[[service.backend]]" => {
                backend += 1;
                table = format!("service[{service}].backend[{backend}]");
            }
            h if h.starts_with('[') => table = h.trim_matches(|c| c == '[' || c == ']').to_string(),
            _ => {}
        }
    }
    let line = src[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string());
    match (table.is_empty(), key) {
        (_, Some(k)) if !k.starts_with('[') && !k.is_empty() => Some(if table.is_empty() {
            k
        } else {
            format!("{table}.{k}")
        }),
        (false, _) => Some(table),
        (true, _) => None,
    }
}
