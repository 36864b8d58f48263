"""Data: readers per source format, the canonical case, the DataModule."""
