"""scaler: an architecture scaling compiler for adversarially robust CNNs.

Light on purpose: importing `scaler` pulls in neither torch nor sympy. The heavy parts
(`scaler.builder`, `scaler.derive`) import them when called. The API (`scaler.api`):
`get_spec`, `count`, `solve`, `emit`, `create_model`.
"""

from scaler.api import count, create_model, emit, get_spec, solve
from scaler.errors import ScalerError
from scaler.spec import ArchSpec

__version__ = "0.1.0"

__all__ = ["ArchSpec", "ScalerError", "__version__", "count", "create_model", "emit", "get_spec", "solve"]
