"""fused_s2s benchmark suite: `python -m bench --help`; bench/README.md says what each column means."""
