"""The application built on the public face: a standard attention encoder-decoder trained on
a small embedded task (`data`: dates written many ways -> ISO dates; `models`: encoder,
attention decoder, Seq2Seq; `decoding`: greedy and beam search; `train`: the loop and
checkpoints; `cli`: `python -m fused_s2s demo|bench|info`).

Imports: torch and the public face (`fused_s2s`, `fused_s2s.functional`); never
`fused_s2s.backends`, the plumbing under it.
"""
