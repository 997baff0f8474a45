"""Put on PYTHONPATH, this makes a Python process behave as if TensorFlow were not
installed: importing it raises ModuleNotFoundError and ``importlib.util.find_spec`` finds
nothing (tests/integration/test_backends.py starts the JAX and PyTorch backends this way)."""

import sys

sys.modules["tensorflow"] = None  # type: ignore[assignment]
