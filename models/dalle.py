"""OpenAI DALL-E dVAE encoder (the paper's tokenizer), re-implemented, plus a safe loader.

The official weight file ``encoder.pkl`` is a whole pickled ``dall_e.encoder.Encoder``
module. Unpickling it normally would run whatever code the file names, so it is read
with an allow-list unpickler instead: only the handful of globals that file needs are
resolved, module classes become inert records, and their tensors are copied into a
freshly constructed :class:`Encoder` whose module tree and parameter names match the
official one (``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``, ...).

Both torch container formats are read by hand (zip, and the pre-1.6 "legacy" stream)
because ``torch.load`` either refuses module pickles (``weights_only=True``) or hands
class construction to the pickle module (``weights_only=False``).
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

LOGIT_LAPLACE_EPS = 0.1
WEIGHTS_HINT = "see weights/README.md for where to download it and where to put it"


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0,1] → [eps, 1-eps]: the dVAE was trained on pixels squeezed this way."""
    return (1 - 2 * eps) * x + eps


# ----------------------------------------------------------------------------- model
class Conv2d(nn.Module):
    """Conv with parameters named ``w``/``b`` (as in ``dall_e.utils.Conv2d``), 'same' padding.

    ``use_float16`` marks convs that may run in reduced precision on CUDA; the encoder
    decides the dtype (``Encoder.mixed_precision``). On CPU everything is fp32.
    """

    def __init__(
        self, n_in: int, n_out: int, kw: int, use_float16: bool = True
    ) -> None:
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16 = use_float16
        self.low_precision: str | None = (
            None  # dtype name, kept a str so pickles stay plain
        )
        w = torch.empty(n_out, n_in, kw, kw).normal_(std=1 / math.sqrt(n_in * kw**2))
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_float16 and self.low_precision is not None and x.is_cuda:
            dt = getattr(torch, self.low_precision)
            x, w, b = x.to(dt), self.w.to(dt), self.b.to(dt)
        elif torch.is_autocast_enabled(x.device.type):
            w, b = self.w, self.b  # autocast picks the dtype; a .float() here would round-trip bf16 → fp32 → bf16
        else:
            x, w, b = x.float(), self.w, self.b
        return F.conv2d(x, w, b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    """Residual block: ``id_path(x) + res_path(x) / n_layers²`` (bottleneck of width n_out/4)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        if n_out % 4:
            raise ValueError(f"n_out must be a multiple of 4, got {n_out}")
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        h = self.n_hid
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", Conv2d(n_in, h, 3)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", Conv2d(h, h, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", Conv2d(h, h, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", Conv2d(h, n_out, 1)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """dVAE encoder: image in map_pixels space → B×vocab×(H/8)×(W/8) logits.

    Group g (1-based) has width 2^(g-1)·n_hid and, except the last, ends in a 2×2 max-pool,
    so the downsampling is 2^(group_count-1) (8 for the official 4 groups).
    """

    def __init__(
        self,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        group_count: int = 4,
        input_channels: int = 3,
        vocab_size: int = 8192,
        mixed_precision: torch.dtype | None = torch.float16,
    ) -> None:
        super().__init__()
        if min(n_hid, n_blk_per_group, group_count, input_channels, vocab_size) < 1:
            raise ValueError("all dVAE encoder sizes must be >= 1")
        self.n_hid, self.n_blk_per_group, self.group_count = (
            n_hid,
            n_blk_per_group,
            group_count,
        )
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = group_count * n_blk_per_group
        widths = [n_hid * 2**g for g in range(group_count)]
        groups: list[tuple[str, nn.Module]] = [
            ("input", Conv2d(input_channels, n_hid, 7))
        ]
        n_in = n_hid
        for g, width in enumerate(widths, start=1):
            layers: list[tuple[str, nn.Module]] = []
            for i in range(n_blk_per_group):
                layers.append(
                    (
                        f"block_{i + 1}",
                        EncoderBlock(n_in if i == 0 else width, width, n_layers),
                    )
                )
            if g < group_count:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(layers))))
            n_in = width
        groups.append(
            (
                "output",
                nn.Sequential(
                    OrderedDict(
                        [
                            ("relu", nn.ReLU()),
                            (
                                "conv",
                                Conv2d(widths[-1], vocab_size, 1, use_float16=False),
                            ),
                        ]
                    )
                ),
            )
        )
        self.blocks = nn.Sequential(OrderedDict(groups))
        self.set_mixed_precision(mixed_precision)

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    def set_mixed_precision(self, dtype: torch.dtype | None) -> None:
        """Reduced-precision dtype (fp16 as official, or bf16) for CUDA convs; None = fp32."""
        if dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(
                f"mixed_precision must be None, float16 or bfloat16, got {dtype}"
            )
        name = None if dtype is None else str(dtype).removeprefix("torch.")
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.low_precision = name

    @property
    def mixed_precision(self) -> torch.dtype | None:
        name = self.blocks.input.low_precision
        return None if name is None else getattr(torch, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` already in map_pixels space (B×C×H×W, H and W multiples of the downsampling)."""
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(
                f"expected B×{self.input_channels}×H×W input, got shape {tuple(x.shape)}"
            )
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(
                f"H and W must be multiples of {self.downsample}, got {tuple(x.shape[-2:])}"
            )
        return self.blocks(x.float()).float()

    @torch.no_grad()
    def get_codebook_indices(self, x01: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] (B×3×t×t) → token ids, LongTensor B×(t/8)×(t/8)."""
        return self(map_pixels(x01.float())).argmax(dim=1)


# ------------------------------------------------------------- allow-list unpickling
class _Record:
    """Inert stand-in for a pickled module: keeps its state dict, runs no module code."""

    kind = "record"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(
                f"unexpected state of type {type(state).__name__} for {self.kind}"
            )
        self.state = state


def _record_class(kind: str) -> type:
    return type(f"_{kind}Record", (_Record,), {"kind": kind})


class _Sealed:
    """Base for objects the pickle can reach: a BUILD opcode must not be able to modify them."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(
            f"refusing to modify {type(self).__name__} from the pickle"
        )

    def __setattr__(self, key: str, value: Any) -> None:
        raise pickle.UnpicklingError(
            f"refusing to modify {type(self).__name__} from the pickle"
        )


class _StorageType(_Sealed):
    """What the pickle's ``torch.FloatStorage`` etc. resolve to: just a dtype."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)


class _Function(_Sealed):
    """An allow-listed function, wrapped so the pickle cannot rewrite its defaults."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _LoadedStorage(_Sealed):
    """A storage read from the file, as a flat tensor (tensors are views of it)."""

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor) -> None:
        object.__setattr__(self, "data", data)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    """Checked replacement for ``torch._utils._rebuild_tensor_v2``: a strided view, no hooks."""
    if not isinstance(storage, _LoadedStorage):
        raise pickle.UnpicklingError(
            "tensor rebuilt from something that is not a stored storage"
        )
    if backward_hooks:
        raise pickle.UnpicklingError("tensor carries backward hooks; refusing")
    if metadata:
        raise pickle.UnpicklingError(
            "tensor carries metadata (conj/neg bits); not supported"
        )
    ok = isinstance(storage_offset, int) and all(
        isinstance(v, int) for v in (*size, *stride)
    )
    if not ok or len(size) != len(stride):
        raise pickle.UnpicklingError("malformed tensor size/stride/offset")
    try:
        return torch.as_strided(
            storage.data, tuple(size), tuple(stride), storage_offset
        )
    except RuntimeError as e:
        raise pickle.UnpicklingError(
            f"tensor view out of its storage's bounds: {e}"
        ) from None


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """Checked replacement for ``torch._utils._rebuild_parameter``: the plain tensor."""
    if not isinstance(data, torch.Tensor) or backward_hooks:
        raise pickle.UnpicklingError("malformed parameter")
    return data


_ENCODER_CLASSES = {
    ("dall_e.encoder", "Encoder"): _record_class("Encoder"),
    ("dall_e.encoder", "EncoderBlock"): _record_class("EncoderBlock"),
    ("dall_e.utils", "Conv2d"): _record_class("Conv2d"),
    ("torch.nn.modules.container", "Sequential"): _record_class("Sequential"),
    ("torch.nn.modules.activation", "ReLU"): _record_class("ReLU"),
    ("torch.nn.modules.linear", "Identity"): _record_class("Identity"),
    ("torch.nn.modules.pooling", "MaxPool2d"): _record_class("MaxPool2d"),
}

#: Every global the unpickler resolves (module, name) → object. Nothing else is reachable.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_ENCODER_CLASSES,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "device"): torch.device,
    ("__builtin__", "set"): set,  # protocol-2 pickles use the Python 2 name
    ("builtins", "set"): set,  # the same global, as protocol >= 3 spells it
    ("torch._utils", "_rebuild_tensor_v2"): _Function(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Function(_rebuild_parameter),
    **{("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()},
}


class AllowListUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS`; refuses everything else before it is called.

    ``find_class`` is the only place pickle turns a name into a callable (GLOBAL,
    STACK_GLOBAL, INST, OBJ and EXT all go through it), so nothing outside the list can
    be constructed or called.
    """

    def __init__(self, file, source: str | Path, persistent_load=None) -> None:
        super().__init__(file)
        self._source = str(source)
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"{self._source}: refusing to load global '{module}.{name}' (not on the dVAE "
                "allow-list; the file is not an OpenAI dVAE encoder or has been tampered with)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError(
                f"{self._source}: unexpected persistent id in this pickle"
            )
        return self._persistent(pid)


def _storage_pid(pid: Any, source: str) -> tuple[_StorageType, str, int]:
    if not (
        isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")
    ):
        raise pickle.UnpicklingError(
            f"{source}: unexpected persistent id {str(pid)[:80]!r}"
        )
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if (
        not isinstance(storage_type, _StorageType)
        or not isinstance(numel, int)
        or numel < 0
    ):
        raise pickle.UnpicklingError(f"{source}: malformed storage reference")
    return storage_type, str(key), numel


def _load_zip(path: Path) -> Any:
    """torch's zip container: ``<prefix>/data.pkl`` + one raw record per storage."""
    source = str(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise pickle.UnpicklingError(
                f"{source}: zip file without exactly one <prefix>/data.pkl"
            )
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and zf.read(prefix + "byteorder") not in (
            b"little",
        ):
            raise pickle.UnpicklingError(
                f"{source}: big-endian checkpoints are not supported"
            )
        storages: dict[str, _LoadedStorage] = {}

        def persistent_load(pid: Any) -> _LoadedStorage:
            st, key, numel = _storage_pid(pid, source)
            if key not in storages:
                if not re.fullmatch(r"[0-9A-Za-z_]+", key):
                    raise pickle.UnpicklingError(f"{source}: bad storage key {key!r}")
                try:
                    raw = zf.read(f"{prefix}data/{key}")
                except KeyError:
                    raise pickle.UnpicklingError(
                        f"{source}: storage record {key} missing"
                    ) from None
                itemsize = torch.empty((), dtype=st.dtype).element_size()
                if len(raw) != numel * itemsize:
                    raise pickle.UnpicklingError(
                        f"{source}: storage {key} has {len(raw)} bytes, expected {numel * itemsize}"
                    )
                data = (
                    torch.frombuffer(bytearray(raw), dtype=st.dtype)
                    if raw
                    else torch.empty(0, dtype=st.dtype)
                )
                storages[key] = _LoadedStorage(data)
            return storages[key]

        with zf.open(pkl[0]) as f:
            return AllowListUnpickler(
                io.BytesIO(f.read()), source, persistent_load
            ).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(path: Path) -> Any:
    """torch's pre-zip stream: magic, version, sys info, main pickle, storage keys, raw data."""
    source = str(path)
    with open(path, "rb") as f:
        if f.read(262)[257:262] == b"ustar":
            raise pickle.UnpicklingError(
                f"{source}: the ancient tar-based torch format is not supported"
            )
        f.seek(0)
        header = [AllowListUnpickler(f, source).load() for _ in range(3)]
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
            raise pickle.UnpicklingError(
                f"{source}: not a torch file (bad magic number/protocol)"
            )
        if not (isinstance(header[2], dict) and header[2].get("little_endian", True)):
            raise pickle.UnpicklingError(
                f"{source}: big-endian checkpoints are not supported"
            )
        storages: dict[str, _LoadedStorage] = {}

        def persistent_load(pid: Any) -> Any:
            if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
                return pid[1]  # a class, already resolved through find_class
            st, key, numel = _storage_pid(pid, source)
            if key not in storages:
                storages[key] = _LoadedStorage(torch.empty(numel, dtype=st.dtype))
            if len(pid) > 5 and pid[5] is not None:
                raise pickle.UnpicklingError(
                    f"{source}: storage views are not supported"
                )
            return storages[key]

        result = AllowListUnpickler(f, source, persistent_load).load()
        keys = AllowListUnpickler(f, source).load()
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
            raise pickle.UnpicklingError(
                f"{source}: storage key list does not match the pickle"
            )
        for key in keys:
            data = storages[str(key)].data
            head = f.read(8)
            if len(head) != 8:
                raise pickle.UnpicklingError(
                    f"{source}: truncated file (storage {key})"
                )
            (numel,) = struct.unpack("<q", head)
            nbytes = data.numel() * data.element_size()
            if numel != data.numel():
                raise pickle.UnpicklingError(f"{source}: storage {key} size mismatch")
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise pickle.UnpicklingError(
                    f"{source}: truncated file (storage {key})"
                )
            if nbytes:
                data.copy_(torch.frombuffer(bytearray(raw), dtype=data.dtype))
        return result


def allow_list_load(path: str | Path) -> Any:
    """Unpickle a torch file (zip or legacy) resolving only :data:`ALLOWED_GLOBALS`.

    Module objects come back as inert records (``.state`` = their pickled ``__dict__``).
    Raises ``pickle.UnpicklingError`` naming the file and any refused global.
    """
    path = Path(path)
    try:
        return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    except pickle.UnpicklingError as e:
        if str(path) in str(e):
            raise
        raise pickle.UnpicklingError(
            f"{path}: not a readable torch file ({e})"
        ) from None
    except Exception as e:  # noqa: BLE001 - malformed input fails anywhere; name the file
        raise pickle.UnpicklingError(
            f"{path}: not a readable torch file ({type(e).__name__}: {e})"
        ) from None


# ---------------------------------------------------------------- state extraction
class DalleFormatError(ValueError):
    """The file unpickled safely but is not shaped like a dVAE encoder."""


_EXPECTED_KIND = {
    Conv2d: "Conv2d",
    EncoderBlock: "EncoderBlock",
    nn.Sequential: "Sequential",
    nn.ReLU: "ReLU",
    nn.Identity: "Identity",
    nn.MaxPool2d: "MaxPool2d",
    Encoder: "Encoder",
}


def _children(rec: _Record, where: str, source: str) -> Mapping[str, Any]:
    mods = getattr(rec, "state", {}).get("_modules", {})
    if not isinstance(mods, Mapping):
        raise DalleFormatError(f"{source}: '{where}' has malformed submodules")
    return mods


def _records_state_dict(
    root: _Record, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, _Record]]:
    """Walk the record tree: flat state dict of parameters, and every record by its path."""
    sd: dict[str, torch.Tensor] = {}
    recs: dict[str, _Record] = {}
    seen: set[int] = set()

    def walk(rec: Any, prefix: str) -> None:
        where = prefix[:-1] or "<root>"
        if not isinstance(rec, _Record):
            raise DalleFormatError(
                f"{source}: '{where}' is a {type(rec).__name__}, not a module"
            )
        if id(rec) in seen or prefix.count(".") > 16:
            raise DalleFormatError(
                f"{source}: '{where}' repeats a module or nests too deep"
            )
        seen.add(id(rec))
        recs[prefix[:-1]] = rec
        state = getattr(rec, "state", {})
        for group in ("_parameters", "_buffers"):
            tensors = state.get(group) or {}
            if not isinstance(tensors, Mapping):
                raise DalleFormatError(f"{source}: '{where}' has malformed {group}")
            for name, t in tensors.items():
                if t is None:
                    continue
                if not isinstance(t, torch.Tensor):
                    raise DalleFormatError(
                        f"{source}: '{prefix}{name}' is not a tensor"
                    )
                sd[prefix + name] = t
        for name, child in _children(rec, where, source).items():
            walk(child, f"{prefix}{name}.")

    walk(root, "")
    return sd, recs


def infer_config(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict:
    """n_hid, n_blk_per_group, group_count, input_channels, vocab_size from parameter shapes."""
    try:
        w_in, w_out = sd["blocks.input.w"], sd["blocks.output.conv.w"]
    except KeyError as e:
        raise DalleFormatError(
            f"{source}: not a dVAE encoder state dict (missing {e.args[0]!r})"
        ) from None
    groups = {
        int(m.group(1)) for k in sd if (m := re.match(r"blocks\.group_(\d+)\.", k))
    }
    blocks = {
        int(m.group(1))
        for k in sd
        if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))
    }
    if not groups or groups != set(range(1, max(groups) + 1)) or not blocks:
        raise DalleFormatError(
            f"{source}: dVAE encoder groups/blocks are not numbered 1..n: "
            f"groups {sorted(groups)}, blocks {sorted(blocks)}"
        )
    return {
        "n_hid": int(w_in.shape[0]),
        "input_channels": int(w_in.shape[1]),
        "vocab_size": int(w_out.shape[0]),
        "group_count": max(groups),
        "n_blk_per_group": max(blocks),
    }


def encoder_from_state_dict(
    sd: Mapping[str, torch.Tensor], source: str = "<state dict>", **kw: Any
) -> Encoder:
    """Fresh :class:`Encoder` sized from ``sd``'s shapes, loaded strictly (errors name keys)."""
    cfg = infer_config(sd, source)
    enc = Encoder(**cfg, **kw)
    own = enc.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise DalleFormatError(
            f"{source}: dVAE encoder keys do not match the expected structure "
            f"(config {cfg}); missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise DalleFormatError(
                f"{source}: '{k}' has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}"
            )
        if not sd[k].is_floating_point():
            raise DalleFormatError(
                f"{source}: '{k}' has dtype {sd[k].dtype}, expected a float tensor"
            )
    enc.load_state_dict({k: sd[k].float() for k in own}, strict=True)
    return enc.eval().requires_grad_(False)


def encoder_from_records(root: Any, source: str = "<pickle>", **kw: Any) -> Encoder:
    """Fresh :class:`Encoder` from an unpickled record tree, after checking its structure."""
    if not (isinstance(root, _Record) and root.kind == "Encoder"):
        raise DalleFormatError(
            f"{source}: top-level object is {type(root).__name__}, not dall_e.encoder.Encoder"
        )
    sd, recs = _records_state_dict(root, source)
    enc = encoder_from_state_dict(sd, source, **kw)
    # Same module tree, same module kinds at every path.
    own = dict(enc.named_modules())
    if set(own) != set(recs):
        raise DalleFormatError(
            f"{source}: module tree differs from the dVAE encoder's: "
            f"extra {sorted(set(recs) - set(own))[:8]}, missing {sorted(set(own) - set(recs))[:8]}"
        )
    for name, mod in own.items():
        kind = _EXPECTED_KIND[type(mod)]
        if recs[name].kind != kind:
            raise DalleFormatError(
                f"{source}: '{name or '<root>'}' is a {recs[name].kind}, expected {kind}"
            )
        state = getattr(recs[name], "state", {})
        if kind == "MaxPool2d" and (
            state.get("kernel_size") != 2 or state.get("stride") not in (2, None)
        ):
            raise DalleFormatError(f"{source}: '{name}' is not a 2×2 max-pool")
        if kind == "Conv2d" and state.get("kw", mod.kw) != mod.kw:
            raise DalleFormatError(
                f"{source}: '{name}' kernel width {state.get('kw')} does not match its weight"
            )
    # The pickled hyper-parameters (when present) must agree with the shapes.
    state = root.state
    for key in (
        "n_hid",
        "n_blk_per_group",
        "group_count",
        "input_channels",
        "vocab_size",
    ):
        if key in state and state[key] != getattr(enc, key):
            raise DalleFormatError(
                f"{source}: pickled {key}={state[key]!r} disagrees with the weights "
                f"({getattr(enc, key)})"
            )
    return enc


def load_dalle_encoder(path: str | Path, **kw: Any) -> Encoder:
    """Load the dVAE encoder from the official pickled module, a state-dict ``.pt``/``.pth``
    (``weights_only=True``) or a ``.safetensors`` file. Returns it in eval mode, frozen, on CPU.

    ``kw`` go to :class:`Encoder` (e.g. ``mixed_precision=torch.bfloat16``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"dVAE encoder weights not found: {path} ({WEIGHTS_HINT}, "
            "e.g. weights/dall_e_tokenizer_weight/encoder.pkl)"
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(
                f"{path}: reading .safetensors needs the 'safetensors' package"
            ) from None
        return encoder_from_state_dict(
            load_file(str(path), device="cpu"), str(path), **kw
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = (
            None  # a pickled module (or something worse): the allow-list loader decides
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(
            f"{path}: not a readable torch weight file ({type(e).__name__}: {e})"
        ) from None
    if obj is None:
        root = allow_list_load(path)
        enc = encoder_from_records(root, str(path), **kw)
        log.info(
            "loaded dVAE encoder from pickled module %s (n_hid=%d, vocab=%d)",
            path,
            enc.n_hid,
            enc.vocab_size,
        )
        return enc
    if (
        isinstance(obj, Mapping)
        and len(obj) == 1
        and next(iter(obj)) in ("state_dict", "model", "encoder")
    ):
        obj = next(iter(obj.values()))
    if not (
        isinstance(obj, Mapping)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise ValueError(
            f"{path}: expected a dVAE encoder state dict (name → tensor), got {type(obj).__name__}"
        )
    return encoder_from_state_dict(obj, str(path), **kw)
