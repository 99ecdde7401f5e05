"""m3d: 3D meshes -> multi-view renders -> image-encoder vectors -> Qdrant (+ FAISS for exact checks)."""

__version__ = "0.1.0"
