"""A restricted unpickler for the pickles inside checkpoints.

Pickles in checkpoints are untrusted input: ``pickle.load`` runs whatever callable a pickle names,
so a checkpoint could run code on the machine that exports it. torch DCP's ``.metadata`` and
Megatron's ``common.pt`` are pickles nevertheless, and they name classes from
``torch.distributed.checkpoint`` and ``megatron.core`` that need not even be installed here.

This unpickler resolves a global only from an explicit table: containers, torch dtypes and a few
torch helpers as themselves, and every DCP / Megatron class onto an inert stand-in that merely
records its state. Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, an
unknown class) raises :class:`UnsafePickleError` before it is called.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import UnsafePickleError


class StandIn:
    """An inert object standing in for a class the pickle names; it only keeps the state."""

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_args", args)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            if isinstance(key, str):
                self.__dict__[key] = value

    def __setstate__(self, state: Any) -> None:
        # pickle's BUILD: a dict, a (dict, slots) pair, or anything else a __getstate__ returned.
        if isinstance(state, tuple) and len(state) == 2 and all(
            s is None or isinstance(s, dict) for s in state
        ):
            for part in state:
                self._merge(part or {})
        elif isinstance(state, dict):
            self._merge(state)
        else:
            self.__dict__["_state"] = state

    def _merge(self, state: dict) -> None:
        for key, value in state.items():
            if isinstance(key, str):
                self.__dict__[key] = value

    def __repr__(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return f"{type(self).__name__}({fields})"


def _stand_in(name: str) -> type[StandIn]:
    return type(name, (StandIn,), {"__module__": __name__})


# torch.distributed.checkpoint metadata (torch/distributed/checkpoint/metadata.py, planner.py, filesystem.py)
Metadata = _stand_in("Metadata")
TensorStorageMetadata = _stand_in("TensorStorageMetadata")
BytesStorageMetadata = _stand_in("BytesStorageMetadata")
ChunkStorageMetadata = _stand_in("ChunkStorageMetadata")
StorageMeta = _stand_in("StorageMeta")
MetadataIndex = _stand_in("MetadataIndex")
StorageInfo = _stand_in("_StorageInfo")
WriteItem = _stand_in("WriteItem")
TensorWriteData = _stand_in("TensorWriteData")
SavePlan = _stand_in("SavePlan")
BytesIOWriteData = _stand_in("BytesIOWriteData")
StoragePrefix = _stand_in("_StoragePrefix")
OpaqueBytes = _stand_in("OpaqueBytes")
# megatron-core 0.15 pickles its planner's metadata as ``MCoreMetadata(Metadata)`` (a dataclass adding
# ``mcore_data``: per tensor key, a dict that may hold ``nd_reformulated_orig_global_shape``) and its plans as
# ``MCoreSavePlan(SavePlan)`` (adding ``mcore_data``); 0.16 pickles torch's plain Metadata and SavePlan again.
MCoreMetadata = type("MCoreMetadata", (Metadata,), {"__module__": __name__})
MCoreSavePlan = type("MCoreSavePlan", (SavePlan,), {"__module__": __name__})


class TensorProperties(StandIn):
    """DCP pickles this one as a tuple (dtype, layout, requires_grad, memory format, pin_memory)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and state and isinstance(state[0], torch.dtype):
            self.__dict__["dtype"] = state[0]
        else:
            super().__setstate__(state)


def _size(*args: Any) -> tuple[int, ...]:
    values = tuple(args[0]) if args else ()
    if not all(isinstance(v, int) for v in values):
        raise UnsafePickleError("torch.Size in a pickle holds something other than integers")
    return values


def _get_layout(name: Any) -> str:
    if name not in ("torch.strided", "torch.sparse_coo"):
        raise UnsafePickleError(f"unexpected tensor layout {name!r} in a pickle")
    return str(name)


def _enum_value(*args: Any) -> Any:
    return args[0] if args else None


def _path(*parts: Any) -> str:
    # DCP's StorageMeta.checkpoint_id is the path the writer was given; only its text is kept.
    if not all(isinstance(x, str) for x in parts):
        raise UnsafePickleError("a path in a pickle holds something other than strings")
    return "/".join(parts)


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafePickleError("unexpected _codecs.encode call in a pickle")
    return text.encode(encoding)


_DCP = "torch.distributed.checkpoint"
_MCORE_CKPT = "megatron.core.dist_checkpointing"

#: (module, name) -> the object a pickle gets for it. Nothing outside this table resolves.
BASE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("_io", "BytesIO"): OpaqueBytes,
    **{(m, n): _path for m in ("pathlib", "pathlib._local") for n in ("PosixPath", "PurePosixPath", "WindowsPath",
                                                                      "PureWindowsPath", "Path")},
    ("io", "BytesIO"): OpaqueBytes,
    (f"{_DCP}.metadata", "Metadata"): Metadata,
    (f"{_DCP}.metadata", "TensorStorageMetadata"): TensorStorageMetadata,
    (f"{_DCP}.metadata", "BytesStorageMetadata"): BytesStorageMetadata,
    (f"{_DCP}.metadata", "ChunkStorageMetadata"): ChunkStorageMetadata,
    (f"{_DCP}.metadata", "TensorProperties"): TensorProperties,
    (f"{_DCP}.metadata", "StorageMeta"): StorageMeta,
    (f"{_DCP}.metadata", "MetadataIndex"): MetadataIndex,
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"): _enum_value,
    (f"{_DCP}.filesystem", "_StorageInfo"): StorageInfo,
    (f"{_DCP}.filesystem", "_StoragePrefix"): StoragePrefix,
    (f"{_DCP}.planner", "BytesIOWriteData"): BytesIOWriteData,
    (f"{_DCP}.planner", "WriteItem"): WriteItem,
    (f"{_DCP}.planner", "WriteItemType"): _enum_value,
    (f"{_DCP}.planner", "TensorWriteData"): TensorWriteData,
    (f"{_DCP}.planner", "SavePlan"): SavePlan,
}

# Megatron's own classes that its checkpoints pickle (planner data, sharding descriptors, common state).
for _module, _names in {
    f"{_MCORE_CKPT}.strategies.torch": ("MCoreLoadPlanner", "MCoreSavePlanner"),
    f"{_MCORE_CKPT}.mapping": ("ShardedTensor", "ShardedObject", "ShardedTensorFactory",
                               "LocalNonpersistentObject"),
    f"{_MCORE_CKPT}.core": ("CheckpointingConfig",),
    "megatron.core.transformer.enums": ("AttnBackend", "AttnMaskType", "ModelType"),
    "megatron.core.enums": ("ModelType",),
}.items():
    for _name in _names:
        BASE_GLOBALS[(_module, _name)] = _stand_in(_name)
BASE_GLOBALS[(f"{_MCORE_CKPT}.strategies.torch", "MCoreMetadata")] = MCoreMetadata
BASE_GLOBALS[(f"{_MCORE_CKPT}.strategies.torch", "MCoreSavePlan")] = MCoreSavePlan


def _torch_dtype(module: str, name: str) -> torch.dtype | None:
    if module == "torch":
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            return value
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only answers from a table (see module doc)."""

    def __init__(
        self,
        file: io.BufferedIOBase,
        *,
        what: str,
        extra_globals: Mapping[tuple[str, str], Any] | None = None,
        persistent_load: Callable[[Any], Any] | None = None,
    ):
        super().__init__(file)
        self._what = what
        self._globals = dict(BASE_GLOBALS)
        self._globals.update(extra_globals or {})
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._globals:
            return self._globals[(module, name)]
        dtype = _torch_dtype(module, name)
        if dtype is not None:
            return dtype
        raise UnsafePickleError(
            f"{self._what}: refusing to unpickle {module}.{name} (not a type a checkpoint needs); "
            "the file may be corrupt or malicious"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafePickleError(f"{self._what}: unexpected persistent reference in a pickle")
        return self._persistent(pid)


def loads(data: bytes, *, what: str, **kwargs: Any) -> Any:
    """Unpickle ``data`` with the restricted unpickler; ``what`` names the file in error messages."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), what=what, **kwargs).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt pickle can raise almost anything
        raise UnsafePickleError(f"{what}: not a readable pickle ({type(e).__name__}: {e})") from None
