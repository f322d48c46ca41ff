"""edgeqwen: export small Qwen models to int4/int8 ONNX bundles and run them on edge devices.

Importing this package must stay cheap: it pulls in nothing beyond the standard library, so that
`import edgeqwen.runtime` on a board costs only numpy + onnxruntime + tokenizers + jinja2.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
