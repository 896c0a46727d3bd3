"""Dictionary features: sparse autoencoders and transcoders inside the hooked model.

`dictionary` (SparseDictionary, DictionaryConfig); more modules (formats, splicing, training,
evaluation, dashboards) join as they land.
"""

from interp.sae.dictionary import ARCHITECTURES, DictionaryConfig, DictionaryConfigError, SparseDictionary

__all__ = ["ARCHITECTURES", "DictionaryConfig", "DictionaryConfigError", "SparseDictionary"]

from interp.sae.formats import (  # noqa: E402
    DictionaryFormatError,
    DictionaryMismatchError,
    DictionaryWeightsError,
    DimensionMismatchError,
    HookNameError,
    HookNotInModelError,
    MissingConfigFieldsError,
    NormNotFoldedError,
    UnknownDictionaryFormatError,
    UnsupportedDictionaryError,
    check_fits,
    detect_format,
    load_dictionary,
    save_dictionary,
)

__all__ += ["DictionaryFormatError", "DictionaryMismatchError", "DictionaryWeightsError", "DimensionMismatchError",
            "HookNameError", "HookNotInModelError", "MissingConfigFieldsError", "NormNotFoldedError",
            "UnknownDictionaryFormatError", "UnsupportedDictionaryError", "check_fits", "detect_format",
            "load_dictionary", "save_dictionary"]

# `splice` itself stays in its module: exported here, the function would shadow the submodule interp.sae.splice.
from interp.sae.splice import (  # noqa: E402
    SpliceError, run_with_cache_with_saes, run_with_hooks_with_saes, run_with_saes, spliced,
)

__all__ += ["SpliceError", "run_with_cache_with_saes", "run_with_hooks_with_saes", "run_with_saes", "spliced"]

from interp.sae.evaluate import DictionaryEvaluation, evaluate_dictionary  # noqa: E402
from interp.sae.train import IncompatibleCheckpointError, TrainingOptions, TrainingRun, train_dictionary  # noqa: E402

__all__ += ["DictionaryEvaluation", "IncompatibleCheckpointError", "TrainingOptions", "TrainingRun",
            "evaluate_dictionary", "train_dictionary"]
