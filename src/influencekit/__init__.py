"""influencekit: influence functions (Koh & Liang 2017) for PyTorch models.

Which training points made the model predict this? See ``Influence`` for the sign and scale
conventions: rows are test points, columns training points; ``loo_change`` = −I_up,loss / n is
the predicted change of the test loss when a training point is removed (positive = helpful).
"""

from . import solvers, training, validation
from .ensemble import Ensemble
from .errors import (
    CacheMismatchError,
    ConvergenceWarning,
    DeviceMismatchError,
    DtypeError,
    EmptyDatasetError,
    IndefiniteHessianError,
    IndexOutOfRangeError,
    InfluenceKitError,
    InputError,
    InputTypeError,
    InvalidSettingError,
    NonFiniteError,
    NotFittedError,
    ObjectiveMismatchError,
    ShapeMismatchError,
    SolverDivergedError,
    StaleFitError,
    StationarityWarning,
    UnknownParameterError,
    UnknownSolverError,
    UnsupportedEstimatorError,
    UnsupportedModelError,
)
from .influence import Influence, TopK
from .objective import (
    BinaryLogisticObjective,
    CausalLMObjective,
    CrossEntropyObjective,
    MSEObjective,
    Objective,
    SmoothHingeObjective,
    SquaredHingeObjective,
)
from .projection import KroneckerProjection, RandomProjection
from .scikit import from_sklearn, sklearn_data
from .solvers import CG, EKFAC, KFAC, Arnoldi, Deflated, Direct, LiSSA, SolveReport
from .store import GradientStore, ScoreStore, open_store
from .version import __version__

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "Arnoldi",
    "BinaryLogisticObjective",
    "CacheMismatchError",
    "CausalLMObjective",
    "ConvergenceWarning",
    "CrossEntropyObjective",
    "Deflated",
    "DeviceMismatchError",
    "Direct",
    "DtypeError",
    "EmptyDatasetError",
    "Ensemble",
    "GradientStore",
    "IndefiniteHessianError",
    "IndexOutOfRangeError",
    "Influence",
    "InfluenceKitError",
    "InputError",
    "InputTypeError",
    "InvalidSettingError",
    "KroneckerProjection",
    "LiSSA",
    "MSEObjective",
    "NonFiniteError",
    "NotFittedError",
    "Objective",
    "ObjectiveMismatchError",
    "RandomProjection",
    "ScoreStore",
    "ShapeMismatchError",
    "SmoothHingeObjective",
    "SolveReport",
    "SolverDivergedError",
    "SquaredHingeObjective",
    "StaleFitError",
    "StationarityWarning",
    "TopK",
    "UnknownParameterError",
    "UnknownSolverError",
    "UnsupportedEstimatorError",
    "UnsupportedModelError",
    "__version__",
    "from_sklearn",
    "open_store",
    "sklearn_data",
    "solvers",
    "training",
    "validation",
]
