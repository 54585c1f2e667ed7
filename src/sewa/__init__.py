"""sewa: pick which checkpoints of a training run are worth averaging, and average them.

Every method is a weight rule over the recorded snapshots followed by one weighted average;
SeWA learns its rule (Wang et al. 2025, arXiv 2502.10119).
"""

from . import weights
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
from .methods import DEFAULT_METHODS, METHODS, Context, MethodResult, register, run_method
from .recording import Recorder, record
from .select import Selection, project_budget, select, tau_schedule, trainable_average
from .trajectory import Trajectory, TrajectoryError, canonical_name

__version__ = "0.1.0"

__all__ = [
    "Trajectory",
    "TrajectoryError",
    "canonical_name",
    "weights",
    "average",
    "average_flat",
    "apply",
    "update_bn",
    "has_batchnorm",
    "select",
    "Selection",
    "trainable_average",
    "project_budget",
    "tau_schedule",
    "METHODS",
    "DEFAULT_METHODS",
    "Context",
    "MethodResult",
    "register",
    "run_method",
    "DiskTrajectory",
    "Recorder",
    "record",
    "CheckpointError",
    "load_state_dict_file",
    "order_checkpoints",
    "save_state_dict",
    "trajectory_from_files",
    "__version__",
]
