"""HDF5Data and HDF5Output: Caffe's generic array reader and writer.

HDF5Data reads the files named in a text list (`source`), one top per dataset of
the same name, and serves `batch_size` rows per forward in Caffe's order: rows in
file order (or a shuffled order), files in list order (or shuffled), wrapping from
the last file to the first and letting a batch span a file boundary. Paths are
used as written, so relative ones are relative to the current directory, as in
Caffe. A whole file is held in memory (on the layer's device) while it is read,
as Caffe does. Caffe shuffles with `std::random_shuffle`, i.e. glibc's `rand()`,
which it never seeds: once a seed is set (protonet.set_random_seed, the solver's
`random_seed`) protonet shuffles the same way from the process's one rand() stream
(protonet.rng.glibc_rand), reshuffling the current order as Caffe does, so rows come
in Caffe's order; unseeded it draws from numpy's global generator, which
torch/numpy seeding repeats. In data-parallel training
(protonet.solver.distributed) a TRAIN net's layer keeps every N-th row of that
walk for its worker, as Caffe's Skip(), and shuffles with a generator the workers
share, so their rows never overlap.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .. import rng
from ..errors import DataError
from ..io.atomic import atomic_call
from ..io.hdf5 import creating, read_array, reading
from ..layers.base import Layer
from ..layers.registry import register


@register("HDF5Data")
class HDF5Data(Layer):
    """Rows of HDF5 datasets as tops (float32), `batch_size` at a time."""
    exact_bottoms = 0
    min_tops = 1

    def setup(self, bottom_shapes):
        p = self.param.hdf5_data_param
        if self.param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data; remove transform_param "
                             "and store the data already transformed")
        if p.batch_size <= 0:
            raise self.error(f"hdf5_data_param.batch_size must be positive, got "
                             f"{p.batch_size}")
        self.files = self._read_list(p.source)
        self.shuffle = p.shuffle
        # Data-parallel training: row i of the endless walk is worker i % workers's
        # (Caffe's HDF5DataLayer::Skip); their shuffles then must agree.
        from ..solver.distributed import data_shard, shared_rng
        self.shard_rank, self.shard_count = data_shard(self.phase)
        self.offset = 0
        self._random = np.random if self.shard_count == 1 else shared_rng()
        # Caffe's own shuffles (glibc rand()) once a seed is set, one worker only
        self._glibc = rng.glibc_rand() if rng.seeded() and self.shard_count == 1 else None
        self.file_order = self._order(len(self.files))
        self.file_index = 0
        self.row_shapes = None
        self._load(self.files[self.file_order[0]])
        self.row_shapes = [tuple(t.shape[1:]) for t in self.tensors]
        self.row = 0

    def reshape(self, bottom_shapes):
        batch = self.param.hdf5_data_param.batch_size
        return [(batch,) + shape for shape in self.row_shapes]

    def forward(self):
        if self.tensors[0].device != self.device:
            self._to_device()
        pieces: list[list[torch.Tensor]] = []
        left = self.param.hdf5_data_param.batch_size
        step = self.shard_count
        while left:
            start = self.row + (self.shard_rank - self.offset) % step   # others' rows
            if start >= self.rows:
                self.offset += self.rows - self.row
                self._wrap()
                continue
            take = min(left, (self.rows - start + step - 1) // step)
            pieces.append(self._rows(start, take, step))
            end = start + (take - 1) * step + 1
            self.offset += end - self.row
            self.row = end
            left -= take
            if self.row == self.rows:
                self._wrap()
        tops = [p[0] if len(pieces) == 1 else torch.cat(p) for p in zip(*pieces)]
        return tops if len(tops) > 1 else tops[0]

    def _to_device(self) -> None:
        """Follow the layer to its device (nets are built on the CPU, then moved)."""
        self.tensors = [t.to(self.device) for t in self.tensors]
        if self.row_order is not None:
            self.row_order = self.row_order.to(self.device)

    # -- reading ---------------------------------------------------------------
    def _read_list(self, source: str) -> list[str]:
        try:
            with open(source) as f:
                names = f.read().split()
        except OSError as e:
            raise DataError(f"layer '{self.layer_name}' (HDF5Data): cannot read the list "
                            f"of HDF5 files '{source}' ({e.strerror or e}); relative "
                            f"paths are relative to the current directory "
                            f"({os.getcwd()})") from None
        if not names:
            raise DataError(f"layer '{self.layer_name}' (HDF5Data): '{source}' lists no "
                            "HDF5 files")
        return names

    def _order(self, n: int) -> np.ndarray:
        return self._permute(np.arange(n)) if self.shuffle else np.arange(n)

    def _permute(self, order: np.ndarray) -> np.ndarray:
        """`order` shuffled: std::random_shuffle of it (Caffe's), or numpy's."""
        if self._glibc is None:
            return order[self._random.permutation(len(order))]
        items = order.tolist()
        self._glibc.random_shuffle(items)
        return np.asarray(items, dtype=np.int64)

    def _load(self, path: str) -> None:
        """Read every top's dataset from `path` and start a new row order."""
        arrays = _read_datasets(path, list(self.param.top), self.layer_name)
        if self.row_shapes is not None:
            for name, array, shape in zip(self.param.top, arrays, self.row_shapes):
                if array.shape[1:] != shape:
                    raise DataError(f"{path}: dataset '{name}' has rows of shape "
                                    f"{list(array.shape[1:])}, the first file's have "
                                    f"{list(shape)} (layer '{self.layer_name}')")
        self.tensors = [torch.from_numpy(a).to(self.device) for a in arrays]
        self.rows = arrays[0].shape[0]
        self.row_order = None
        if self.shuffle:
            self._shuffle_rows()

    def _shuffle_rows(self) -> None:
        """A new row order: Caffe shuffles the current one (identity after a load)."""
        current = np.arange(self.rows) if self.row_order is None else \
            self.row_order.cpu().numpy()
        self.row_order = torch.from_numpy(self._permute(current)).to(self.device)

    def _rows(self, start: int, count: int, step: int = 1) -> list[torch.Tensor]:
        if self.row_order is None:
            if step == 1:
                return [t.narrow(0, start, count).clone() for t in self.tensors]
            return [t[start:start + (count - 1) * step + 1:step].clone()
                    for t in self.tensors]
        index = self.row_order[start:start + (count - 1) * step + 1:step]
        return [t.index_select(0, index) for t in self.tensors]

    def _wrap(self) -> None:
        """Past a file's last row: next file (reshuffling at the end of the list)."""
        if len(self.files) > 1:
            self.file_index += 1
            if self.file_index == len(self.files):
                self.file_index = 0
                if self.shuffle:
                    self.file_order = self._permute(self.file_order)
            self._load(self.files[self.file_order[self.file_index]])
        self.row = 0
        if self.shuffle:
            self._shuffle_rows()


def _read_datasets(path: str, names: list[str], layer: str) -> list[np.ndarray]:
    """Each named dataset of `path` as float32, checked for rows and type."""
    where = f"layer '{layer}' (HDF5Data): {path}"
    if not os.path.isfile(path):
        raise DataError(f"{where}: file not found (relative paths in the list are "
                        f"relative to the current directory, {os.getcwd()})")

    def fail(message: str) -> DataError:
        return DataError(f"{where}: {message}")

    with reading(path, fail) as f:
        arrays = [_read_dataset(f, name, where, fail) for name in names]
    rows = arrays[0].shape[0]
    if rows == 0:
        raise DataError(f"{where}: dataset '{names[0]}' has no rows")
    for name, array in zip(names[1:], arrays[1:]):
        if array.shape[0] != rows:
            raise DataError(f"{where}: dataset '{name}' has {array.shape[0]} rows but "
                            f"'{names[0]}' has {rows}; all tops need the same row count")
    return arrays


def _read_dataset(f, name: str, where: str, fail) -> np.ndarray:
    if name not in f or not hasattr(f[name], "dtype"):
        found = ", ".join(sorted(f.keys())) or "none"
        raise DataError(f"{where}: no dataset '{name}' (the top's name); datasets in "
                        f"the file: {found}")
    dataset = f[name]
    if dataset.dtype.kind not in "fiub":
        raise DataError(f"{where}: dataset '{name}' holds {dataset.dtype}; expected "
                        "floating point or integer values")
    if dataset.ndim < 1:
        raise DataError(f"{where}: dataset '{name}' is a scalar; expected at least 1 axis")
    return read_array(dataset, name, fail)


@register("HDF5Output")
class HDF5Output(Layer):
    """Writes its two bottoms to `file_name` as datasets "data" and "label".

    Each forward replaces the file with the current batch (Caffe can write one
    batch only); shapes are Caffe's legacy 4-D ones (N, C, H, W).
    """
    exact_bottoms = 2
    exact_tops = 0

    def setup(self, bottom_shapes):
        self.file_name = self.param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.error("hdf5_output_param.file_name is required")

    def reshape(self, bottom_shapes):
        data, label = bottom_shapes
        for shape in bottom_shapes:
            if len(shape) > 4 or len(shape) < 1:
                raise self.shape_error(f"bottoms need 1 to 4 axes, got {list(shape)}")
        if data[0] != label[0]:
            raise self.shape_error(f"data and label need the same batch size, got "
                                   f"{data[0]} and {label[0]}")
        return []

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def forward(self, data, label):
        arrays = [_legacy_4d(t) for t in (data, label)]

        def write(tmp: str) -> None:
            with creating(tmp) as f:
                f.create_dataset("data", data=arrays[0])
                f.create_dataset("label", data=arrays[1])
        atomic_call(self.file_name, write)
        return []


def _legacy_4d(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().to("cpu", torch.float32).numpy()
    return array.reshape(array.shape + (1,) * (4 - array.ndim))
