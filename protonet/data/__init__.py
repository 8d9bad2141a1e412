"""Data layers: readers of on-disk datasets that feed nets without Input blobs.

Their layer types (HDF5Data/HDF5Output in .hdf5; Data, ImageData, MemoryData,
WindowData in .layers, AnnotatedData in .annotated) register when protonet.layers loads, so the dataset tools
(imageset, datum, lmdb_source) import without torch.
"""
