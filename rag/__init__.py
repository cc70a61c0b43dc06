"""Knowledge bases: extraction, chunking and embedding (a domain: it imports only the kernel)."""

from rag.chunking import Chunk, chunk
from rag.embedding import LocalEmbedder
from rag.extract import Document, ExtractionError, Section, detect_type, extract

__all__ = ["Chunk", "Document", "ExtractionError", "LocalEmbedder", "Section", "chunk", "detect_type", "extract"]
