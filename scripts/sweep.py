#!/usr/bin/env python
"""Run a sweep YAML (conf/sweep/*.yaml): see lsr_run.sweep."""

from lsr_run.sweep import main

if __name__ == "__main__":
    main()
