"""lsr-run: one experiment runner for learned sparse retrieval (SPLADE and kin)."""

import os

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """``${lsr.abspath:p}``: ``p`` made absolute against the current folder (null stays null)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("lsr.abspath"):
        OmegaConf.register_new_resolver(
            "lsr.abspath", lambda p: None if p in (None, "", "null") else os.path.abspath(os.path.expanduser(str(p))))


_register_resolvers()
