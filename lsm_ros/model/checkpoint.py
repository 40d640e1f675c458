"""Safe loading of checkpoint files, and of official DUSt3R checkpoints
(``DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth``) into :class:`Dust3rNet`.

Safety rules: pickle checkpoint files are read with ``torch.load(weights_only=True)`` and an allow-list of one
extra global (``argparse.Namespace``) plus an inert stand-in for training-framework metadata; model constructor
strings (``args.model``) are parsed with :mod:`ast` and only literals are accepted. Nothing from a checkpoint is
ever executed.

Official file layout: ``{'args': Namespace(model="AsymmetricCroCo3DStereo(...)"), 'model': state_dict}``.

``.safetensors`` files (written by ``lsm-ros weights convert``, see :func:`checkpoint_to_safetensors`) are read
without pickle: a JSON header, raw tensor bytes, and in the header's metadata the kind of checkpoint
(:data:`KIND_KEY`) and its non-tensor part as JSON (:data:`EXTRA_KEY`: the DUSt3R/LSM ``args``, LSeg's
hyper-parameters). :func:`load_checkpoint_file` detects them by content and returns the official layout, so every
loader accepts them unchanged. A safetensors file without our metadata loads as a plain state dict.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import pickle
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .dust3r import CLASS_NAME, Dust3rConfig, Dust3rNet

logger = logging.getLogger(__name__)

ALLOWED_GLOBALS = (argparse.Namespace,)
UNUSED_OFFICIAL_KEYS = frozenset({'mask_token'})  # CroCo's masked-pretraining token, unused at inference
_NAMED_CONSTANTS = {'inf': math.inf, 'nan': math.nan, 'True': True, 'False': False, 'None': None}
_SHOWN = 5  # keys listed per kind of mismatch in error messages


class CheckpointError(RuntimeError):
    """A checkpoint file or its content cannot be used (missing, unsafe, malformed or not matching the model)."""


# ------------------------------------------------------------------------------------------------ reading files
# Modules whose pickled objects are training metadata that the weights never need, e.g. PyTorch Lightning's
# AttributeDict of hyper-parameters in LSeg's demo_e200.ckpt: such a class is read as a plain dict (its items
# kept, none of its code run). An object that a dict cannot stand in for makes the file unreadable.
TRAINING_METADATA_MODULES = ('pytorch_lightning.', 'lightning.', 'lightning_fabric.', 'omegaconf.')
_MAX_STAND_INS = 32


def _refused_global(error: Exception) -> str | None:
    match = re.search(r'GLOBAL ([\w.]+)', str(error))
    return match.group(1) if match else None


def load_checkpoint_file(path: str | os.PathLike[str], map_location: str | torch.device = 'cpu',
                         mmap: bool = False) -> Any:
    """Read a ``torch.save`` file without executing code: ``weights_only=True`` plus ``argparse.Namespace``;
    a ``.safetensors`` file (detected by content) is read without pickle, in the official layout
    (:func:`load_safetensors_checkpoint`).

    Dict-like objects of training frameworks (:data:`TRAINING_METADATA_MODULES`, e.g. Lightning's
    hyper-parameter dicts) are read as plain dicts. ``mmap``: map the tensors' storage instead of reading it
    (zip-format files), so entries that are dropped are never read from disk. Raises CheckpointError when the
    file is missing, is not a PyTorch checkpoint, or its pickle needs any other global (named in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint file not found: {path}')
    if is_safetensors_file(path):
        return load_safetensors_checkpoint(path, map_location, mmap)
    if path.suffix == SAFETENSORS_SUFFIX:
        raise CheckpointError(f'{path} has the {SAFETENSORS_SUFFIX} extension but is not a safetensors file '
                              '(bad header)')
    allowed: list[Any] = list(ALLOWED_GLOBALS)
    for _ in range(_MAX_STAND_INS):
        try:
            with torch.serialization.safe_globals(allowed):
                return _torch_load(path, map_location, mmap)
        except pickle.UnpicklingError as err:
            refused = _refused_global(err)
            if refused is None or not refused.startswith(TRAINING_METADATA_MODULES):
                what = f'the global {refused!r}' if refused else 'a pickle instruction that is not allowed'
                raise CheckpointError(
                    f'refused to load {path}: it needs {what}. Only tensors, plain containers, argparse.Namespace '
                    'and training metadata are allowed; code from checkpoints is never executed.') from None
            logger.info('%s: reading %s as a plain dict (training metadata)', path, refused)
            allowed.append((dict, refused))
        except Exception as err:  # torch raises RuntimeError, KeyError, EOFError, ... for non-checkpoint files
            raise CheckpointError(f'{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})'
                                  ) from err
    raise CheckpointError(f'refused to load {path}: more than {_MAX_STAND_INS} training-metadata classes')


def _torch_load(path: Path, map_location: str | torch.device, mmap: bool) -> Any:
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as err:
            if 'mmap' not in str(err):  # only the legacy (non-zip) format cannot be mapped
                raise
    return torch.load(path, map_location=map_location, weights_only=True)


# ------------------------------------------------------------------------------------------------ safetensors
SAFETENSORS_SUFFIX = '.safetensors'
FORMAT_KEY = 'lsm_ros.format'        # metadata keys of the files lsm-ros writes
FORMAT_VERSION = 'lsm_ros-checkpoint/1'
KIND_KEY = 'lsm_ros.kind'            # 'dust3r', 'lseg' or 'lsm'
EXTRA_KEY = 'lsm_ros.checkpoint'     # JSON: the official checkpoint's non-tensor part that the loaders read
SOURCE_KEY = 'lsm_ros.source'        # file name of the converted checkpoint
CHECKPOINT_KINDS = ('dust3r', 'lseg', 'lsm')
# the entry of the official checkpoint that holds the state dict, per kind
STATE_DICT_ENTRY = {'dust3r': 'model', 'lseg': 'state_dict', 'lsm': 'model'}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
    'BOOL': torch.bool}
for _name, _attr in (('U16', 'uint16'), ('U32', 'uint32'), ('U64', 'uint64'), ('F8_E4M3', 'float8_e4m3fn'),
                     ('F8_E5M2', 'float8_e5m2')):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def is_safetensors_file(path: str | os.PathLike[str]) -> bool:
    """True when the file starts like a safetensors file: an 8-byte little-endian header length that fits the
    file, then a JSON object. (Zip-format and legacy ``torch.save`` files never do.)"""
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    header_bytes = struct.unpack('<Q', head[:8])[0]
    return 2 <= header_bytes <= min(size - 8, _MAX_HEADER_BYTES) and head[8:9] == b'{'


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(tensor entries {name: {'dtype', 'shape', 'data_offsets'}}, metadata, byte offset of the data) of a
    safetensors file, validated: known dtypes, non-negative shapes whose byte size matches the offsets, and
    non-overlapping ranges inside the file. Raises CheckpointError otherwise. Reads only the header."""
    path = Path(path)
    with open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f'{path}: too short for a safetensors file')
        header_bytes = struct.unpack('<Q', head)[0]
        if header_bytes > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f'{path}: safetensors header length {header_bytes} does not fit the file')
        raw = f.read(header_bytes)
    try:
        header = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f'{path}: safetensors header is not valid JSON ({err})') from None
    if not isinstance(header, dict):
        raise CheckpointError(f'{path}: safetensors header is not a JSON object')
    metadata = header.pop('__metadata__', None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in metadata.items())):
        raise CheckpointError(f'{path}: safetensors __metadata__ must map strings to strings')
    data_start = 8 + header_bytes
    data_size = size - data_start
    ranges = []
    for name, entry in header.items():
        problem = _entry_problem(entry, data_size)
        if problem:
            raise CheckpointError(f'{path}: safetensors entry {name!r}: {problem}')
        ranges.append((*entry['data_offsets'], name))
    ranges.sort()
    for (_, end, name), (begin, _, following) in zip(ranges, ranges[1:]):
        if begin < end:
            raise CheckpointError(f'{path}: safetensors entries {name!r} and {following!r} overlap')
    return header, metadata, data_start


def _entry_problem(entry: Any, data_size: int) -> str | None:
    if not isinstance(entry, dict) or set(entry) != {'dtype', 'shape', 'data_offsets'}:
        return 'expected exactly dtype, shape and data_offsets'
    dtype, shape, offsets = entry['dtype'], entry['shape'], entry['data_offsets']
    if dtype not in _SAFETENSORS_DTYPES:
        return f'unsupported dtype {dtype!r}'
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return f'bad shape {shape!r}'
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):
        return f'data_offsets {offsets!r} outside the {data_size} data bytes'
    expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        return f'{offsets[1] - offsets[0]} bytes for shape {shape} of {dtype} ({expected} expected)'
    return None


# byte alignment of the tensors in memory (torch's allocator and its own checkpoint files align to 64 bytes)
TENSOR_ALIGNMENT = 64


def load_safetensors_file(path: str | os.PathLike[str], map_location: str | torch.device = 'cpu',
                          mmap: bool = False) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, without pickle. ``mmap``: the tensors are views of a private
    (copy-on-write) memory map of the file, read from disk only where used; else they are copied into memory.
    Raises CheckpointError for a malformed file."""
    path = Path(path)
    header, metadata, data_start = read_safetensors_header(path)
    size = path.stat().st_size
    flat = torch.empty(0, dtype=torch.uint8)
    if size:
        flat = flat.set_(torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size))
    tensors: dict[str, Tensor] = {}
    for name, entry in header.items():
        begin, end = (data_start + offset for offset in entry['data_offsets'])
        dtype = _SAFETENSORS_DTYPES[entry['dtype']]
        raw = flat[begin:end]
        if begin % TENSOR_ALIGNMENT:
            # not on a 64-byte boundary: copy it into aligned memory (a view must at least be aligned to its element
            # size; CPU kernels also round differently for operands with other alignments than torch's 64 bytes)
            raw = raw.clone()
        tensor = raw.view(dtype).reshape(entry['shape'])
        if not mmap:
            tensor = tensor.clone()
        tensors[name] = tensor if torch.device(map_location).type == 'cpu' else tensor.to(map_location)
    return tensors, metadata


def save_safetensors_file(path: str | os.PathLike[str], tensors: Mapping[str, Tensor],
                          metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (a flat name -> dense tensor dict) and string ``metadata`` as a safetensors file,
    streaming one tensor at a time (no second copy of the whole file in memory). Entries are ordered by element
    size, largest first, so every tensor starts at a multiple of its element size (zero-copy memory mapping), and
    the data and most tensors start on 64-byte boundaries (see TENSOR_ALIGNMENT).
    The file appears atomically (written next to ``path``, then renamed)."""
    path = Path(path)
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor) or tensor.layout != torch.strided:
            raise CheckpointError(f'{name!r}: only dense tensors under string names can be written')
        if tensor.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f'{name!r}: dtype {tensor.dtype} has no safetensors equivalent')
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    # largest elements first (every tensor starts at a multiple of its element size), and within an element size
    # the tensors whose byte size is a multiple of TENSOR_ALIGNMENT first (each of those starts 64-byte aligned)
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(),
                                              tensors[name].numel() * tensors[name].element_size() % TENSOR_ALIGNMENT
                                              != 0, name))
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = {'dtype': _DTYPE_NAMES[tensor.dtype], 'shape': list(tensor.shape),
                         'data_offsets': [offset, offset + nbytes]}
        offset += nbytes
    header: dict[str, Any] = {}
    if metadata:
        header['__metadata__'] = dict(metadata)
    header.update(entries)
    encoded = json.dumps(header, separators=(',', ':')).encode('utf-8')
    # the data starts 64-byte aligned (8-byte length + header), so the tensors ordered above start on 64-byte
    # boundaries as in torch's own files (CPU kernels take alignment-dependent paths: equally aligned weights give
    # bit-identical results); the few others are copied into aligned memory when loaded
    encoded += b' ' * (-(8 + len(encoded)) % TENSOR_ALIGNMENT)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(handle, 'wb') as f:
            f.write(struct.pack('<Q', len(encoded)))
            f.write(encoded)
            for name in order:
                tensor = tensors[name].detach().to('cpu').contiguous()
                if tensor.numel():
                    f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_safetensors_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = 'cpu',
                                mmap: bool = False) -> dict[str, Any]:
    """A safetensors file in the layout of the official checkpoint it was converted from (by its
    :data:`KIND_KEY`): DUSt3R and LSM ``{'args': {...}, 'model': tensors}``, LSeg ``{'state_dict': tensors,
    'hyper_parameters': {...}}``; a file without our metadata: the plain tensor dict."""
    tensors, metadata = load_safetensors_file(path, map_location, mmap)
    kind = metadata.get(KIND_KEY)
    if kind is None:
        return tensors
    if kind not in CHECKPOINT_KINDS:
        raise CheckpointError(f'{path}: unknown {KIND_KEY} {kind!r}; expected one of {CHECKPOINT_KINDS}')
    try:
        extra = json.loads(metadata.get(EXTRA_KEY, '{}'))
    except json.JSONDecodeError as err:
        raise CheckpointError(f'{path}: metadata {EXTRA_KEY} is not valid JSON ({err})') from None
    if not isinstance(extra, dict) or STATE_DICT_ENTRY[kind] in extra:
        raise CheckpointError(f'{path}: metadata {EXTRA_KEY} must be a JSON object without '
                              f'{STATE_DICT_ENTRY[kind]!r}')
    return {**extra, STATE_DICT_ENTRY[kind]: tensors}


def checkpoint_kind(checkpoint: Any) -> str | None:
    """'dust3r', 'lseg' or 'lsm' by the structure of a loaded official checkpoint (the class its ``args.model``
    builds, or a Lightning ``state_dict``), None when it is none of them. Evaluates nothing: a constructor string
    that is not literal-only raises CheckpointError (:func:`parse_constructor_string`)."""
    if not isinstance(checkpoint, Mapping):
        return None
    text = args_model_string(checkpoint)
    if text is not None:
        return {CLASS_NAME: 'dust3r', 'LSM_Dust3R': 'lsm'}.get(parse_constructor_string(text)[0])
    if isinstance(checkpoint.get('state_dict'), Mapping):
        return 'lseg'
    return None


def _json_safe(value: Any) -> Any:
    """Plain JSON data of checkpoint metadata: Namespaces and mappings become objects (keys as str), tuples and
    lists arrays; numbers (inf and nan included), strings, bools and None stay; anything else becomes its str()."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def checkpoint_to_safetensors(checkpoint: Mapping[str, Any], kind: str, source: str = '',
                              args_model: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of an official checkpoint for :func:`save_safetensors_file`: the state dict's tensors
    as they are (names, dtypes, values), and as JSON metadata what the loaders read besides them: ``args`` of a
    DUSt3R or LSM file (``args_model`` replaces its constructor string), LSeg's ``hyper_parameters``. Training
    state (optimizer, epoch, ...) is not kept. Raises CheckpointError when the checkpoint is not of ``kind``."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f'kind must be one of {CHECKPOINT_KINDS}, got {kind!r}')
    found = checkpoint_kind(checkpoint)
    if found != kind:
        what = f'a {found} checkpoint' if found else f'none of {", ".join(CHECKPOINT_KINDS)}'
        raise CheckpointError(f'{source or "the checkpoint"} is {what}, expected a {kind} checkpoint')
    state = checkpoint[STATE_DICT_ENTRY[kind]]
    if not isinstance(state, Mapping):
        raise CheckpointError(f'{source or "checkpoint"}: no state dict under {STATE_DICT_ENTRY[kind]!r}')
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise CheckpointError(f'{source or "checkpoint"}: state dict entries that are not tensors: '
                              f'{_examples(not_tensors)}')
    if kind == 'lseg':
        extra = {'hyper_parameters': _json_safe(checkpoint.get('hyper_parameters') or {})}
    else:
        args = checkpoint['args']
        extra = {'args': _json_safe(args if isinstance(args, Mapping) else vars(args))}
        if args_model is not None:
            extra['args']['model'] = args_model
    metadata = {'format': 'pt', FORMAT_KEY: FORMAT_VERSION, KIND_KEY: kind, EXTRA_KEY: json.dumps(extra)}
    if source:
        metadata[SOURCE_KEY] = source
    return dict(state), metadata


# ------------------------------------------------------------------------------------------------ constructor strings
def parse_constructor_string(text: str) -> tuple[str, dict[str, Any]]:
    """``"ClassName(key=value, ...)"`` -> ("ClassName", {key: value}) without evaluating anything.

    Values may be str/int/float/bool/None literals, tuples, lists, dicts (nested), unary +/- on numbers and the
    names inf, nan, True, False, None. Anything else (calls, attribute access, other names, lambdas, operators,
    positional or ** arguments) raises CheckpointError.
    """
    if not isinstance(text, str):
        raise CheckpointError(f'constructor string must be a str, got {type(text).__name__}')
    try:
        tree = ast.parse(text.strip(), mode='eval')
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise CheckpointError(f'constructor string is not valid syntax: {err}') from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        raise CheckpointError(f'constructor string must look like ClassName(key=value, ...), got {text[:80]!r}')
    if call.args:
        raise CheckpointError(f'positional arguments are not accepted in {text[:80]!r}')
    kwargs: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise CheckpointError('** unpacking is not accepted in a constructor string')
        kwargs[keyword.arg] = _literal(keyword.value)
    return call.func.id, kwargs


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and (node.value is None or type(node.value) in (str, int, float, bool)):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if type(value) not in (int, float):
            raise CheckpointError(f'unary sign on a non-number: {ast.unparse(node)[:60]!r}')
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(key is None for key in node.keys):
            raise CheckpointError('** unpacking is not accepted in a constructor string')
        try:
            return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
        except TypeError as err:  # unhashable key
            raise CheckpointError(f'bad dict key in constructor string: {err}') from None
    raise CheckpointError(
        f'refused {type(node).__name__} {ast.unparse(node)[:60]!r} in a constructor string: only literals, '
        'tuples, lists, dicts, unary minus and inf/nan/True/False/None are accepted (nothing is evaluated)')


# ------------------------------------------------------------------------------------------------ key mapping
def _renames() -> list[tuple[str, str]]:
    """(official prefix, our prefix) pairs; a key is renamed by the one pair whose official prefix it starts with."""
    pairs = [(p, p) for p in ('patch_embed.proj.', 'enc_blocks.', 'enc_norm.', 'decoder_embed.', 'dec_blocks2.',
                              'dec_norm.')]
    pairs.append(('dec_blocks.', 'dec_blocks1.'))
    for head in (1, 2):
        official, ours = f'downstream_head{head}.dpt.', f'head{head}.'
        for level in range(4):
            pairs += [
                (f'{official}act_postprocess.{level}.0.', f'{ours}reassemble.{level}.project.'),
                (f'{official}act_postprocess.{level}.1.', f'{ours}reassemble.{level}.resample.'),
                (f'{official}scratch.layer{level + 1}_rn.', f'{ours}feature_convs.{level}.'),
                (f'{official}scratch.refinenet{level + 1}.resConfUnit1.', f'{ours}fusion.{level}.residual1.'),
                (f'{official}scratch.refinenet{level + 1}.resConfUnit2.', f'{ours}fusion.{level}.residual2.'),
                (f'{official}scratch.refinenet{level + 1}.out_conv.', f'{ours}fusion.{level}.out_conv.'),
            ]
        pairs += [(f'{official}head.{index}.', f'{ours}output.{name}.')
                  for index, name in ((0, 'conv1'), (2, 'conv2'), (4, 'conv3'))]
    return pairs


KEY_RENAMES: tuple[tuple[str, str], ...] = tuple(_renames())
# official alias key -> the canonical official key holding the same tensor
ALIASES: dict[str, str] = {
    f'downstream_head{head}.dpt.scratch.layer_rn.{level}.weight':
        f'downstream_head{head}.dpt.scratch.layer{level + 1}_rn.weight'
    for head in (1, 2) for level in range(4)}


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    for source, target in table:
        if key.startswith(source):
            return target + key[len(source):]
    return None


def official_key_to_ours(key: str) -> str | None:
    """Official DUSt3R state-dict key -> our module key, or None when no rule covers it."""
    return _rename(key, KEY_RENAMES)


def our_key_to_official(key: str) -> str | None:
    """Our module key -> official DUSt3R state-dict key, or None when no rule covers it."""
    return _rename(key, tuple((ours, official) for official, ours in KEY_RENAMES))


def map_official_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Official DUSt3R state dict -> (state dict with our keys, official keys no rule covers).

    Drops ``mask_token`` and the ``scratch.layer_rn.*`` aliases; an alias whose canonical key is present must hold
    an equal tensor (else CheckpointError). Values are passed through unchanged (no copy).
    """
    mapped: dict[str, Any] = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        if key in UNUSED_OFFICIAL_KEYS:
            continue
        if key in ALIASES:
            canonical = state_dict.get(ALIASES[key])
            if canonical is None:
                unmapped.append(key)
            elif not (isinstance(value, Tensor) and isinstance(canonical, Tensor)
                      and value.shape == canonical.shape and torch.equal(value, canonical)):
                raise CheckpointError(f'alias {key} differs from {ALIASES[key]}; they must be the same tensor')
            continue
        ours = official_key_to_ours(key)
        if ours is None:
            unmapped.append(key)
        else:
            mapped[ours] = value
    return mapped, unmapped


def to_official_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> the official DUSt3R layout, including the ``scratch.layer_rn.*`` aliases (the same tensor
    objects as their canonical keys). ``mask_token`` is not produced (not part of our network)."""
    official: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = our_key_to_official(key)
        if name is None:
            raise KeyError(f'no official name for {key}')
        official[name] = value
    for alias, canonical in ALIASES.items():
        if canonical in official:
            official[alias] = official[canonical]
    return official


# ------------------------------------------------------------------------------------------------ loading the model
def _examples(items: list[str]) -> str:
    shown = ', '.join(items[:_SHOWN])
    return shown + (f', ... ({len(items) - _SHOWN} more)' if len(items) > _SHOWN else '')


def args_model_string(checkpoint: Mapping[str, Any]) -> str | None:
    """The constructor string ``args.model`` of an official checkpoint (``args`` an argparse Namespace or a
    mapping), None when there is none."""
    args = checkpoint.get('args')
    text = args.get('model') if isinstance(args, Mapping) else getattr(args, 'model', None)
    return text if isinstance(text, str) else None


def _config_from_args(checkpoint: Mapping[str, Any]) -> Dust3rConfig:
    text = args_model_string(checkpoint)
    if text is None:
        raise CheckpointError("checkpoint has no constructor string in args.model; pass config= for a plain "
                              "state dict")
    class_name, kwargs = parse_constructor_string(text)
    if class_name != CLASS_NAME:
        raise CheckpointError(f'checkpoint builds {class_name!r}, expected {CLASS_NAME!r}')
    try:
        return Dust3rConfig.from_constructor_kwargs(kwargs)
    except ValueError as err:
        raise CheckpointError(f'unsupported model configuration in checkpoint: {err}') from None


def state_dict_problems(expected: Mapping[str, Tensor], given: Mapping[str, Any],
                        official_name: Any = lambda key: key, unmapped: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Missing keys, unexpected keys and shape/type mismatches of ``given`` against a model's ``expected`` state
    dict, one summary line per kind (empty when they match). ``official_name`` maps our key to the file's name
    for the messages; ``unmapped``: file keys that no rule maps (reported as unexpected)."""
    missing = [official_name(k) for k in expected if k not in given]
    unexpected = list(unmapped) + [official_name(k) for k in given if k not in expected]
    mismatched = []
    for key, value in given.items():
        if key not in expected:
            continue
        want = expected[key]
        if not isinstance(value, Tensor) or value.is_floating_point() != want.is_floating_point():
            mismatched.append(f'{official_name(key)}: {type(value).__name__} '
                              f'{getattr(value, "dtype", "")} where the model has {want.dtype}')
        elif value.shape != want.shape:
            mismatched.append(f'{official_name(key)}: checkpoint {tuple(value.shape)} vs model {tuple(want.shape)}')
    return [f'{len(items)} {kind}: {_examples(items)}' for kind, items in
            (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', mismatched)) if items]


def load_dust3r_checkpoint(source: str | os.PathLike[str] | Mapping[str, Any], device: str | torch.device = 'cpu',
                           config: Dust3rConfig | None = None) -> Dust3rNet:
    """Build a :class:`Dust3rNet` (eval mode, on ``device``) from an official DUSt3R checkpoint.

    source: a checkpoint path, an already loaded checkpoint dict ``{'args': ..., 'model': ...}``, or, together with
    ``config``, a plain official-layout state dict. With ``config`` given, ``args`` is not read.
    Tensors of a dict source become the model's parameters without a copy (on CPU): do not modify them afterwards.
    Raises CheckpointError naming missing keys, unexpected keys and shape mismatches.
    """
    checkpoint = load_checkpoint_file(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'checkpoint must be a dict, got {type(checkpoint).__name__}')
    if config is None:
        config = _config_from_args(checkpoint)
        state = checkpoint.get('model')
    else:
        state = checkpoint['model'] if isinstance(checkpoint.get('model'), Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise CheckpointError("checkpoint has no state dict under 'model'")

    with torch.device('meta'):
        net = Dust3rNet(config)
    mapped, unmapped = map_official_state_dict(state)
    problems = state_dict_problems(net.state_dict(), mapped, lambda key: our_key_to_official(key) or key, unmapped)
    if problems:
        raise CheckpointError('checkpoint does not match the DUSt3R network; ' + '; '.join(problems))
    net.load_state_dict({k: v.to(torch.float32) for k, v in mapped.items()}, strict=True, assign=True)
    logger.info('loaded DUSt3R: encoder %dx%d, decoder %dx%d, %.1f M parameters', config.enc_embed_dim,
                config.enc_depth, config.dec_embed_dim, config.dec_depth,
                sum(p.numel() for p in net.parameters()) / 1e6)
    return net.to(device).eval()
