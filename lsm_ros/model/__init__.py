"""The networks of the Large Spatial Model, pure PyTorch (no ROS).

- :class:`LargeSpatialModel`: the whole model and its stage API (geometry, semantics, gaussians, text queries);
- :class:`Dust3rNet`, :class:`LSegFeatureExtractor`, :class:`ClipTextEncoder`, :class:`PointTransformerV3LSM`,
  :class:`GaussianHead`: its parts, each with a config dataclass (``.tiny()`` for tests);
- loaders of the official checkpoint files (safe: ``weights_only``, nothing from a file is executed).
"""
from .checkpoint import CheckpointError, load_checkpoint_file, load_dust3r_checkpoint, parse_constructor_string
from .clip_text import ClipTextConfig, ClipTextEncoder
from .dust3r import Dust3rConfig, Dust3rNet
from .gaussian_head import GaussianHead, GaussianHeadConfig, knn_mean_squared_distance
from .lseg import LSEG_LOGIT_SCALE, LSegConfig, LSegFeatureExtractor, decode_labels, load_lseg_checkpoint
from .lsm import LargeSpatialModel, LsmConfig, merge_points
from .ptv3 import PointTransformerV3LSM, PTv3Config

__all__ = ['CheckpointError', 'ClipTextConfig', 'ClipTextEncoder', 'Dust3rConfig', 'Dust3rNet', 'GaussianHead',
           'GaussianHeadConfig', 'LSEG_LOGIT_SCALE', 'LSegConfig', 'LSegFeatureExtractor', 'LargeSpatialModel',
           'LsmConfig', 'PTv3Config', 'PointTransformerV3LSM', 'decode_labels', 'knn_mean_squared_distance',
           'load_checkpoint_file', 'load_dust3r_checkpoint', 'load_lseg_checkpoint', 'merge_points',
           'parse_constructor_string']
