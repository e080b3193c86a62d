"""The training log: one CSV row per log step (stage, step, loss, lr, the method's stats,
seconds), written as it comes and flushed, and kept in memory for the resume file."""

import csv


class CSVLog:
    """Append rows (dicts) to a CSV file, header taken from the first row; ``rows`` keeps them.
    ``path`` None: keep the rows only (the ranks of a data-parallel run other than 0)."""

    def __init__(self, path):
        self.path, self.writer, self.file, self.rows = path, None, None, []

    def write(self, row):
        if self.path is not None:
            if self.writer is None:
                self.file = open(self.path, "w", newline="")  # closed in close()
                self.writer = csv.DictWriter(self.file, fieldnames=list(row))
                self.writer.writeheader()
            self.writer.writerow(row)
            self.file.flush()
        self.rows.append(row)

    def restore(self, rows):
        """Rewrite the file with the rows of a resumed run."""
        for row in rows:
            self.write(row)

    def close(self):
        if self.file is not None:
            self.file.close()
