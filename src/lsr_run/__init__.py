"""lsr-run: one experiment runner for learned sparse retrieval (SPLADE and kin)."""

__version__ = "0.1.0"
