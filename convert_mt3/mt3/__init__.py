"""MT3 Hub code: copied verbatim (all but this file) into every converted folder.

Each module imports only torch, numpy, transformers and its siblings (relative imports), so
the folder runs with `trust_remote_code=True` and no convert-mt3 installed.
"""
