//! Shell blocks of the guides that tests run as a reader would.

use std::path::Path;

/// The `sh` blocks of a Markdown document marked by an HTML comment starting with `marker`
/// on the line before the fence: (the marker line, the block with a final newline).
/// Panics (for tests) when a marker does not precede a `sh` block.
pub fn marked_blocks(doc: &Path, marker: &str) -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(doc).unwrap_or_else(|e| panic!("reading {}: {e}", doc.display()));
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.trim_start().starts_with(marker) {
            continue;
        }
        let fence = lines.get(i + 1).copied().unwrap_or_default();
        assert_eq!(
            fence.trim(),
            "```sh",
            "{}:{}: a {marker} marker must precede a sh block",
            doc.display(),
            i + 1
        );
        let body: Vec<&str> = lines[i + 2..]
            .iter()
            .take_while(|l| l.trim() != "```")
            .copied()
            .collect();
        blocks.push((line.trim().to_owned(), body.join("\n") + "\n"));
    }
    blocks
}
