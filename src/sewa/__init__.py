"""sewa: pick which checkpoints of a training run are worth averaging, and average them.

Every method is a weight rule over the recorded snapshots followed by one weighted average;
SeWA learns its rule (Wang et al. 2025, arXiv 2502.10119). Methods are objects made by the
constructors of :mod:`sewa.methods` (``sewa.methods.lawa(top_k=10)``, ``sewa.methods.sewa()``).
"""

from . import methods, weights
from .average import apply, average
from .bn import update_bn
from .disk import DiskTrajectory
from .io import CheckpointError, load_state_dict_file, save_state_dict, trajectory_from_files
from .methods import Evaluator, Method, MethodResult
from .recording import Recorder, record
from .select import Selection, SelectionError, select, trainable_average
from .trajectory import Trajectory, TrajectoryError

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
