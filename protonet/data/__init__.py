"""Data layers: readers of on-disk datasets that feed nets without Input blobs."""
from . import hdf5  # noqa: F401  (registers HDF5Data and HDF5Output)
from . import layers  # noqa: F401  (registers Data, ImageData, MemoryData, WindowData)
from . import annotated  # noqa: F401  (registers SSD's AnnotatedData)
