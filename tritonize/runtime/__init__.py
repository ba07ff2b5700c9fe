"""The runtime code that every generated repository carries.

`tritonize generate` copies this package verbatim into each Python-backend model folder as the
top-level package ``tritonize_backend`` so that the server's Python needs torch, numpy, safetensors,
tokenizers and sentencepiece, but not tritonize itself. Hence: relative imports only inside this
package, and nothing else from ``tritonize`` (tests/test_layout.py checks it). ``triton/`` holds the model
files copied as each model.py beside it, not into it.
"""
