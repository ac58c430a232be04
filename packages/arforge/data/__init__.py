"""arforge's data layer: image datasets, transforms, token codes and their extraction.

- :mod:`arforge.data.transforms`: the ADM and Open-MAGVIT2 transforms and the
  extraction crops (docs/data.md#transforms, docs/data.md#ten-crop-code-extraction), selectable by name.
- :mod:`arforge.data.image_datasets`: ImageNet-layout folders, webdataset
  shards (and the shard writer), :func:`make_loader`, :class:`DataError`.
- :mod:`arforge.data.digits`: scikit-learn's digits, the offline quickstart data.
- :mod:`arforge.data.token_codes`: the on-disk token-code format, writer and reader.
- :mod:`arforge.data.extraction`: the ``extract_codes`` job.

Components here never import gin or MLflow; they are registered as
``datasets.<name>`` and ``jobs.extract_codes`` through entry points.
"""

from arforge.data.digits import DigitsDataset
from arforge.data.extraction import ExtractionResult, LocalContext, extract_codes, local_context
from arforge.data.image_datasets import (
    DataError,
    ImageFolderDataset,
    ImageSample,
    ImageShardsDataset,
    ShardsInfo,
    make_loader,
    set_epoch,
    write_image_shards,
)
from arforge.data.token_codes import (
    CodesManifest,
    TokenCodeDataset,
    TokenCodeWriter,
    TokenSample,
    VocabularyError,
)
from arforge.data.transforms import (
    TRANSFORMS,
    ExtractionCrops,
    build_transform,
    center_crop_arr,
    random_crop_arr,
)

__all__ = [
    "CodesManifest", "DataError", "DigitsDataset", "ExtractionCrops", "ExtractionResult", "ImageFolderDataset",
    "ImageSample", "ImageShardsDataset", "LocalContext", "ShardsInfo", "TRANSFORMS", "TokenCodeDataset",
    "TokenCodeWriter", "TokenSample", "VocabularyError", "build_transform", "center_crop_arr",
    "extract_codes", "local_context", "make_loader", "random_crop_arr", "set_epoch", "write_image_shards",
]
