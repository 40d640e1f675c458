"""The networks of the Large Spatial Model, pure PyTorch (no ROS)."""
from .checkpoint import CheckpointError, load_checkpoint_file, load_dust3r_checkpoint, parse_constructor_string
from .dust3r import Dust3rConfig, Dust3rNet

__all__ = ['CheckpointError', 'Dust3rConfig', 'Dust3rNet', 'load_checkpoint_file', 'load_dust3r_checkpoint',
           'parse_constructor_string']
