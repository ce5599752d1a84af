"""What scoring and training share, below both: image decoding, safe archive
reading and the model artifact (custom layers, loading with its checks, the
compiled inference call, precision, Grad-CAM).

Imports run one way: `schemas` ← `busi_core` ← {`beam_pipeline`,
`training`}; `tests/test_layers_contract.py` keeps them so.
"""
