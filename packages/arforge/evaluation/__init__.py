"""Evaluation: the feature-extractor slot, sample/reference batches, reconstruction metrics and jobs.

docs/evaluation.md. The metric math (ADM semantics) is
:mod:`arforge.metrics.adm`; this package feeds it:

- :mod:`arforge.evaluation.feature_extractors`: the :class:`FeatureExtractor`
  protocol, :class:`Features`, and the ADM Inception-v3 through torch-fidelity
  (``feature_extractors.inception``);
- :mod:`arforge.evaluation.sample_batches`: streaming reader and atomic
  streaming writer of ADM-format ``.npz`` batches;
- :mod:`arforge.evaluation.reconstruction`: one-pass tokenizer metrics;
- :mod:`arforge.evaluation.jobs`: ``jobs.evaluate_samples``,
  ``jobs.evaluate_reconstructions`` and ``jobs.make_reference``.

The evaluator plugins (``evaluators.generation``, ``evaluators.reconstruction``)
and the digits classifier live in ``arforge_plugins``.
"""

from arforge.evaluation.feature_extractors import (
    INCEPTION_FILENAME,
    FeatureExtractor,
    FeatureExtractorError,
    Features,
    InceptionV3Features,
    describe,
    extract_features,
)
from arforge.evaluation.jobs import ReferenceInfo, evaluate_reconstructions, evaluate_samples, make_reference
from arforge.evaluation.reconstruction import CodebookUsage, reconstruction_metrics
from arforge.evaluation.sample_batches import (
    BatchFileError,
    ImageBatchReader,
    ImageBatchWriter,
    batch_keys,
    read_arrays,
    write_image_batch,
)

__all__ = [
    "BatchFileError", "CodebookUsage", "FeatureExtractor", "FeatureExtractorError", "Features",
    "INCEPTION_FILENAME", "ImageBatchReader", "ImageBatchWriter", "InceptionV3Features", "ReferenceInfo",
    "batch_keys", "describe", "evaluate_reconstructions", "evaluate_samples", "extract_features",
    "make_reference", "read_arrays", "reconstruction_metrics", "write_image_batch",
]
