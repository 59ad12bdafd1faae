"""influencekit: influence functions (Koh & Liang 2017) for PyTorch models.

Which training points made the model predict this? See ``Influence`` for the sign and scale
conventions: rows are test points, columns training points; ``loo_change`` = −I_up,loss / n is
the predicted change of the test loss when a training point is removed (positive = helpful).
"""

from . import solvers, training, validation
from .errors import (
    ConvergenceWarning,
    EmptyDatasetError,
    IndefiniteHessianError,
    InfluenceKitError,
    InputError,
    NonFiniteError,
    NotFittedError,
    ObjectiveMismatchError,
    ShapeMismatchError,
    SolverDivergedError,
    UnknownParameterError,
    UnknownSolverError,
)
from .influence import Influence, TopK
from .objective import (
    BinaryLogisticObjective,
    CrossEntropyObjective,
    MSEObjective,
    Objective,
    SmoothHingeObjective,
)
from .solvers import CG, Direct, LiSSA

__version__ = "0.1.0"

__all__ = [
    "CG",
    "BinaryLogisticObjective",
    "ConvergenceWarning",
    "CrossEntropyObjective",
    "Direct",
    "EmptyDatasetError",
    "IndefiniteHessianError",
    "Influence",
    "InfluenceKitError",
    "InputError",
    "LiSSA",
    "MSEObjective",
    "NonFiniteError",
    "NotFittedError",
    "Objective",
    "ObjectiveMismatchError",
    "ShapeMismatchError",
    "SmoothHingeObjective",
    "SolverDivergedError",
    "TopK",
    "UnknownParameterError",
    "UnknownSolverError",
    "__version__",
    "solvers",
    "training",
    "validation",
]
