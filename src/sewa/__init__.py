"""sewa: pick which checkpoints of a training run are worth averaging, and average them.

Every method is a weight rule over the recorded snapshots followed by one weighted average;
SeWA learns its rule (Wang et al. 2025, arXiv 2502.10119). Methods are objects made by the
constructors of :mod:`sewa.methods` (``sewa.methods.lawa(top_k=10)``, ``sewa.methods.sewa()``).
"""

from . import methods, weights
from .average import apply, average, average_flat
from .bn import has_batchnorm, update_bn
from .disk import DiskTrajectory
from .io import (
    CheckpointError,
    load_state_dict_file,
    order_checkpoints,
    save_state_dict,
    trajectory_from_files,
)
from .methods import Evaluator, Method, MethodResult
from .recording import Recorder, record
from .select import (
    Selection,
    SelectionError,
    project_budget,
    select,
    tau_schedule,
    trainable_average,
)
from .trajectory import Trajectory, TrajectoryError, canonical_name

__version__ = "0.1.0"

__all__ = [
    "Trajectory",
    "DiskTrajectory",
    "TrajectoryError",
    "record",
    "Recorder",
    "weights",
    "methods",
    "Method",
    "MethodResult",
    "Evaluator",
    "select",
    "Selection",
    "SelectionError",
    "trainable_average",
    "average",
    "apply",
    "update_bn",
    "trajectory_from_files",
    "load_state_dict_file",
    "save_state_dict",
    "CheckpointError",
    "__version__",
]

# Importable here for older code, but not part of the public API: use their modules.
_compat = (average_flat, has_batchnorm, order_checkpoints, project_budget, tau_schedule, canonical_name)
