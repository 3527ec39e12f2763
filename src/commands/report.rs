//! What the commands print for people: byte counts, and tables whose columns fit their
//! widest cell.

/// `512 B`, `4.0 KiB`, `3.0 GiB`.
pub fn human_bytes(b: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `bytes` for a table cell: `-` when unknown.
pub fn bytes_cell(bytes: Option<i64>) -> String {
    bytes.map_or_else(|| "-".to_owned(), human_bytes)
}

/// A table as `kubectl get` prints one: a header row, columns two spaces apart, each as
/// wide as its widest cell (at least its `min`), the last one unpadded, no trailing
/// spaces.
#[derive(Debug, Default)]
pub struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<String>>,
}

#[derive(Debug)]
struct Column {
    header: &'static str,
    min: usize,
    right: bool,
}

impl Table {
    /// A left-aligned column.
    pub fn left(mut self, header: &'static str, min: usize) -> Self {
        self.columns.push(Column {
            header,
            min,
            right: false,
        });
        self
    }

    /// A right-aligned column (numbers).
    pub fn right(mut self, header: &'static str, min: usize) -> Self {
        self.columns.push(Column {
            header,
            min,
            right: true,
        });
        self
    }

    /// One row, a cell per column (missing cells are empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let widths: Vec<usize> = (self.columns.iter().enumerate())
            .map(|(i, c)| {
                let cells = self
                    .rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|s| s.chars().count());
                cells.chain([c.min, c.header.len()]).max().unwrap_or(0)
            })
            .collect();
        let headers = self
            .columns
            .iter()
            .map(|c| c.header.to_owned())
            .collect::<Vec<_>>();
        let mut out = String::new();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, (column, width)) in self.columns.iter().zip(&widths).enumerate() {
                let cell = row.get(i).map_or("", String::as_str);
                let pad = width.saturating_sub(cell.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                match (column.right, i + 1 == self.columns.len()) {
                    (true, _) => line.extend(std::iter::repeat_n(' ', pad).chain(cell.chars())),
                    (false, true) => line.push_str(cell),
                    (false, false) => {
                        line.extend(cell.chars().chain(std::iter::repeat_n(' ', pad)))
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// One row of the per-claim table `backup --wait` and `restore --wait` print.
pub struct ClaimRow<'a> {
    pub claim: &'a str,
    pub result: &'a str,
    pub bytes: Option<i64>,
    pub detail: String,
}

/// CLAIM, RESULT, BYTES, DETAIL: what became of each user claim.
pub fn claim_table<'a>(rows: impl IntoIterator<Item = ClaimRow<'a>>) -> String {
    let mut table = Table::default()
        .left("CLAIM", 5)
        .left("RESULT", 6)
        .right("BYTES", 9)
        .left("DETAIL", 0);
    for r in rows {
        table.row(vec![
            r.claim.to_owned(),
            r.result.to_owned(),
            bytes_cell(r.bytes),
            r.detail,
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(bytes_cell(None), "-");
    }

    #[test]
    fn columns_fit_their_widest_cell_and_lines_end_clean() {
        let mut t = Table::default()
            .left("CLAIM", 5)
            .right("BYTES", 9)
            .left("DETAIL", 0);
        t.row(vec![
            "claim-alice".into(),
            "4.0 KiB".into(),
            "from pod x".into(),
        ]);
        t.row(vec!["b".into(), "-".into(), String::new()]);
        assert_eq!(
            t.render(),
            "CLAIM            BYTES  DETAIL\n\
             claim-alice    4.0 KiB  from pod x\n\
             b                    -\n"
        );
    }

    #[test]
    fn an_empty_table_is_its_header() {
        let t = Table::default().left("NAMESPACE", 9).left("", 0);
        assert_eq!(t.render(), "NAMESPACE\n");
    }
}
